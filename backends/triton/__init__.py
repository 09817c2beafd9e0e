"""The Triton backend: kernels generated per policy from fixed templates
(docs/triton.md). Without CUDA they run in Triton's interpreter, chosen in
kvpolicy.backends before triton is first imported.

Registered as `BACKEND`: the operations it lowers come from its own tables
(lowering.EMITTERS for expressions; the selection, layer-shape and solver
operations the engine runs), so a new emitter is a new supported operation.
"""
from kvpolicy.ops import OPS

from ..registry import Backend
from .lowering import EMITTERS

_EXPRESSIONS = {"arith": ("add", "sub", "mul", "div")}
# run by TritonPolicy: selections through select_rows, per-layer counts on the
# host, adam on the torch side and bisect by kernel (engine.py)
_ENGINE = ("top_k", "top_p", "first", "last", "threshold", "union", "uniform", "pyramid", "linear", "adam", "bisect")


def _lowered() -> frozenset[str]:
    names = set(_ENGINE)
    for key in EMITTERS:
        op = key.split(":", 1)[-1]
        names.update(_EXPRESSIONS.get(key, (op,)))
    return frozenset(name for name in names if name in OPS)


def _build(policy, program):
    from .engine import TritonPolicy

    return TritonPolicy(policy, program.shape, program=program)


def _priority() -> int:
    # "auto" prefers triton where CUDA is present; on CPU torch is faster than
    # the interpreter (forcing backend="triton" still works, with a warning).
    from .interpret import cuda_present

    return 1 if cuda_present() else -1


BACKEND = Backend("triton", _lowered(), _build, priority=_priority())
