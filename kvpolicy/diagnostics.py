"""Positions in a policy file and the errors that point at them.

Every user-facing error about a policy is a `Diagnostic`: a span in a named
source plus a message. Rendered, it reads like a compiler's:

    policies/mine.kvp:6:28: error: unknown signal 'atn'; did you mean 'attn'?
        score s = pool(max, 7, atn(group = mean))
                               ^^^
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import KvpolicyError


@dataclass(frozen=True)
class Span:
    """A region of source text; lines and columns count from 1."""

    line: int
    col: int
    end_line: int
    end_col: int  # exclusive

    @staticmethod
    def point(line: int, col: int, width: int = 1) -> "Span":
        return Span(line, col, line, col + width)


NOWHERE = Span(1, 1, 1, 2)


@dataclass(frozen=True)
class Source:
    """A policy's text and the name to show in errors (a path or '<string>')."""

    text: str
    filename: str = "<string>"

    def line_text(self, line: int) -> str:
        lines = self.text.split("\n")
        return lines[line - 1] if 0 < line <= len(lines) else ""


@dataclass(frozen=True)
class Diagnostic:
    span: Span
    message: str

    def render(self, source: Source | None) -> str:
        filename = source.filename if source else "<string>"
        head = f"{filename}:{self.span.line}:{self.span.col}: error: {self.message}"
        if source is None:
            return head
        # Control characters (a NUL, say) would garble the terminal: show them as '?'.
        text = "".join(ch if ch.isprintable() or ch == "\t" else "?" for ch in source.line_text(self.span.line))
        if not text.strip() or len(text) > 300:
            return head
        width = (self.span.end_col if self.span.end_line == self.span.line else len(text) + 1) - self.span.col
        width = max(1, min(width, len(text) + 1 - self.span.col))
        # Tabs keep their width under the caret so it lines up in a terminal.
        pad = "".join("\t" if ch == "\t" else " " for ch in text[: self.span.col - 1])
        return f"{head}\n    {text}\n    {pad}{'^' * width}"


class PolicyError(KvpolicyError):
    """One or more diagnostics about one policy source."""

    def __init__(self, diagnostics: list[Diagnostic], source: Source | None):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.span.line, d.span.col))
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        parts = [d.render(self.source) for d in self.diagnostics]
        n = len(self.diagnostics)
        name = self.source.filename if self.source else "<string>"
        parts.append(f"{n} error{'s' if n != 1 else ''} in {name}")
        return "\n".join(parts)


def did_you_mean(word: str, candidates) -> str:
    """'; did you mean 'x'?' for the closest candidate, or ''."""
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
