"""HARD-KV variants in the decode regime, at the params `kvpolicy eval
--regime decode` sized hardkv_decode to (docs/hardkv.md, decode regime).

    python docs/hardkv/variants.py RESULTS.json MEMORY POLICY[,POLICY...]

Reads the first sample of RESULTS.json (its prompt is regenerated from the
task and seed; a reasoning trace is read from the file), scores it with the
full cache and with each policy (a name or a .kvp file) at hardkv_decode's
sized params for MEMORY, and prints peak and mean bytes, compressions, KL,
top-1 and ppl over the continuation. The variants are not searched again:
their own peak is printed beside their quality.
"""
from __future__ import annotations

import json
import sys

import torch

import kvpolicy
from kvpolicy.evaluate import decode, decode_tasks


def main(path: str, memory: float, labels: list[str]) -> None:
    data = json.loads(open(path).read())
    config, sample = data["config"], data["samples"][0]
    setting = next(s for s in data["settings"] if s["policy"] == "hardkv_decode" and s["memory"] == memory)
    model, tok = kvpolicy.models.load("smollm2-135m")
    made = decode_tasks.make(sample["task"], tok, config["prompt_tokens"], config["seed"], sample["index"], config["continuation"])
    tokens = sample["continuation_ids"] or list(made.answer_ids)
    ids = torch.tensor([list(made.prompt_ids)])
    reference = kvpolicy.hf.score(model, ids, tokens, policy="full").logprobs
    print(f"{sample['id']}, params {setting['params']} (hardkv_decode at {memory:g})")
    print(f"{'policy':<26} {'peak':>7} {'mean':>7} {'events':>6} {'KL':>8} {'top-1':>6} {'ppl':>7}")
    for label in labels:
        policy = kvpolicy.load(label, **setting["params"])
        scored = kvpolicy.hf.score(model, ids, tokens, policy=policy)
        q, st = decode.quality(reference, scored.logprobs, tokens), decode.stats_record(scored.stats)
        print(f"{policy.name:<26} {st['peak']:>7.1%} {st['mean']:>7.1%} {len(st['compression_steps']):>6} {q['kl']:>8.4f} {q['top1']:>6.0%} {q['ppl']:>7.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3].split(","))
