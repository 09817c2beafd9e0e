"""The backend registry: `compile(policy, shape, backend=...)` and how a
backend plugs in.

A backend is a name, the set of operations (keys of kvpolicy.ops.OPS) it can
lower, and a `build(policy, program)` that returns the engine-facing object
(new_sequence, observe, accumulate, due, compress_layer -> LayerDecision).
`compile` lowers the policy once, refuses an operation the backend lacks
with a positioned diagnostic before anything runs, then builds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kvpolicy.diagnostics import Diagnostic, PolicyError
from kvpolicy.errors import KvpolicyError
from kvpolicy.model_shape import ModelShape
from kvpolicy.ops import OPS
from kvpolicy.program import Program, lower


@dataclass(frozen=True)
class Backend:
    name: str
    ops: frozenset[str]  # operations it can lower
    build: Callable[[object, Program], object]  # (policy as given, its program) -> engine-facing object
    priority: int = 0  # "auto" picks the highest available one that lowers every op
    available: Callable[[], bool] = lambda: True
    # evaluate(program, inputs, node) -> [Hkv, Q|1, T] tensor: one expression node
    # on one layer (a LayerInputs); what the conformance suite checks per operation.
    evaluate: Callable | None = None

    def missing(self, program: Program) -> list[str]:
        return [op for op in program.ops() if op not in self.ops]


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def unsupported(backend: Backend, program: Program, op: str) -> KvpolicyError:
    """`FILE:LINE:COL: error: the B backend cannot lower OP(...) yet`, at the
    first place the policy writes OP (unpositioned when the source is unknown)."""
    written = f"{op}(...)" if OPS[op].callable else op
    message = f"the {backend.name} backend cannot lower {written} yet"
    source = program.source
    if source is None:
        return KvpolicyError(f"policy {program.policy.name}: {message}")
    return PolicyError([Diagnostic(source.locate_op(op), message)], source.source)


def compile(policy, shape: ModelShape, backend: str = "auto"):  # noqa: A001 (the issue names it so)
    """The engine-facing object of `policy` (kvpolicy.Policy or ir.Policy) for
    `shape` on `backend` ("auto": the best available that lowers every op)."""
    program = lower(policy, shape)
    if backend == "auto":
        ranked = sorted((b for b in BACKENDS.values() if b.available()), key=lambda b: -b.priority)
        chosen = next((b for b in ranked if not b.missing(program)), None)
        if chosen is None:
            raise KvpolicyError(f"no available backend lowers every operation of policy {program.policy.name}")
    else:
        if backend not in BACKENDS:
            raise KvpolicyError(f"unknown backend '{backend}' (known: {', '.join(sorted(BACKENDS))})")
        chosen = BACKENDS[backend]
        if not chosen.available():
            raise KvpolicyError(f"the {backend} backend is not available here")
        missing = chosen.missing(program)
        if missing:
            raise unsupported(chosen, program, missing[0])
    return chosen.build(policy, program)
