"""`make demo`: compile every shipped policy and say what it keeps; then run
two of them on SmolLM2 over a long prompt, side by side with the full cache.

    python -m kvpolicy.demo [--tokens 1500] [--budget-fraction 0.25]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import library
from .errors import KvpolicyError
from .explain import explain
from .manifest import write_manifest
from .policy import compile_text
from .texts import english_text

PASSKEY = "71432"


def compile_all(out_dir: Path) -> None:
    print(f"== {len(library.shipped_names())} shipped policies, compiled into {out_dir}/\n")
    for name, text in library.shipped().items():
        policy = compile_text(text, f"policies/{name}.kvp")
        write_manifest(out_dir / name, policy, "torch", f"policies/{name}.kvp")
        print(explain(policy))


def passkey_prompt(tok, tokens: int):
    """Prose with a pass key buried in the middle, asked through the chat template."""
    filler = english_text(tokens * 5)
    ids = tok(filler).input_ids[:tokens]
    half = tok.decode(ids[: len(ids) // 2]), tok.decode(ids[len(ids) // 2 :])
    document = f"{half[0]}\nThe secret pass key is {PASSKEY}. Remember it.\n{half[1]}"
    messages = [{"role": "user", "content": document + "\n\nWhat is the secret pass key?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "The secret pass key is"
    return tok(text, return_tensors="pt").input_ids


def run_model(tokens: int, fraction: float) -> None:
    from . import load, models
    from .backends.hf import generate

    model, tok = models.load("smollm2-135m")
    prompt = passkey_prompt(tok, tokens)
    budget = int(prompt.shape[1] * fraction)
    print(f"== SmolLM2-135M, {prompt.shape[1]}-token prompt with a pass key in the middle; budget {budget} tokens ({fraction:.0%})\n")
    rows, full_speed = [], None
    for name, params in [("full", {}), ("snapkv", {"budget": budget}), ("streaming_llm", {"budget": budget})]:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        res = generate(model, tok, prompt, policy=load(name, **params), max_new_tokens=12)
        s = res.stats
        speed = s.decode_tokens_per_second
        full_speed = full_speed or speed
        found = "yes" if PASSKEY in res.text else "no"
        rows.append((name, res.text.strip().replace("\n", " ")[:40], found, s.kv_bytes / 2**20, s.kv_fraction, speed, speed / full_speed))
    print(f"{'policy':<14} {'answer':<42} {'key?':<5} {'KV MiB':>7} {'of full':>8} {'tok/s':>6} {'vs full':>8}")
    for name, answer, found, mib, frac, speed, ratio in rows:
        print(f"{name:<14} {answer:<42} {found:<5} {mib:>7.1f} {frac:>8.1%} {speed:>6.1f} {ratio:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1500, help="prompt length in tokens")
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--no-model", action="store_true", help="only compile and explain")
    args = parser.parse_args()
    try:
        compile_all(Path("build/demo"))
        if not args.no_model:
            run_model(args.tokens, args.budget_fraction)
    except KvpolicyError as err:  # e.g. the model package is missing: say what to do
        sys.exit(f"kvpolicy demo: error: {err}")


if __name__ == "__main__":
    main()
