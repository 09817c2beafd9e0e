"""The `kvpolicy eval` subcommand: flags, suites of defaults, --quick."""
from __future__ import annotations

import argparse

from .decode_tasks import DESCRIPTIONS as DECODE_DESCRIPTIONS
from .tasks import DESCRIPTIONS

# The README's "Choosing a policy" table comes from the default suite.
DEFAULTS = {
    "policy": "full,snapkv,streaming_llm,h2o,pyramidkv,adakv,tova,knorm,topp,hardkv",
    "task": "passkey,text",
    "context": 1024,
    "memory": "0.1,0.25,0.5",
    "samples": 3,
}
QUICK = {
    "policy": "full,snapkv,streaming_llm,tova,knorm",
    "task": "passkey,text",
    "context": 1024,
    "memory": "0.25",
    "samples": 2,
}
# docs/hardkv.md: HARD-KV against the baselines at 4k tokens, the issue's
# comparison in full (both HARD-KV flavours, every retrieval task, two
# needle depths), sized to take under 30 minutes on 2 cores.
HARDKV = {
    "policy": "full,hardkv,hardkv_rkv,snapkv,rkv,h2o,streaming_llm,adakv,topp",
    "task": "passkey,needle,multikey,vartrack,text",
    "context": 4096,
    "memory": "0.1,0.25,0.5",
    "samples": 2,
}
HARDKV_QUICK = {
    "policy": "full,hardkv,snapkv",
    "task": "passkey",
    "context": 4096,
    "memory": "0.25",
    "samples": 1,
}
# docs/hardkv.md, decode regime: compression while the model generates, at
# equal PEAK memory over the continuation (kvpolicy/evaluate/decode.py).
# 2048-token traces: 10% of a shorter cache is less than the papers'
# 128-token buffer plus a useful budget.
DECODE = {
    "policy": "full,hardkv_decode,snapkv_decode,adakv_decode,pyramidkv_decode,rkv",
    "task": "reasoning,prose",
    "context": 128,
    "continuation": 2048,
    "memory": "0.1,0.25,0.5",
    "samples": 1,
}
DECODE_QUICK = {
    "policy": "full,hardkv_decode,rkv",
    "task": "reasoning",
    "context": 128,
    "continuation": 256,
    "memory": "0.5",
    "samples": 1,
}
SUITES = {"choosing": (DEFAULTS, QUICK), "hardkv": (HARDKV, HARDKV_QUICK), "decode": (DECODE, DECODE_QUICK)}


def add_parser(sub) -> argparse.ArgumentParser:
    tasks = "; ".join(f"{name}: {text}" for name, text in DESCRIPTIONS.items())
    p = sub.add_parser(
        "eval",
        help="quality of policies against the full cache at equal KV memory, on SmolLM2",
        description=(
            "Run policies on generated tasks at equal physical KV memory and compare each with the full cache: "
            "accuracy, log-likelihood of the answer, KL(full || policy), top-1 agreement, perplexity. "
            f"Tasks: {tasks}."
        ),
    )
    p.add_argument("--policy", metavar="NAME_OR_FILE[,...]", help=f"policies (default: {DEFAULTS['policy']}); full is always the reference")
    p.add_argument("--task", metavar="TASK[,...]", help=f"tasks (default: {DEFAULTS['task']})")
    p.add_argument("--context", type=int, metavar="N", help=f"prompt length in tokens, at most 8192 (default: {DEFAULTS['context']})")
    p.add_argument("--memory", metavar="FRACTION[,...]", help=f"KV memory as a fraction of the full cache's bytes, in (0, 1] (default: {DEFAULTS['memory']})")
    p.add_argument("--samples", type=int, metavar="N", help=f"samples per task (default: {DEFAULTS['samples']})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the generated samples (default: 0)")
    p.add_argument("--text-tokens", type=int, default=32, metavar="N", help="continuation length of the text task (default: 32)")
    p.add_argument("--regime", choices=("prefill", "decode"),
                   help="prefill (default): the prompt is compressed, a short answer follows; decode: a short prompt "
                   "(--context) and a long continuation (--continuation) during which policies compress, sized by "
                   "PEAK bytes; tasks: " + "; ".join(f"{k}: {v}" for k, v in DECODE_DESCRIPTIONS.items())
                   + " (--suite decode sets it)")
    p.add_argument("--continuation", type=int, metavar="N", help=f"decode regime: tokens after the prompt (default: {DECODE['continuation']})")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's own, one per core)")
    p.add_argument("--json", required=True, metavar="OUT", help="results file, rewritten after every finished sample")
    p.add_argument("--png", metavar="OUT", help="plot of quality vs KV memory, one line per policy")
    p.add_argument("--resume", action="store_true", help="skip the samples already in --json (same options)")
    p.add_argument("--suite", choices=SUITES, default="choosing",
                   help="a set of defaults: choosing (README's table), hardkv (docs/hardkv.md: "
                   + ", ".join(f"--{k} {v}" for k, v in HARDKV.items()) + ") or decode (docs/hardkv.md, decode regime: --regime decode, "
                   + ", ".join(f"--{k} {v}" for k, v in DECODE.items()) + ")")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: " + ", ".join(f"--{k} {v}" for k, v in QUICK.items())
                   + " (--suite hardkv: " + ", ".join(f"--{k} {v}" for k, v in HARDKV_QUICK.items())
                   + "; --suite decode: " + ", ".join(f"--{k} {v}" for k, v in DECODE_QUICK.items()) + "); flags given explicitly win")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from . import runner

    full_size, quick = SUITES[args.suite]
    regime = args.regime or ("decode" if args.suite == "decode" else "prefill")
    if regime == "decode" and args.suite != "decode":
        full_size, quick = DECODE, DECODE_QUICK  # the decode regime's own defaults
    base = quick if args.quick else full_size
    value = {key: getattr(args, key) if getattr(args, key) is not None else default for key, default in base.items()}
    config = runner.validate(
        policy=value["policy"],
        task=value["task"],
        context=value["context"],
        memory=str(value["memory"]),
        samples=value["samples"],
        seed=args.seed,
        text_tokens=args.text_tokens,
        json_path=args.json,
        png_path=args.png,
        resume=args.resume,
        argv=args.argv,
        threads=args.threads,
        regime=regime,
        continuation=value.get("continuation") or 0,
    )
    return runner.run(config)
