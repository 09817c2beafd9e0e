"""The torch backend's registration: every operation, built as a TorchPolicy."""
from kvpolicy.ops import OPS

from ..registry import Backend


def _build(policy, program):
    from .policy import TorchPolicy

    return TorchPolicy(policy, program.shape, program=program)


BACKEND = Backend("torch", frozenset(OPS), _build, priority=0)
