"""The torch backend's registration: every operation, built as a TorchPolicy."""
from kvpolicy.ops import OPS

from ..registry import Backend


def _build(policy, program):
    from .policy import TorchPolicy

    return TorchPolicy(policy, program.shape, program=program)


def _evaluate(program, inputs, node: int, calibration=None):
    from .evaluate import Evaluator

    return Evaluator(program, inputs, calibration).value(node)


BACKEND = Backend("torch", frozenset(OPS), _build, priority=0, evaluate=_evaluate)
