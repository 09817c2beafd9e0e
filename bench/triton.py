"""Benchmark: the Triton backend per shipped policy (not a test).

    python -m bench.triton [--repeat N] [--seed S]

Prints, per policy: codegen time (median of render: lowering + module text,
target < 200 ms), generated lines, and how many (policy x kernel) pairs were
verified equal to the torch backend in this run, on one random layer
(2 kv heads, GQA 3, 70 tokens, holes): every fused/signal step against the
torch evaluator of its expression (1e-5 relative), the selection kernels
through the whole decision (exact kept set), compaction (bit-exact copy) and
decode over the decision's kept tokens (1e-5). Without CUDA the kernels run
in Triton's interpreter, so no kernel times are printed: those are GPU
measurements (docs/triton.md says which).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import kvpolicy
from kvpolicy import library
from kvpolicy.backends.torch import LayerInputs, ModelShape, TorchPolicy
from kvpolicy.backends.torch.evaluate import Evaluator
from kvpolicy.backends.triton import interpret, launch, render
from kvpolicy.backends.triton.engine import TritonPolicy

TARGET_MS = 200.0
SMALL = {"budget": 24, "window": 6, "recent": 8, "sinks": 2, "residual": 16, "buffer": 4}


def _layer(seed: int):
    g = torch.Generator().manual_seed(seed)
    hkv, group, t, d = 2, 3, 70, 16
    valid = torch.rand(hkv, t, generator=g) > 0.2
    valid[:, -1] = True
    return dict(shape=ModelShape(1, hkv * group, hkv, d), keys=torch.randn(hkv, t, d, generator=g), values=torch.randn(hkv, t, d, generator=g),
                valid=valid, queries=torch.randn(hkv * group, 6, d, generator=g), query_pos=torch.arange(t - 6, t),
                states={"acc": torch.rand(hkv, t, generator=g)})


def _inputs(layer) -> LayerInputs:
    hkv, t = layer["valid"].shape
    return LayerInputs(layer["keys"].clone(), layer["values"].clone(), layer["valid"].clone(), torch.arange(t).expand(hkv, t).clone(),
                       states={k: v.clone() for k, v in layer["states"].items()})


def _equal(got, want) -> bool:
    if not want.is_floating_point():
        return torch.equal(got.reshape(want.shape), want)
    got = got.reshape(want.shape)
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        return False
    return bool(torch.allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6))


def verify(policy, layer) -> tuple[int, list[str]]:
    """(pairs verified, kernels that disagreed) for one policy on one layer."""
    a, b = TorchPolicy(policy, layer["shape"]), TritonPolicy(policy, layer["shape"])
    runs = []
    for engine in (a, b):
        run = engine.new_sequence()
        engine.observe(run, 0, layer["queries"], layer["query_pos"])
        runs.append(run)
    want, got = a.compress_layer(runs[0], 0, _inputs(layer)), b.compress_layer(runs[1], 0, _inputs(layer))
    inputs = _inputs(layer)
    b._observed(runs[1], 0, inputs)
    cal = {c.name: runs[0].temperatures[(c.name, 0)].expand(inputs.num_kv) for c in policy.ir.calibrations}
    buffers = launch.run_steps(b.kernels, b.rendered.steps, inputs, cal)
    evaluator = Evaluator(policy.ir, inputs, cal)
    ok, bad = 0, []
    for step in b.rendered.steps:
        kind, expr = b.rendered.lowering.computes.get(step.out.id, (None, None))
        if expr is None:
            continue  # an intermediate of a signal (checked through the step that consumes it)
        reference = evaluator.token_scores(expr) if kind == "token_scores" else evaluator._eval(expr)
        ok, bad = (ok + 1, bad) if _equal(buffers[step.out.id], reference) else (ok, bad + [step.kernel])
    if not policy.ir.compresses:
        return ok, bad
    decided = torch.equal(got.kept, want.kept) and (want.values is None or torch.allclose(got.values, want.values, rtol=1e-5, atol=1e-6))
    ok, bad = (ok + 1, bad) if decided else (ok, bad + ["select_rows"])
    idx, count = launch.compact(b.kernels, got.kept)
    packed = launch.gather_kept(b.kernels, inputs.keys, idx, count, "flatten_sum")
    copied = torch.equal(packed, torch.cat([inputs.keys[h][got.kept[h]] for h in range(inputs.num_kv)]))
    ok, bad = (ok + 1, bad) if copied else (ok, bad + ["compact+gather_kept"])
    q = torch.randn(1, layer["shape"].num_q_heads, inputs.keys.shape[-1])
    width = int(count.max())
    tier = launch.Tier(launch.gather_kept(b.kernels, inputs.keys, idx, count, "flatten_max")[None], launch.gather_kept(b.kernels, inputs.values, idx, count, "flatten_max")[None], count[None])
    out, _ = launch.decode(b.kernels, q, [tier], inputs.keys.shape[-1])
    group = q.shape[1] // inputs.num_kv
    dense = torch.stack([torch.softmax(inputs.keys[h // group][got.kept[h // group]] @ q[0, h] / math.sqrt(q.shape[-1]), 0) @ inputs.values[h // group][got.kept[h // group]] for h in range(q.shape[1])])
    ok, bad = (ok + 1, bad) if width and torch.allclose(out[0], dense, rtol=1e-5, atol=1e-5) else (ok, bad + ["decode_tier+lse_merge"])
    return ok, bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    interpret.ensure()
    print(f"device: {'CUDA ' + torch.cuda.get_device_name() if interpret.cuda_present() else 'none: Triton interpreter (TRITON_INTERPRET=1)'}")
    print(f"{'policy':<16} {'codegen ms':>10} {'lines':>6} {'jit fns':>8} {'verified':>9}  disagreed")
    total_ok = total = 0
    worst = 0.0
    layer = _layer(args.seed)
    for name in library.shipped_names():
        params = kvpolicy.load(name).ir.params
        policy = kvpolicy.load(name, **{k: v for k, v in SMALL.items() if k in params})
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            rendered = render.render(policy)
            times.append((time.perf_counter() - start) * 1e3)
        ms = statistics.median(times)
        worst = max(worst, ms)
        kernels = len(set(__import__("re").findall(r"^def ([a-z]\w*)\(", rendered.body, flags=__import__("re").M)))
        ok, bad = verify(policy, layer)
        total_ok += ok
        total += ok + len(bad)
        print(f"{name:<16} {ms:>10.1f} {rendered.lines:>6} {kernels:>8} {ok:>4}/{ok + len(bad):<4}  {', '.join(bad) or '-'}")
    print(f"verified (policy x kernel) pairs: {total_ok}/{total}; slowest codegen {worst:.1f} ms (target < {TARGET_MS:.0f} ms)")
    if interpret.cuda_present():
        print("GPU kernel timings: not implemented in this benchmark yet (see docs/triton.md)")


if __name__ == "__main__":
    main()
