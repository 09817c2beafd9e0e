"""`kvpolicy.load`: text -> AST -> checked IR, from a file or a shipped name."""
from __future__ import annotations

import os
from dataclasses import dataclass

from . import ast, checker, ir, library, syntax
from .diagnostics import Source, Span, did_you_mean
from .errors import KvpolicyError


@dataclass(frozen=True)
class Policy:
    """A checked policy: its IR plus where it came from."""

    ir: ir.Policy
    source: Source
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def hash(self) -> str:
        return self.ir.content_hash

    def params(self) -> dict[str, float | int]:
        return {name: p.value for name, p in self.ir.params.items()}

    def locate(self, kind: str, name: str | None) -> Span:
        """Where a statement is in the source (for errors found after checking,
        e.g. against a model's shape): kind is keep | skip | calibrate | tier | state."""
        tree = syntax.parse(self.source.text, self.source.filename)
        for st in tree.statements:
            if kind == "keep" and isinstance(st, ast.Keep) and st.name.name == name:
                return st.span
            if kind == "skip" and isinstance(st, ast.Skip):
                return st.span
            if kind == "state" and isinstance(st, ast.State) and st.name.name == name:
                return st.span
            if kind == "calibrate" and isinstance(st, ast.Calibrate) and st.name.name == name:
                return st.span
            if kind == "tier" and isinstance(st, ast.Cascade):
                return next((t.span for t in st.tiers if t.name.name == name), st.span)
        return tree.name.span

    def locate_op(self, op: str) -> Span:
        """Where an operation is first written (a call `op(...)`), else the policy's name."""
        from .walk import walk

        tree = syntax.parse(self.source.text, self.source.filename)
        found = next((n for n in walk(tree) if isinstance(n, ast.Call) and n.func == op), None)
        return found.name_span if found is not None else tree.name.span

    def with_params(self, **params) -> "Policy":
        """The same source re-checked with other param values."""
        merged = dict(self.overrides) | params
        return Policy(compile_text(self.source.text, self.source.filename, merged), self.source, tuple(merged.items()))


def compile_text(text: str | bytes, filename: str = "<string>", params: dict[str, object] | None = None) -> ir.Policy:
    """Parse and check one policy; raise PolicyError with every diagnostic."""
    tree = syntax.parse(text, filename)
    source = Source(text if isinstance(text, str) else text.decode("utf-8"), filename)
    return checker.check(tree, source, params or {})


def read_source(path_or_name: str) -> tuple[str | bytes, str]:
    """(text, filename) for a file path or the name of a shipped policy."""
    if os.path.exists(path_or_name) or path_or_name.endswith(".kvp") or os.sep in path_or_name:
        try:
            with open(path_or_name, "rb") as f:
                data = f.read(syntax.MAX_BYTES + 1)
        except OSError as err:
            raise KvpolicyError(f"cannot read {path_or_name}: {err.strerror or err}") from None
        return data, path_or_name
    text = library.shipped_text(path_or_name)
    if text is None:
        names = library.shipped_names()
        raise KvpolicyError(f"no policy file or shipped policy named '{path_or_name}'{did_you_mean(path_or_name, names)} (shipped: {', '.join(names)})")
    return text, f"policies/{path_or_name}.kvp"


def load(path_or_name: str, **params) -> Policy:
    """Load a policy file or a shipped policy by name, overriding params.

    >>> kvpolicy.load("snapkv", budget=256).ir.params["budget"].value
    256
    """
    text, filename = read_source(path_or_name)
    policy_ir = compile_text(text, filename, params)
    source = Source(text if isinstance(text, str) else text.decode("utf-8", "replace"), filename)
    return Policy(policy_ir, source, tuple(params.items()))
