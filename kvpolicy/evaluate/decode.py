"""`kvpolicy eval --regime decode`: compression while the model generates.

A short prompt, then a long continuation scored teacher-forced, with each
policy's compression events firing during the continuation on its own
schedule (the HF engine compresses after every decode step that is due).
Memory is equal over the generation: every policy is sized so that its PEAK
KV bytes over the continuation are the target share of what the full cache
holds at the end (memory.plan_peak, a measured search on the first sample;
the run a probe made is the run reported when that probe is chosen). Mean
bytes are reported too. A policy that compresses only at prefill is refused
(runner.validate): it would hold every generated token.

Metrics over the whole continuation and per segment of it (KL(full ||
policy), top-1 agreement, ppl vs full as the trace grows).
"""
from __future__ import annotations

import sys
import time

import kvpolicy

from . import decode_tasks
from . import memory as mem
from . import metrics as m
from .progress import Progress
from .results import environment
from .runner import sample_header

SEGMENTS = 4  # the continuation is reported in this many equal parts


def segment_bounds(n: int, parts: int = SEGMENTS) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(edges, edges[1:]))


def quality(ref, out, tokens) -> dict:
    kl = m.kl_per_position(ref, out)
    record = {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1": m.top1_agreement(ref, out), "ppl": m.perplexity(out, tokens)}
    record["segments"] = [
        {"start": a, "end": b, "kl": float(kl[a:b].mean()), "top1": m.top1_agreement(ref[a:b], out[a:b]), "ppl": m.perplexity(out[a:b], tokens[a:b])}
        for a, b in segment_bounds(len(tokens))
    ]
    return record


def stats_record(stats) -> dict:
    full = stats.kv_bytes_full
    return {
        "kv_bytes": stats.kv_bytes,
        "kv_bytes_full": full,
        "peak_kv_bytes": stats.peak_kv_bytes,
        "held": stats.kv_bytes / full if full else 1.0,
        "peak": stats.peak_kv_bytes / full if full else 1.0,
        "mean": stats.mean_kv_bytes / stats.mean_kv_bytes_full if stats.mean_kv_bytes_full else 1.0,
        "compressions": stats.compressions,
        "compression_steps": list(stats.compression_steps),
        "prefill_seconds": round(stats.prefill_seconds, 3),
        "compress_seconds": round(stats.compress_seconds, 3),
        "decode_seconds": round(stats.decode_seconds, 3),
    }


class DecodeEvaluator:
    def __init__(self, model, tok):
        import torch

        self.model, self.tok, self.torch = model, tok, torch
        self.cache: dict[tuple, tuple] = {}  # (sample id, policy hash) -> (record, logprobs): a probe's run is reused

    def ids(self, sample):
        return self.torch.tensor([list(sample.prompt_ids)])

    def prefill(self, sample, window: int, states: list) -> list:
        ids = self.ids(sample)
        shared = [kvpolicy.hf.prefill(self.model, ids, window=window)]
        if states:
            shared.append(kvpolicy.hf.prefill(self.model, ids, window=window, states=states))
        return shared

    def reference(self, sample, length: int, prefilled):
        """(sample with its continuation, full run record, full logprobs)."""
        start = time.perf_counter()
        if decode_tasks.needs_generation(sample):
            tokens, scored = kvpolicy.hf.trace(self.model, self.ids(sample), length, policy="full", prefilled=prefilled,
                                               banned=decode_tasks.end_tokens(self.tok))
            sample = decode_tasks.with_continuation(sample, tokens)
        else:
            scored = kvpolicy.hf.score(self.model, self.ids(sample), list(sample.answer_ids), policy="full", prefilled=prefilled)
        lp = scored.logprobs
        record = quality(lp, lp, list(sample.answer_ids)) | stats_record(scored.stats)
        record["seconds"] = round(time.perf_counter() - start, 3)
        return sample, record, lp

    def run(self, sample, policy, reference, prefilled) -> dict:
        key = (sample.id, policy.hash)
        if key not in self.cache:
            start = time.perf_counter()
            tokens = list(sample.answer_ids)
            scored = kvpolicy.hf.score(self.model, self.ids(sample), tokens, policy=policy, prefilled=prefilled)
            record = quality(reference, scored.logprobs, tokens) | stats_record(scored.stats)
            record["seconds"] = round(time.perf_counter() - start, 3)
            self.cache[key] = record
        return dict(self.cache[key])


def header(sample) -> dict:
    """The prefill regime's sample header (answer and depths are None here), plus the trace itself."""
    trace = list(sample.answer_ids) if sample.task == "reasoning" else None
    return sample_header(sample) | {"continuation_ids": trace}


def run_samples(config, store, work: list[tuple[str, int]]) -> None:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    model, tok = kvpolicy.models.load("smollm2-135m")
    env = environment("smollm2-135m", str(kvpolicy.models.path("smollm2-135m")))
    env["policy_hashes"] = {label: pol.hash for label, pol in config.policies.items()}
    if store.data["environment"]:
        store.data.setdefault("history", [{}])[-1]["environment"] = env
    else:
        store.data["environment"] = env
    evaluator = DecodeEvaluator(model, tok)
    # Sized per task: the tasks' prompts differ in length, and a top-p policy's bytes in shape.
    settings = {(s["policy"], s["memory"], s.get("task")): mem.Setting.from_json({k: v for k, v in s.items() if k != "task"}) for s in store.settings}
    sized: dict[tuple, object] = {}
    plan = [(label, f) for label in config.policies if label != "full" for f in config.memories]
    progress = Progress(len(work) * (1 + len(plan)), quiet=config.quiet)
    window = max(pol.ir.observe or 0 for pol in config.policies.values())
    states = [state for pol in config.policies.values() for state in pol.ir.states]

    def policy_for(label, fraction, sample, reference, prefilled):
        key = (label, fraction, sample.task)
        if key in sized:
            return sized[key]
        base = config.policies[label]
        if key in settings:
            policy = mem.sized(base, settings[key].params)[0]
        else:
            progress.note(f"sizing {label} to a peak of {fraction:g} of the full cache on {sample.id} (measured search)")
            total = len(sample.prompt_ids) + len(sample.answer_ids) - 1  # the last token is scored, never appended

            def measure(policy):
                record = evaluator.run(sample, policy, reference, prefilled)
                shown = ", ".join(f"{k}={v}" for k, v in policy.params().items() if k in ("budget", "p"))
                progress.note(f"  {label} {shown}: peak {record['peak']:.1%}, mean {record['mean']:.1%}")
                return record["peak"]

            setting, policy = mem.plan_peak(label, base, fraction, total, measure)
            setting.how += f" [on {sample.id}]"
            settings[key] = setting
            store.add_setting(setting.to_json() | {"task": sample.task})
        sized[key] = policy
        return policy

    try:
        for task, index in work:
            sample = decode_tasks.make(task, tok, config.prompt_tokens, config.seed, index, config.continuation)
            progress.step(f"{sample.id} full")
            prefilled = evaluator.prefill(sample, window, states)
            sample, full_run, reference = evaluator.reference(sample, config.continuation, prefilled)
            full_run.update(policy="full", memory=1.0, params={}, policy_hash=config.policies["full"].hash)
            runs = [full_run]
            for label, fraction in plan:
                policy = policy_for(label, fraction, sample, reference, prefilled)
                progress.step(f"{sample.id} {label}@{fraction:g}")
                result = evaluator.run(sample, policy, reference, prefilled)
                result.update(policy=label, memory=fraction, params=settings[(label, fraction, sample.task)].params, policy_hash=policy.hash)
                runs.append(result)
            record = header(sample)
            record["runs"] = runs
            store.add_sample(record)
            store.save()
            progress.sample_done(sample.id, f"mean KL {sum(r['kl'] for r in runs) / len(runs):.3g}")
    except KeyboardInterrupt:
        progress.finish()
        print(f"kvpolicy eval: interrupted; {len(store.samples)} finished samples are in {config.json_path} (--resume continues)", file=sys.stderr)
        raise
    progress.finish()
