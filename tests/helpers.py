"""Small helpers shared by the front-end tests."""
from __future__ import annotations

import textwrap

import pytest

import kvpolicy
from kvpolicy.diagnostics import PolicyError


def policy_text(body: str, name: str = "t") -> str:
    """Wrap statements in a policy block (body lines are indented two spaces)."""
    body = textwrap.dedent(body).strip("\n")
    inner = "\n".join("  " + line if line.strip() else "" for line in body.split("\n"))
    return f'policy {name} "test" {{\n{inner}\n}}\n'


def edited(base: str, old: str, new: str) -> str:
    """policy_text(base) with every `old` replaced by `new`; `old` must occur in base."""
    assert old in base, old
    return policy_text(base.replace(old, new))


def where(text: str, needle: str, occurrence: int = 1) -> tuple[int, int]:
    """(line, col), 1-based, of the n-th occurrence of needle in text."""
    index = -1
    for _ in range(occurrence):
        index = text.index(needle, index + 1)
    before = text[:index]
    return before.count("\n") + 1, index - (before.rfind("\n") + 1) + 1


def errors_of(text: str, filename: str = "t.kvp", **params) -> list:
    with pytest.raises(PolicyError) as info:
        kvpolicy.compile_text(text, filename, params)
    return info.value.diagnostics


def assert_error_at(text: str, needle: str, fragment: str, occurrence: int = 1, **params):
    """The text fails with an error containing `fragment` at `needle`'s position."""
    diagnostics = errors_of(text, **params)
    line, col = where(text, needle, occurrence)
    matching = [d for d in diagnostics if fragment in d.message]
    assert matching, f"no error containing {fragment!r}; got {[d.message for d in diagnostics]}"
    assert (matching[0].span.line, matching[0].span.col) == (line, col), (
        f"{fragment!r} reported at {matching[0].span.line}:{matching[0].span.col}, expected {line}:{col} ({needle!r})"
    )
    return matching[0]
