"""Expressions: type, unit and range checking, and lowering to IR.

Every expression gets a `Typed`: what kind of thing it is (a number with a
unit, a per-token tensor, a selection, ...) and its IR. Numbers known at
compile time are folded, so `budget - window` reaches the IR as one constant.
An error is recorded once where it arises; the result is then `ERROR`, which
every later check accepts silently, so one typo yields one message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

from . import ast, ir
from .ops import BUILTINS, Arg, Builtin, names_with_role
from .diagnostics import Diagnostic, Span, did_you_mean

MAX_MAGNITUDE = 1e12  # larger literals are surely a typo, and overflow int32 kernels
DIMENSIONLESS = (None, "prob", "int", "float")


@dataclass(frozen=True)
class Typed:
    kind: str  # number | tensor | selection | count | layer_shape | solver | error
    ir: object = None
    unit: str | None = None  # numbers: tokens | steps | prob | int | float | None (plain literal)
    value: float | None = None  # numbers known at compile time
    nonneg: bool = False  # tensors (and runtime numbers): known to be >= 0
    query_span: Span | None = None  # where a signal that reads observed queries appears
    uses: frozenset[str] = field(default_factory=frozenset)  # names referenced
    max_tokens: float | None = None  # selections: most tokens it can keep (None: unbounded)
    protected: int = 0  # selections: tokens kept by first/last parts


ERROR = Typed("error")

KIND_WORDS = {
    "number": "a number",
    "tensor": "a per-token score",
    "selection": "a selection",
    "count": "a per-query count",
    "layer_shape": "a by-layer shape",
    "solver": "a solver",
}


def describe(t: Typed) -> str:
    if t.kind == "number" and t.unit:
        return {"prob": "a prob", "int": "an int", "float": "a float", "tokens": "a count in tokens", "steps": "a number of steps"}[t.unit]
    return KIND_WORDS.get(t.kind, t.kind)


def fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class ExprChecker:
    """Checks expressions against a name resolver; errors go to `errors`."""

    def __init__(self, resolve: Callable[[str, Span], Typed | None], known_names: Callable[[], list[str]], errors: list[Diagnostic]):
        self.resolve = resolve
        self.known_names = known_names
        self.errors = errors

    def error(self, span: Span, message: str) -> Typed:
        self.errors.append(Diagnostic(span, message))
        return ERROR

    # ------------------------------------------------------------- dispatch

    def check(self, node: ast.Expr) -> Typed:
        method = getattr(self, "_" + type(node).__name__.lower())
        return method(node)

    def _number(self, node: ast.Number) -> Typed:
        value = float(node.text)
        if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            return self.error(node.span, f"number {node.text[:20]} is too large (the limit is {MAX_MAGNITUDE:g})")
        return Typed("number", ir.Const(value=_tidy(value)), value=value, nonneg=value >= 0)

    def _name(self, node: ast.Name) -> Typed:
        found = self.resolve(node.name, node.span)
        if found is not None:
            return found
        if node.name in BUILTINS:
            return self.error(node.span, f"'{node.name}' is a built-in function; call it: {node.name}(...)")
        return self.error(node.span, f"unknown name '{node.name}'{did_you_mean(node.name, self.known_names())}")

    def _list(self, node: ast.List) -> Typed:
        return self.error(node.span, "a list is only allowed after 'by layer', 'skip layers' or 'in layers'")

    def _neg(self, node: ast.Neg) -> Typed:
        inner = self.check(node.operand)
        if inner.kind == "number":
            value = -inner.value if inner.value is not None else None
            lowered = ir.Const(value=_tidy(value), unit=inner.unit) if value is not None else ir.Negate(operand=inner.ir)
            return replace(inner, ir=lowered, value=value, nonneg=value is not None and value >= 0)
        if inner.kind == "tensor":
            return replace(inner, ir=ir.Negate(operand=inner.ir), nonneg=False)
        return self._not_arithmetic(node.operand, inner)

    def _positional(self, node: ast.Positional) -> Typed:
        count = self.expect_number(node.count, "tokens", f"'{node.which}'")
        if count is None:
            return ERROR
        selection = ir.First(count=count) if node.which == "first" else ir.Last(count=count)
        return Typed("selection", selection, max_tokens=count, protected=count)

    def _binary(self, node: ast.Binary) -> Typed:
        if node.op == "|":
            return self._union(node)
        left, right = self.check(node.left), self.check(node.right)
        if ERROR in (left, right):
            return ERROR
        if node.op in (">", ">=", "<", "<="):
            return self._compare(node, left, right)
        for side, typed in ((node.left, left), (node.right, right)):
            if typed.kind not in ("number", "tensor"):
                return self._not_arithmetic(side, typed)
        if left.kind == right.kind == "number":
            return self._number_arith(node, left, right)
        return self._tensor_arith(node, left, right)

    # ------------------------------------------------------------- arithmetic

    def _not_arithmetic(self, node: ast.Expr, typed: Typed) -> Typed:
        if typed.kind == "error":
            return ERROR
        return self.error(node.span, f"{describe(typed)} cannot be used in arithmetic")

    def _number_arith(self, node: ast.Binary, left: Typed, right: Typed) -> Typed:
        unit = self._result_unit(node, left.unit, right.unit)
        if unit is False:
            return ERROR
        uses = left.uses | right.uses
        if left.value is None or right.value is None:  # a calibrated scalar: known at run time
            nonneg = left.nonneg and right.nonneg and node.op in "+*/"
            return Typed("number", ir.Arith(operator=node.op, left=left.ir, right=right.ir), unit=unit, nonneg=nonneg, uses=uses)
        if node.op == "/" and right.value == 0:
            return self.error(node.right.span, "division by zero")
        value = {"+": left.value + right.value, "-": left.value - right.value, "*": left.value * right.value, "/": left.value / (right.value or 1)}[node.op]
        if abs(value) > MAX_MAGNITUDE:
            return self.error(node.span, "number too large")
        return Typed("number", ir.Const(value=_tidy(value), unit=unit), unit=unit, value=value, nonneg=value >= 0, uses=uses)

    def _result_unit(self, node: ast.Binary, a: str | None, b: str | None):
        """Units: tokens and steps are dimensions; prob, int and float are plain
        numbers; an unmarked literal takes the unit of the other side."""
        op = node.op
        if op in "+-":
            if a is None or b is None or a == b:
                return a or b
            if a in DIMENSIONLESS and b in DIMENSIONLESS:
                return "float"
            self.error(node.span, f"cannot {'add' if op == '+' else 'subtract'} {b} {'to' if op == '+' else 'from'} {a}")
            return False
        if op == "*":
            if a in DIMENSIONLESS and b in DIMENSIONLESS:
                return a if a == b else (a or b) if None in (a, b) else "float"
            if a in DIMENSIONLESS or b in DIMENSIONLESS:
                return b if a in DIMENSIONLESS else a
            self.error(node.span, f"cannot multiply {a} by {b}")
            return False
        # division
        if b is None:
            return a  # by a plain literal: `p / 2` is still a prob, as `p * 0.5` is
        if b in DIMENSIONLESS:
            return a if a not in DIMENSIONLESS else "float"
        if a == b:
            return "float"  # a ratio of like quantities
        self.error(node.span, f"cannot divide {a or 'a plain number'} by {b}")
        return False

    def _tensor_arith(self, node: ast.Binary, left: Typed, right: Typed) -> Typed:
        for side, typed in ((node.left, left), (node.right, right)):
            if typed.kind == "number" and typed.unit not in DIMENSIONLESS:
                return self.error(side.span, f"a per-token score cannot be combined with {typed.unit}")
        if node.op == "/" and right.kind == "number" and right.value == 0:
            return self.error(node.right.span, "division by zero")
        nonneg = left.nonneg and right.nonneg and node.op != "-"
        return Typed(
            "tensor",
            ir.Arith(operator=node.op, left=left.ir, right=right.ir),
            nonneg=nonneg,
            query_span=left.query_span or right.query_span,
            uses=left.uses | right.uses,
        )

    def _compare(self, node: ast.Binary, left: Typed, right: Typed) -> Typed:
        flipped = {">": "<", ">=": "<=", "<": ">", "<=": ">="}
        if left.kind == "tensor" and right.kind == "number":
            score, bound, op = left, right, node.op
        elif left.kind == "number" and right.kind == "tensor":
            score, bound, op = right, left, flipped[node.op]
        else:
            return self.error(node.span, f"a comparison selects tokens whose score passes a threshold: write SCORE {node.op} NUMBER (got {describe(left)} {node.op} {describe(right)})")
        if bound.value is None or bound.unit not in DIMENSIONLESS:
            return self.error(node.span, "a threshold must be a plain number known before run time")
        selection = ir.Threshold(score=score.ir, operator=op, value=bound.value)
        return Typed("selection", selection, query_span=score.query_span, uses=score.uses)

    def _union(self, node: ast.Binary) -> Typed:
        parts = [self.check(node.left), self.check(node.right)]
        if ERROR in parts:
            return ERROR
        for side, typed in zip((node.left, node.right), parts):
            if typed.kind != "selection":
                return self.error(side.span, f"'|' joins selections; this is {describe(typed)}")
        flat: list = []
        for typed in parts:
            flat.extend(typed.ir.parts if isinstance(typed.ir, ir.SelectUnion) else [typed.ir])
        bounded = all(t.max_tokens is not None for t in parts)
        return Typed(
            "selection",
            ir.SelectUnion(parts=tuple(flat)),
            max_tokens=sum(t.max_tokens for t in parts) if bounded else None,
            protected=sum(t.protected for t in parts),
            query_span=parts[0].query_span or parts[1].query_span,
            uses=parts[0].uses | parts[1].uses,
        )

    # ------------------------------------------------------------- numbers with units

    def expect_number(self, node: ast.Expr, unit: str, what: str, low: float | None = None, high: float | None = None):
        """Check a compile-time number of `unit` (a literal adopts it); return
        its value (int for whole units) or None after recording an error."""
        typed = self.check(node)
        return self.number_value(node, typed, unit, what, low, high)

    def number_value(self, node: ast.Expr, typed: Typed, unit: str, what: str, low=None, high=None):
        if typed.kind == "error":
            return None
        if typed.kind != "number":
            self.error(node.span, f"{what} expects {_unit_phrase(unit)}, got {describe(typed)}")
            return None
        if typed.unit is not None and typed.unit != unit and not (unit == "float" and typed.unit in DIMENSIONLESS):
            self.error(node.span, f"{what} expects {_unit_phrase(unit)}, got {describe(typed)}{_quote_source(node)}")
            return None
        if typed.value is None:
            self.error(node.span, f"{what} must be known before run time")
            return None
        if isinstance(node, ast.Number) and unit in ("tokens", "steps", "int") and not float(typed.value).is_integer():
            self.error(node.span, f"{what} must be a whole number, got {node.text}")
            return None
        return self.value_in_range(node.span, typed.value, unit, what, low, high)

    def value_in_range(self, span: Span, value: float, unit: str, what: str, low=None, high=None, note: str = ""):
        shown = fmt_number(value)
        if unit == "prob" and not 0 < value <= 1:
            self.error(span, f"{what} is a probability in (0, 1], got {shown}{note}")
            return None
        if unit in ("tokens", "steps", "int"):
            if unit == "tokens" and value < 0:
                self.error(span, f"{what} must be a non-negative number of tokens, got {shown}{note}")
                return None
            if unit == "steps" and value < 1:
                self.error(span, f"{what} must be at least 1 step, got {shown}{note}")
                return None
            if unit == "int" and not float(value).is_integer():
                self.error(span, f"{what} must be a whole number, got {shown}{note}")
                return None
            value = int(math.floor(value))  # a computed count such as p * budget rounds down
        if low is not None and value < low:
            self.error(span, f"{what} must be at least {fmt_number(low)}, got {shown}{note}")
            return None
        if high is not None and value > high:
            self.error(span, f"{what} must be at most {fmt_number(high)}, got {shown}{note}")
            return None
        return value

    # ------------------------------------------------------------- calls

    def _call(self, node: ast.Call) -> Typed:
        builtin = BUILTINS.get(node.func)
        if builtin is None:
            return self._unknown_function(node)
        bound = self._bind(node, builtin)
        if bound is None:
            return ERROR
        values: dict[str, object] = {}
        tensors: list[Typed] = []
        ok = True
        for arg in builtin.args:
            given = bound.get(arg.name)
            value = self._check_arg(node, builtin, arg, given)
            if value is ERROR or value is None:
                ok = False
                continue
            values[arg.name] = value
            if isinstance(value, Typed):
                tensors.append(value)
        if not ok:
            return ERROR
        return self._lower_call(node, builtin, values, tensors)

    def _unknown_function(self, node: ast.Call) -> Typed:
        signals = names_with_role("signal")
        suggestion = did_you_mean(node.func, BUILTINS)
        close_to_signal = any(f"'{s}'" in suggestion for s in signals)
        what = "signal" if close_to_signal else "function"
        found = self.resolve(node.func, node.name_span) if node.func not in BUILTINS else None
        if found is not None:
            return self.error(node.name_span, f"'{node.func}' is {describe(found)}, not a function")
        return self.error(node.name_span, f"unknown {what} '{node.func}'{suggestion}")

    def _bind(self, node: ast.Call, builtin: Builtin) -> dict[str, ast.Expr] | None:
        names = [a.name for a in builtin.args]
        bound: dict[str, ast.Expr] = {}
        if len(node.args) > len(names):
            extra = node.args[len(names)]
            self.error(extra.span, f"{builtin.name} takes {_count_words(len(names))}, got {len(node.args) + len(node.kwargs)}")
            return None
        for arg_name, value in zip(names, node.args):
            bound[arg_name] = value
        for kw in node.kwargs:
            if kw.name not in names:
                self.error(kw.span, f"{builtin.name} has no argument '{kw.name}'{did_you_mean(kw.name, names)}" + (f" (it takes: {', '.join(names)})" if names else " (it takes none)"))
                return None
            if kw.name in bound:
                self.error(kw.span, f"argument '{kw.name}' of {builtin.name} is given twice")
                return None
            bound[kw.name] = kw.value
        missing = [a.name for a in builtin.args if a.default is None and a.name not in bound]
        if missing:
            self.error(node.span, f"{builtin.name} needs argument '{missing[0]}' ({builtin.name}({', '.join(names)}))")
            return None
        return bound

    def _check_arg(self, node: ast.Call, builtin: Builtin, arg: Arg, given: ast.Expr | None):
        numbers = [a for a in builtin.args if a.kind == "number"]
        what = builtin.name if builtin.role in ("selection", "count") and arg is numbers[0] else f"{builtin.name}'s {arg.name}"
        if given is None:
            return arg.default
        if arg.kind == "enum":
            if not isinstance(given, ast.Name):
                self.error(given.span, f"{builtin.name}'s {arg.name} is one of the words {_or(arg.choices)}, not an expression")
                return None
            if given.name not in arg.choices:
                self.error(given.span, f"unknown {arg.name} '{given.name}' for {builtin.name}; expected {_or(arg.choices)}{did_you_mean(given.name, arg.choices)}")
                return None
            return given.name
        if arg.kind == "number":
            value = self.expect_number(given, arg.unit, what, arg.low, arg.high)
            if value is not None and arg.odd and int(value) % 2 == 0:
                self.error(given.span, f"{what} must be odd so the window is centred, got {fmt_number(value)}")
                return None
            return value
        typed = self.check(given)
        if typed.kind == "error":
            return None
        if typed.kind != "tensor":
            self.error(given.span, f"{what} expects a per-token score, got {describe(typed)}")
            return None
        if arg.nonneg and not typed.nonneg:
            self.error(given.span, f"{builtin.name} needs non-negative scores (e.g. softmax(...) or attn()), but this can be negative")
            return None
        return typed

    def _lower_call(self, node: ast.Call, builtin: Builtin, values: dict, tensors: list[Typed]) -> Typed:
        options = {k: v for k, v in values.items() if not isinstance(v, Typed)}
        uses = frozenset().union(*(t.uses for t in tensors)) if tensors else frozenset()
        query_span = next((t.query_span for t in tensors if t.query_span), None)
        role = builtin.role
        if role == "signal":
            return Typed("tensor", ir.Signal(name=builtin.name, options=options), nonneg=builtin.result == "nonneg", query_span=node.span if builtin.needs_queries else None)
        if role == "transform":
            nonneg = all(t.nonneg for t in tensors) if builtin.result == "same" else builtin.result == "nonneg"
            return Typed("tensor", ir.Apply(fn=builtin.name, args=tuple(t.ir for t in tensors), options=options), nonneg=nonneg, query_span=query_span, uses=uses)
        if role == "count":
            return Typed("count", ir.Apply(fn=builtin.name, args=(tensors[0].ir,), options=options), query_span=query_span, uses=uses)
        if role == "selection":
            built = SELECTION_IR[builtin.name](self, node, tensors[0].ir, values)
            if built is None:
                return ERROR  # reported
            sel, most = built
            return Typed("selection", sel, max_tokens=most, query_span=query_span, uses=uses)
        if role == "layer_shape":
            return Typed("layer_shape", ir.LayerShape(kind=builtin.name, **{k: float(v) for k, v in options.items()}))
        assert role == "solver"
        return Typed("solver", ir.Solver(kind=builtin.name, **options))


def _top_k_ir(checker, node: ast.Call, score, values: dict):
    return ir.TopK(score=score, count=values["k"]), values["k"]


def _top_p_ir(checker, node: ast.Call, score, values: dict):
    limit = values["limit"] if values["limit"] != -1 else None
    floor = values["floor"] or None
    if floor is not None and limit is not None and floor > limit:
        given = next((kw for kw in node.kwargs if kw.name == "floor"), node)
        checker.error(given.span, f"top_p's floor ({fmt_number(floor)}) is more than its limit ({fmt_number(limit)}): "
                                  "a head would have to keep more than it may")
        return None
    return ir.TopP(score=score, p=values["p"], limit=limit, floor=floor), limit


# A callable selection of ops.OPS -> (checker, call, score IR, argument values)
# -> (IR selection, most tokens it keeps) or None after an error.
SELECTION_IR: dict[str, Callable] = {"top_k": _top_k_ir, "top_p": _top_p_ir}


def _tidy(value: float | None):
    """Whole floats become ints so the IR reads `1024`, not `1024.0`."""
    if value is None:
        return None
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def _unit_phrase(unit: str) -> str:
    return {"tokens": "a count in tokens", "steps": "a number of steps", "prob": "a prob", "int": "a whole number", "float": "a number"}[unit]


def _quote_source(node: ast.Expr) -> str:
    return f" ({node.name})" if isinstance(node, ast.Name) else ""


def _count_words(n: int) -> str:
    return "no arguments" if n == 0 else "1 argument" if n == 1 else f"{n} arguments"


def _or(words) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
