"""Benchmark: check + compile time per shipped policy (not a test).

    python -m bench.compile [--repeat N]

Prints, per policy, the median time of parse + check + IR + manifest JSON,
after the parser is built once (import and grammar load are reported apart).
Target: under 50 ms each.
"""
from __future__ import annotations

import argparse
import statistics
import time

from kvpolicy import library, syntax
from kvpolicy.manifest import manifest
from kvpolicy.policy import compile_text

TARGET_MS = 50.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    start = time.perf_counter()
    syntax.parser()
    grammar_ms = (time.perf_counter() - start) * 1e3
    print(f"grammar load (once per process): {grammar_ms:.1f} ms")
    print(f"{'policy':<16} {'lines':>5} {'median ms':>10} {'max ms':>8}  target < {TARGET_MS:.0f} ms")
    worst = 0.0
    for name, text in library.shipped().items():
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            policy = compile_text(text, f"policies/{name}.kvp")
            manifest(policy, "torch", name)
            times.append((time.perf_counter() - t0) * 1e3)
        median = statistics.median(times)
        worst = max(worst, median)
        print(f"{name:<16} {len(text.splitlines()):>5} {median:>10.2f} {max(times):>8.2f}  {'ok' if median < TARGET_MS else 'SLOW'}")
    print(f"slowest median: {worst:.2f} ms ({'within' if worst < TARGET_MS else 'over'} the {TARGET_MS:.0f} ms target)")


if __name__ == "__main__":
    main()
