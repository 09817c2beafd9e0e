"""Backends: each lowers a policy's program (kvpolicy.program) for an engine.

    engine = kvpolicy.backends.compile(policy, shape, backend="torch")

Registered here: torch (the reference interpreter, every operation). A new
backend registers a `Backend` from its own package (see registry.py).
"""
from .registry import BACKENDS, Backend, compile, register  # noqa: F401
from .torch.backend import BACKEND as _TORCH

register(_TORCH)
try:  # later backends register themselves when their package provides BACKEND
    from .triton import BACKEND as _TRITON  # type: ignore[attr-defined]

    register(_TRITON)
except ImportError:
    pass

__all__ = ["BACKENDS", "Backend", "compile", "register"]
