"""The abstract syntax tree: what was written, with a span on every node.

The parser (syntax.py) builds it; the checker reads it to build the IR and the
formatter prints it back. Nothing here knows what a word means.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .diagnostics import Span

# ----------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Number:
    text: str  # as written, so the formatter and range errors can quote it
    span: Span

    @property
    def value(self) -> float:
        return float(self.text)


@dataclass(frozen=True)
class Name:
    name: str
    span: Span


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / > >= < <= |
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class Positional:
    """`first n` or `last n`."""

    which: str  # "first" | "last"
    count: "Expr"
    span: Span


@dataclass(frozen=True)
class KwArg:
    name: str
    value: "Expr"
    span: Span  # of the keyword


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[KwArg, ...]
    span: Span  # whole call
    name_span: Span  # the function name only


@dataclass(frozen=True)
class List:
    items: tuple["Expr", ...]
    span: Span


Expr = Number | Name | Binary | Neg | Positional | Call | List

# ----------------------------------------------------------------- statements


@dataclass(frozen=True)
class Ident:
    name: str
    span: Span


@dataclass(frozen=True)
class IndexSet:
    """`a..b` (inclusive) or `[a, b, c]`."""

    start: Expr | None
    stop: Expr | None
    items: tuple[Expr, ...] | None
    span: Span


@dataclass(frozen=True)
class Param:
    name: Ident
    unit: Ident
    default: Expr
    span: Span


@dataclass(frozen=True)
class Observe:
    window: Expr
    span: Span


@dataclass(frozen=True)
class Score:
    name: Ident
    expr: Expr
    span: Span


@dataclass(frozen=True)
class State:
    name: Ident
    update: Expr
    decay: Expr | None
    span: Span


@dataclass(frozen=True)
class CalibItem:
    """One line of a calibrate block; `kind` is the leading keyword."""

    kind: str  # target | metric | solve | init | clamp | fit
    values: tuple[Expr, ...]  # clamp has two, fit-once none
    fit: str | None  # for kind == "fit": once | every | from
    file: str | None  # fit from "FILE"
    span: Span


@dataclass(frozen=True)
class Calibrate:
    name: Ident
    scope: tuple[Ident, ...]
    items: tuple[CalibItem, ...]
    span: Span


@dataclass(frozen=True)
class KeepClause:
    kind: str  # per | floor | by_layer | restrict
    word: Ident | None  # per WORD / in WORD
    value: Expr | None  # floor / by layer
    index_set: IndexSet | None  # in WORD INDEX_SET
    span: Span


@dataclass(frozen=True)
class Keep:
    name: Ident
    selection: Expr
    clauses: tuple[KeepClause, ...]
    span: Span


@dataclass(frozen=True)
class Cap:
    value: Expr
    span: Span


@dataclass(frozen=True)
class Skip:
    layers: IndexSet
    span: Span


@dataclass(frozen=True)
class Layout:
    word: Ident
    span: Span


@dataclass(frozen=True)
class Merge:
    target: Ident
    weight: Expr | None
    span: Span


@dataclass(frozen=True)
class Trigger:
    kind: str  # prefill | every | when
    every: Expr | None
    guard_op: str | None  # > or >=
    guard: Expr | None
    span: Span


@dataclass(frozen=True)
class Compress:
    triggers: tuple[Trigger, ...]
    span: Span


@dataclass(frozen=True)
class TierClause:
    kind: str  # new | from | select | layout | store | cap | merge
    word: Ident | None  # from NAME / layout NAME / store NAME / select ... per NAME
    value: Expr | None  # select EXPR / cap EXPR / from ... every EXPR
    merge: Merge | None
    span: Span


@dataclass(frozen=True)
class Tier:
    name: Ident
    clauses: tuple[TierClause, ...]
    span: Span


@dataclass(frozen=True)
class Cascade:
    tiers: tuple[Tier, ...]
    span: Span


Statement = Param | Observe | Score | State | Calibrate | Keep | Cap | Skip | Layout | Merge | Compress | Cascade


@dataclass(frozen=True)
class Comment:
    text: str  # including the leading '#'
    line: int


@dataclass(frozen=True)
class Policy:
    name: Ident
    doc: str | None
    statements: tuple[Statement, ...]
    span: Span
    comments: tuple[Comment, ...] = field(default=())
