"""`kvpolicy eval`: policies x tasks x memory fractions on the real model.

    config = validate(...)          # every check, before any model work
    run(config)                     # samples -> results JSON (+ table, PNG)

For each sample, the prompt is prefilled once with the full cache and every
policy that compresses after the prefill starts from a copy of it (exact; H2O
and other policies accumulating state during the prefill run their own).
The full cache's run (teacher-forced over the continuation, plus greedy
decoding for the answer when needed) is the reference every policy at every
memory fraction is compared with. A
policy's params for a memory fraction are set on first need (memory.py; a
measured search uses the first sample processed) and stored in the results,
so --resume reuses them. The results file is rewritten after every finished
sample.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import kvpolicy
from kvpolicy.diagnostics import did_you_mean
from kvpolicy.errors import KvpolicyError
from kvpolicy.library import shipped_names

from . import decode_tasks
from . import memory as mem
from . import report
from . import tasks as task_mod
from .progress import Progress
from .results import Store, check_writable, command_line, environment

MODEL = "smollm2-135m"
MAX_CONTEXT = 8192  # SmolLM2's max_position_embeddings
ANSWER_SLACK = 8  # greedy decoding may emit this many tokens beyond the answer's length


class EvalError(KvpolicyError):
    """Bad input to `kvpolicy eval` (exit 2)."""


@dataclass
class Config:
    policies: dict  # label -> kvpolicy.Policy (default params), in order, "full" first
    tasks: list[str]
    context: int
    memories: list[float]
    samples: int
    seed: int
    text_tokens: int
    json_path: Path
    png_path: Path | None = None
    resume: bool = False
    argv: list[str] | None = None
    prompt_tokens: int = 0
    threads: int | None = None
    quiet: bool = False
    regime: str = "prefill"  # prefill: compress the prompt, short answer; decode: compress while generating (decode.py)
    continuation: int = 0  # decode regime: tokens after the prompt

    def identity(self) -> dict:
        """What makes two runs the same experiment (everything but --samples)."""
        return {
            "model": MODEL,
            "context": self.context,
            "prompt_tokens": self.prompt_tokens,
            "seed": self.seed,
            "tasks": list(self.tasks),
            "memories": list(self.memories),
            "text_tokens": self.text_tokens,
            "policies": {label: pol.hash for label, pol in self.policies.items()},
            "policy_order": list(self.policies),
        } | ({"regime": "decode", "continuation": self.continuation} if self.regime == "decode" else {})


# ----------------------------------------------------------------- validation


def _split(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",")]
    if not items or any(not x for x in items):
        raise EvalError(f"--{what} expects a comma-separated list, got {text!r}")
    out: list[str] = []
    for x in items:
        if x in out:
            raise EvalError(f"--{what} lists {x!r} twice")
        out.append(x)
    return out


def parse_memories(text: str) -> list[float]:
    values = []
    for item in _split(text, "memory"):
        try:
            value = float(item)
        except ValueError:
            raise EvalError(f"--memory expects fractions in (0, 1], got {item!r}") from None
        if not 0 < value <= 1:
            raise EvalError(f"--memory {item} is outside (0, 1]: it is a fraction of the full cache's bytes (0.25 = 25%)")
        values.append(value)
    return sorted(values)


def parse_tasks(text: str, regime: str = "prefill") -> list[str]:
    names = _split(text, "task")
    known, other = (decode_tasks.TASKS, task_mod.TASKS) if regime == "decode" else (task_mod.TASKS, decode_tasks.TASKS)
    for name in names:
        if name in other:
            raise EvalError(f"task {name!r} belongs to the {'prefill' if regime == 'decode' else 'decode'} regime "
                            f"(--regime {regime} tasks: {', '.join(known)})")
        if name not in known:
            raise EvalError(f"unknown task {name!r}{did_you_mean(name, known)} (tasks: {', '.join(known)})")
    return names


def check_decode_policies(policies: dict) -> None:
    """The decode regime compares at equal peak memory over the generation:
    a policy that compresses only at prefill holds every generated token."""
    for label, pol in policies.items():
        if label == "full":
            continue
        if mem.prefill_only(pol):
            form = f"{pol.name}_decode"
            hint = f"; its decode-time form is {form}" if form in shipped_names() else ""
            raise EvalError(f"{label} compresses only at prefill: in the decode regime it holds every generated token, "
                            f"so it is not comparable at equal peak memory{hint}")
        if mem.classify(pol) in ("unsized", "reference"):
            raise EvalError(f"{label} has no size param (budget or p): it cannot be sized to a peak memory")


def load_policies(text: str) -> dict:
    """Label -> Policy; the full cache is always the reference, listed first."""
    policies = {}
    for label in _split(text, "policy"):
        policies[label] = kvpolicy.load(label)  # unknown name -> KvpolicyError, invalid file -> PolicyError
    if "full" not in policies:
        policies = {"full": kvpolicy.load("full")} | policies
    else:
        policies = {"full": policies.pop("full")} | policies
    if policies["full"].name != "full" or mem.classify(policies["full"]) != "reference":
        raise EvalError("'full' must name the shipped full-cache policy")
    return policies


def validate(policy: str, task: str, context: int, memory: str, samples: int, seed: int, text_tokens: int,
             json_path: str, png_path: str | None = None, resume: bool = False, argv: list[str] | None = None,
             threads: int | None = None, regime: str = "prefill", continuation: int = 1024) -> Config:
    """Every check that needs no model: names, ranges, output paths, and
    that each fixed-size policy compiles at each memory fraction."""
    tasks = parse_tasks(task, regime)
    memories = parse_memories(memory)
    if regime == "decode" and not 64 <= continuation <= 4096:
        raise EvalError("--continuation must be between 64 and 4096 tokens")
    if context > MAX_CONTEXT:
        raise EvalError(f"--context {context} is longer than {MODEL} supports ({MAX_CONTEXT} tokens)")
    least = decode_tasks.MIN_CONTEXT if regime == "decode" else task_mod.MIN_CONTEXT
    if context < least:
        raise EvalError(f"--context {context} is too short: at least {least} tokens")
    if samples < 1:
        raise EvalError("--samples must be at least 1")
    if seed < 0:
        raise EvalError("--seed must be a non-negative integer")
    if not 1 <= text_tokens <= 1024:
        raise EvalError("--text-tokens must be between 1 and 1024")
    if threads is not None and not 1 <= threads <= 256:
        raise EvalError("--threads must be between 1 and 256")
    reserve = continuation if regime == "decode" else max(text_tokens if "text" in tasks else 0, 24)
    prompt_tokens = min(context, MAX_CONTEXT - reserve)
    policies = load_policies(policy)
    if regime == "decode":
        check_decode_policies(policies)
    for label, pol in policies.items() if regime == "prefill" else ():  # the decode regime searches every size
        method = mem.classify(pol)
        for fraction in memories:
            if method == "search":
                start = mem.fixed_budget(fraction, prompt_tokens) if mem.knob(pol) == "budget" else pol.ir.params["p"].value
                mem.sized(pol, {mem.knob(pol): start})
            else:
                mem.plan_fixed(label, pol, fraction, prompt_tokens)
    json_out = Path(json_path)
    check_writable(json_out, "--json")
    png_out = Path(png_path) if png_path else None
    if png_out is not None:
        if png_out.suffix.lower() != ".png":
            raise EvalError(f"--png {png_path} must end in .png")
        check_writable(png_out, "--png")
        if png_out.resolve() == json_out.resolve():
            raise EvalError("--png and --json name the same file")
    config = Config(policies, tasks, context, memories, samples, seed, text_tokens, json_out, png_out, resume, argv, prompt_tokens, threads,
                    regime=regime, continuation=continuation if regime == "decode" else 0)
    if resume and json_out.exists():
        Store.resume(json_out, config.identity(), command_line(argv), samples)  # a mismatch fails here
    return config


# ----------------------------------------------------------------- running


def _record_stats(stats) -> dict:
    kept = [count for layer in stats.kept for count in layer]
    return {
        "kv_bytes": stats.kv_bytes,
        "kv_bytes_full": stats.kv_bytes_full,
        "peak_kv_bytes": stats.peak_kv_bytes,
        "held": stats.kv_bytes / stats.kv_bytes_full if stats.kv_bytes_full else 1.0,
        "kept_max": max(kept) if kept else 0,
        "kept_mean": round(sum(kept) / len(kept), 1) if kept else 0,
        "compressions": stats.compressions,
        "prefill_seconds": round(stats.prefill_seconds, 3),
        "compress_seconds": round(stats.compress_seconds, 3),
    }


class Evaluator:
    """Runs one sample under the full cache and under each sized policy."""

    def __init__(self, model, tok):
        import torch

        from . import metrics

        self.model, self.tok, self.torch, self.metrics = model, tok, torch, metrics

    def ids(self, sample):
        return self.torch.tensor([list(sample.prompt_ids)])

    def prefill(self, sample, window: int, states: list) -> list:
        """The sample's full-cache prefills, shared by every policy that
        compresses after the prefill (backends/hf/prefill.py: bit-identical
        forks): one plain, and one accumulating `states` when some policy
        needs them."""
        ids = self.ids(sample)
        shared = [kvpolicy.hf.prefill(self.model, ids, window=window)]
        if states:
            shared.append(kvpolicy.hf.prefill(self.model, ids, window=window, states=states))
        return shared

    def held_after_prefill(self, sample, policy, prefilled=None) -> float:
        stats = kvpolicy.hf.score(self.model, self.ids(sample), [sample.answer_ids[0]], policy=policy, prefilled=prefilled).stats
        return stats.kv_bytes / stats.kv_bytes_full

    def run(self, sample, policy, reference=None, prefilled=None) -> tuple[dict, object]:
        """One teacher-forced pass (KL, top-1, ppl, log P(answer)); greedy
        decoding only when the teacher-forced argmax leaves the gold answer."""
        m = self.metrics
        start = time.perf_counter()
        answer = list(sample.answer_ids)
        scored = kvpolicy.hf.score(self.model, self.ids(sample), answer, policy=policy, prefilled=prefilled)
        lp = scored.logprobs
        ref = lp if reference is None else reference
        kl = m.kl_per_position(ref, lp)
        record = {
            "kl": float(kl.mean()),
            "kl_max": float(kl.max()),
            "top1": m.top1_agreement(ref, lp),
            "ppl": m.perplexity(lp, answer),
            "answer_logprob": m.sequence_logprob(lp, answer) if sample.answer is not None else None,
            "correct": None,
            "output": None,
            "greedy": None,
        }
        if sample.answer is not None:
            if m.greedy_follows(lp, answer):
                record.update(correct=True, greedy="teacher-forced")  # greedy emits the gold tokens first
            else:
                res = kvpolicy.hf.generate(self.model, self.tok, self.ids(sample), policy=policy,
                                           max_new_tokens=len(answer) + ANSWER_SLACK, prefilled=prefilled)
                record.update(correct=m.contains_answer(res.text, sample.answer), output=res.text, greedy="generated")
        record.update(_record_stats(scored.stats))
        record["seconds"] = round(time.perf_counter() - start, 3)
        return record, lp


def sample_header(sample) -> dict:
    return {
        "id": sample.id,
        "task": sample.task,
        "index": sample.index,
        "seed": sample.seed,
        "fingerprint": sample.fingerprint,
        "prompt_tokens": len(sample.prompt_ids),
        "continuation_tokens": len(sample.answer_ids),
        "answer": sample.answer,
        "depth": None if sample.depth is None else round(sample.depth, 4),
        "requested_depth": sample.requested_depth,
        "question": sample.question,
        "details": sample.details,
    }


def run(config: Config) -> int:
    command = command_line(config.argv)
    identity = config.identity()
    if config.resume:
        store = Store.resume(config.json_path, identity, command, config.samples)
    else:
        store = Store.new(config.json_path, identity, command, config.samples)
    work = [(t, i) for t in config.tasks for i in range(config.samples) if (t, i) not in store.done()]
    if store.samples and config.resume:
        print(f"kvpolicy eval: resuming {config.json_path}: {len(store.samples)} samples done, {len(work)} to run", file=sys.stderr)
    if work:
        if config.regime == "decode":
            from . import decode

            decode.run_samples(config, store, work)
        else:
            _run_samples(config, store, work)
    finished = all((t, i) in store.done() for t in config.tasks for i in range(config.samples))
    store.save(complete=finished)
    sys.stdout.write(report.table_text(store.data))
    if config.png_path is not None:
        report.plot(store.data, config.png_path)
        print(f"kvpolicy eval: plot written to {config.png_path}", file=sys.stderr)
    print(f"kvpolicy eval: results written to {config.json_path}", file=sys.stderr)
    return 0


def _run_samples(config: Config, store: Store, work: list[tuple[str, int]]) -> None:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    model, tok = kvpolicy.models.load(MODEL)
    env = environment(MODEL, str(kvpolicy.models.path(MODEL)))
    env["policy_hashes"] = {label: pol.hash for label, pol in config.policies.items()}
    if store.data["environment"]:  # resumed: the first run's environment stays, this one is logged
        store.data.setdefault("history", [{}])[-1]["environment"] = env
    else:
        store.data["environment"] = env
    for done in store.samples:  # the samples kept must be the ones this machine generates
        again = task_mod.make(done["task"], tok, config.prompt_tokens, config.seed, done["index"], config.text_tokens)
        if again.fingerprint != done["fingerprint"]:
            raise EvalError(f"{done['id']} in {config.json_path} differs from the sample generated here "
                            "(another tokenizer or other prose on this machine); drop --resume")
    evaluator = Evaluator(model, tok)
    settings = {(s["policy"], s["memory"]): mem.Setting.from_json(s) for s in store.settings}
    sized_policies: dict[tuple, object] = {}
    plan = []  # (label, memory) pairs run per sample, after the reference
    for label, pol in config.policies.items():
        method = mem.classify(pol)
        if method in ("reference", "unsized"):
            if label != "full":
                plan.append((label, None))
        else:
            plan.extend((label, fraction) for fraction in config.memories)
    progress = Progress(len(work) * (1 + len(plan)), quiet=config.quiet)
    window = max(pol.ir.observe or 0 for pol in config.policies.values())  # sizing only shrinks windows
    states = [state for pol in config.policies.values() for state in pol.ir.states]

    def policy_for(label: str, fraction, sample, prefilled):
        key = (label, fraction)
        if key in sized_policies:
            return sized_policies[key]
        base = config.policies[label]
        if key in settings:
            setting = settings[key]
            sized_policy = mem.sized(base, setting.params)[0] if setting.params else base
        else:
            method = mem.classify(base)
            if method == "search":
                progress.note(f"sizing {label} to {fraction:g} of the full cache on {sample.id} (measured search)")

                def measure(policy):
                    held = evaluator.held_after_prefill(sample, policy, prefilled)
                    shown = ", ".join(f"{k}={v}" for k, v in policy.params().items() if k in ("budget", "p"))
                    progress.note(f"  {label} {shown}: holds {held:.1%}")
                    return held

                setting, sized_policy = mem.plan_search(label, base, fraction, config.prompt_tokens, measure)
                setting.how += f" [on {sample.id}]"
            else:
                setting, sized_policy = mem.plan_fixed(label, base, 1.0 if fraction is None else fraction, config.prompt_tokens)
                setting.memory = fraction
            settings[key] = setting
            store.add_setting(setting.to_json())
        sized_policies[key] = sized_policy
        return sized_policy

    try:
        for task, index in work:
            try:
                sample = task_mod.make(task, tok, config.prompt_tokens, config.seed, index, config.text_tokens)
            except ValueError as err:
                raise EvalError(f"cannot generate {task}#{index}: {err}") from None
            record = sample_header(sample)
            progress.step(f"{sample.id} full")
            prefilled = evaluator.prefill(sample, window, states)
            full_run, reference = evaluator.run(sample, config.policies["full"], prefilled=prefilled)
            full_run.update(policy="full", memory=1.0, params={}, policy_hash=config.policies["full"].hash)
            runs = [full_run]
            for label, fraction in plan:
                policy = policy_for(label, fraction, sample, prefilled)
                progress.step(f"{sample.id} {label}" + ("" if fraction is None else f"@{fraction:g}"))
                result, _ = evaluator.run(sample, policy, reference, prefilled)
                result.update(policy=label, memory=fraction, params=settings[(label, fraction)].params, policy_hash=policy.hash)
                runs.append(result)
            record["runs"] = runs
            store.add_sample(record)
            store.save()
            progress.sample_done(sample.id, _summary(runs))
    except KeyboardInterrupt:
        progress.finish()
        print(f"kvpolicy eval: interrupted; {len(store.samples)} finished samples are in {config.json_path} (--resume continues)", file=sys.stderr)
        raise
    progress.finish()


def _summary(runs: list[dict]) -> str:
    judged = [r for r in runs if r["correct"] is not None]
    text = f"mean KL {sum(r['kl'] for r in runs) / len(runs):.3g}"
    if judged:
        text += f", {sum(r['correct'] for r in judged)}/{len(judged)} runs correct"
    return text
