"""The Triton backend: kernels generated per policy from fixed templates
(docs/triton.md). Without CUDA they run in Triton's interpreter, chosen in
kvpolicy.backends before triton is first imported.

Registered as `BACKEND`: the operations it lowers come from its own tables
(lowering.EMITTERS for expressions; the selection, layer-shape and solver
operations the engine runs), so a new emitter is a new supported operation.
"""
import torch

from kvpolicy.ops import OPS

from ..registry import Backend
from .lowering import EMITTERS

# run by TritonPolicy: selections through select_rows, per-layer counts on the
# host, adam on the torch side and bisect by kernel (engine.py)
_ENGINE = ("top_k", "top_p", "first", "last", "threshold", "union", "uniform", "pyramid", "linear", "adam", "bisect")


def _lowered() -> frozenset[str]:
    return frozenset(name for name in (*_ENGINE, *EMITTERS) if name in OPS)


def _build(policy, program):
    from .engine import TritonPolicy

    return TritonPolicy(policy, program.shape, program=program)


def _evaluate(program, inputs, node: int, calibration=None):
    """One program node on one layer by the policy's kernels: the node's
    expression as the lowering materialises it (what the conformance suite
    compares with its direct formula)."""
    from . import launch, render
    from .engine import build

    rendered = build(program.source or program.policy)
    buffer = rendered.lowering.tensor(program.nodes[node].expr)
    if not any(step.out.id == buffer.id for step in rendered.steps):
        raise LookupError(f"node %{node} ({program.nodes[node].op}) is inlined into its consumer, not materialised")
    calibration = {name: torch.as_tensor(value, dtype=torch.float32).expand(inputs.num_kv) for name, value in (calibration or {}).items()}
    buffers = launch.run_steps(render.load(rendered), rendered.steps, inputs, calibration, launch.needed(rendered.steps, [buffer]))
    return buffers[buffer.id]


def _priority() -> int:
    # "auto" prefers triton where CUDA is present; on CPU torch is faster than
    # the interpreter (forcing backend="triton" still works, with a warning).
    from .interpret import cuda_present

    return 1 if cuda_present() else -1


BACKEND = Backend("triton", _lowered(), _build, priority=_priority(), evaluate=_evaluate)
