"""Backends: each lowers a policy's program (kvpolicy.program) for an engine.

    engine = kvpolicy.backends.compile(policy, shape, backend="torch")

Registered here: torch (the reference interpreter, every operation). A new
backend registers a `Backend` from its own package (see registry.py).
"""
import os as _os

# Triton decides at import whether its own @jit helpers run in the
# interpreter, and transformers imports triton: without CUDA, choose the
# interpreter before any backend can pull triton in (a no-op on GPU machines).
if not _os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            _os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass

from .registry import BACKENDS, Backend, compile, register  # noqa: F401
from .torch.backend import BACKEND as _TORCH

register(_TORCH)
try:  # later backends register themselves when their package provides BACKEND
    from .triton import BACKEND as _TRITON  # type: ignore[attr-defined]

    register(_TRITON)
except ImportError:
    pass

__all__ = ["BACKENDS", "Backend", "compile", "register"]
