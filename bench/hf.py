"""Benchmark: policies on SmolLM2 in the HF engine, against the full cache
run in the same process (not a test; prints ratios).

    python -m bench.hf [--tokens 4096] [--fraction 0.25] [--new 64] [--policies snapkv,h2o,...]

For each policy: KV bytes held at the end vs full, how many tokens per kv
head those bytes pay for and how far that is over the budget (target: within
one 128-token block), decode tokens/s vs full, and compression time as a
share of decode time (target < 10%). Tokens per head: the fullest head under
flatten_max (every head of a layer is padded to it), the fullest layer's mean
under flatten_sum (each head holds only its own).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

import kvpolicy
from kvpolicy import ir
from kvpolicy.backends.hf import generate
from kvpolicy.program import sized_by_scores, storage_layout
from kvpolicy.texts import english_text

DEFAULT = "snapkv,pyramidkv,adakv,tova,knorm,streaming_llm,h2o,rkv,topp,hardkv"
BLOCK = 128  # vLLM CPU block size: the unit a paged engine frees memory in


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--new", type=int, default=64, help="tokens to decode")
    parser.add_argument("--policies", default=DEFAULT)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = kvpolicy.models.load("smollm2-135m")
    ids = tok(english_text(args.tokens * 6), return_tensors="pt").input_ids[:, : args.tokens]
    budget = int(args.tokens * args.fraction)
    print(f"SmolLM2-135M, {ids.shape[1]}-token prompt, {args.new} decoded tokens, budget {budget} ({args.fraction:.0%}), {args.threads} threads")

    print(f"\n{'policy':<14} {'KV MiB':>7} {'of full':>8} {'tok/head':>9} {'over budget':>12} {'decode tok/s':>13} {'vs full':>8} {'compress/decode':>16}", flush=True)
    full = None
    for name in ["full"] + [n for n in args.policies.split(",") if n]:
        base = kvpolicy.load(name)
        params = {"budget": budget} if "budget" in base.ir.params else {}
        print(f"  {name} ...", file=sys.stderr, flush=True)
        res = generate(model, tok, ids, policy=base.with_params(**params), max_new_tokens=args.new, stop_at_eos=False)
        s = res.stats
        full = full or s
        if storage_layout(base.ir) == "flatten_sum":
            most = max(math.ceil(sum(layer) / len(layer)) for layer in s.kept)
        else:
            most = max(max(layer) for layer in s.kept)
        over = most - (budget + s.new_tokens - 1)
        over_text = "-" if name == "full" or sized_by_scores(base.ir) else f"{over:+d} {'ok' if over <= BLOCK else 'OVER'}"
        share = s.decode_compress_seconds / s.decode_seconds if s.decode_seconds else 0.0
        print(
            f"{name:<14} {s.kv_bytes / 2**20:>7.1f} {s.kv_fraction:>8.1%} {most:>9} {over_text:>12} "
            f"{s.decode_tokens_per_second:>13.1f} {s.decode_tokens_per_second / full.decode_tokens_per_second:>7.2f}x {share:>15.1%}",
            flush=True,
        )
    print("\n'-': top-p policies (topp, hardkv, hardkv_rkv) size each head by its attention, not by the budget.")


if __name__ == "__main__":
    main()
