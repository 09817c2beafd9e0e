"""Property tests of the language front end (parser, checker, IR, formatter).

1. Random VALID policies, built from every construct of the grammar and the
   built-in table and combined so they obey the checker's rules (units,
   ranges, caps that provably hold the keep set, cascade tiers, calibration),
   written with random whitespace, newlines and comments between tokens.
   Each must check; `fmt` must keep its meaning (same IR and content hash),
   be idempotent and keep every comment; the IR must round-trip through JSON.
2. Well-formed text of random meaning (every grammar form in every slot):
   the checker accepts it or reports positioned errors, and `fmt` prints the
   same tree back.
3. Random mutations of every shipped policy (characters, tokens, lines,
   truncation, raw bytes incl. invalid UTF-8 and NUL): each mutant either
   checks or raises PolicyError whose diagnostics point inside the file;
   nothing else may escape; whatever parses formats faithfully. A sample
   also goes through `kvpolicy check` in-process (exit 0/1, no traceback).

Failures are reproducible through hypothesis's example database.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import kvpolicy
from kvpolicy import cli, formatter, ir, library, syntax
from kvpolicy.ops import BUILTINS, UNITS

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

KEYWORDS = syntax.keywords()
ENUM_WORDS = {"mean", "max", "sum", "none", "kv_head", "layer", "nearest", "top", "contiguous", "mask", "flatten_max", "flatten_sum", "native", "fp16", "bf16", "int8", "int4"}
RESERVED = KEYWORDS | set(BUILTINS) | set(UNITS) | ENUM_WORDS | {"layers", "kv_heads", "queries", "length"}

# Binding strength, loosest first (as in the grammar).
UNION, POSITIONAL, COMPARE, SUM, PRODUCT, NEG, ATOM = 1, 2, 3, 4, 5, 6, 7


# ======================================================================
# Expressions: token lists that know what they mean
# ======================================================================


@dataclass(frozen=True)
class E:
    toks: tuple[str, ...]
    prec: int = ATOM
    kind: str = "number"  # number | tensor | selection | count | shape | solver
    value: float | None = None  # numbers known at compile time
    unit: str | None = None  # None: a plain literal
    nonneg: bool = False
    queries: bool = False  # reads observed queries
    uses: frozenset = frozenset()  # calibrated scalars it depends on
    max_tokens: float | None = None  # selections
    protected: int = 0  # selections: tokens of first/last parts
    positional: bool = False  # a bare first/last


def paren(draw, e: E, need: int) -> tuple[str, ...]:
    """Tokens of `e` in a slot that binds at least `need`; sometimes redundant parentheses."""
    if e.prec < need or draw(st.integers(0, 12)) == 0:
        return ("(", *e.toks, ")")
    return e.toks


def literal_text(draw, value: float) -> str:
    """One way of writing `value` (every one parses to the same float)."""
    if float(value).is_integer():
        v = int(value)
        forms = [str(v), str(v), f"{v}.0"]
        if v and v % 1000 == 0:
            forms.append(f"{v // 1000}e3")
        if v >= 0:
            forms.append(f"{v}e0")
        return draw(st.sampled_from(forms))
    text = repr(float(value))
    assert float(text) == value
    return text


def lit(draw, value: float) -> E:
    """A non-negative literal (negatives are written as unary minus)."""
    if value < 0:
        inner = lit(draw, -value)
        return E(("-", *paren(draw, inner, NEG)), NEG, value=value, nonneg=False)
    text = literal_text(draw, value)
    return E((text,), ATOM, value=float(text), nonneg=True)


def binop(draw, a: E, op: str, b: E, **info) -> E:
    prec = SUM if op in "+-" else PRODUCT
    toks = (*paren(draw, a, prec), op, *paren(draw, b, prec + 1))
    return E(toks, prec, **info)


def arith(a: float, op: str, b: float) -> float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b if op == "*" else a / b


def call(draw, func: str, args: list[tuple[str, E | None, bool]]) -> tuple[str, ...]:
    """f(...) with args [(name, value or None to omit, required)], some positional, the rest by keyword in any order."""
    given = [(name, value) for name, value, _ in args if value is not None]
    names = [name for name, _, _ in args]
    # Positional only for a prefix of the declared order with nothing omitted before it.
    prefix = 0
    for name, value, _ in args:
        if value is None:
            break
        prefix += 1
    n_pos = draw(st.integers(0, prefix))
    positional = [v for _, v, _ in args[:n_pos]]
    keyword = [(n, v) for n, v in given if names.index(n) >= n_pos]
    keyword = draw(st.permutations(keyword)) if keyword else []
    parts: list[tuple[str, ...]] = [v.toks for v in positional]
    parts += [(n, "=", *v.toks) for n, v in keyword]
    toks: list[str] = [func, "("]
    for i, part in enumerate(parts):
        if i:
            toks.append(",")
        toks.extend(part)
    toks.append(")")
    return tuple(toks)


# ======================================================================
# The generator's view of a policy being built
# ======================================================================


@dataclass
class Ctx:
    used_names: set = field(default_factory=set)
    params: dict = field(default_factory=dict)  # name -> (unit, value)
    observe: bool = False
    tensors: list = field(default_factory=list)  # scores and states: E of a Name
    calibrations: list = field(default_factory=list)  # names of calibrated scalars
    comments: list = field(default_factory=list)
    prefill_only: bool = False  # a later tier has a cap but no select: it only holds if nothing compresses while decoding

    def fresh(self, draw, prefix: str = "") -> str:
        base = draw(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True))
        name = prefix + base
        if name in RESERVED or name in self.used_names:
            name = f"{name}_{len(self.used_names)}"
        self.used_names.add(name)
        return name


# ----------------------------------------------------------------- numbers with units

COUNT_UNITS = ("tokens", "steps", "int")


def num(draw, ctx: Ctx, unit: str, depth: int = 2) -> E:
    """A compile-time number acceptable where `unit` is expected (any value)."""
    choice = draw(st.integers(0, 9)) if depth > 0 else draw(st.integers(0, 4))
    same_unit = [n for n, (u, _) in ctx.params.items() if u == unit or (unit == "float" and u in ("prob", "int", "float"))]
    if choice <= 2 or (choice <= 4 and not same_unit):
        if unit == "prob":
            return lit(draw, draw(st.sampled_from([0.5, 0.9, 1, 0.25, 0.01, 0.75, 0.999])))
        if unit == "float":
            return lit(draw, draw(st.sampled_from([0, 0.5, 1, 2, 20, 0.001, 1.5, 100, 3])))
        return lit(draw, draw(st.integers(0, 3000)))
    if choice <= 4:
        name = draw(st.sampled_from(same_unit))
        u, v = ctx.params[name]
        return E((name,), ATOM, value=float(v), unit=u, nonneg=v >= 0)
    a = num(draw, ctx, unit, depth - 1)
    if unit in COUNT_UNITS or unit == "tokens":
        op = draw(st.sampled_from(["+", "-", "*"] + (["/"] if unit == "tokens" else [])))
        if op in "*/":
            k = lit(draw, draw(st.integers(1, 4)))
            if op == "*" and draw(st.booleans()):
                a, k = k, a
            b = k
        else:
            b = num(draw, ctx, unit, depth - 1)
    elif unit == "prob":
        op = draw(st.sampled_from(["*", "-", "/"]))
        if op == "-":
            a = lit(draw, 1)
        # p / 2 stays a prob, like p * 0.5
        b = lit(draw, draw(st.sampled_from([1, 2, 4]))) if op == "/" else num(draw, ctx, "prob", depth - 1)
    else:  # float: any dimensionless mix
        op = draw(st.sampled_from(["+", "-", "*", "/"]))
        b = num(draw, ctx, "float", depth - 1)
    if op == "/" and b.value == 0:
        b = lit(draw, 2)
    value = arith(a.value, op, b.value)
    return binop(draw, a, op, b, value=value, unit=_result_unit(op, a.unit, b.unit), nonneg=value >= 0)


def _result_unit(op: str, a, b):
    dimless = (None, "prob", "int", "float")
    if op in "+-":
        if a is None or b is None or a == b:
            return a or b
        return "float"
    if op == "*":
        if a in dimless and b in dimless:
            return a if a == b else (a or b) if None in (a, b) else "float"
        return b if a in dimless else a
    if b is None:
        return a
    return a if a not in dimless else "float"


def in_range(unit: str, value: float, whole: bool = False) -> bool:
    if abs(value) > 1e12:
        return False
    if unit == "prob":
        return 0 < value <= 1
    if unit == "tokens":
        return value >= 0 and (not whole or float(value).is_integer())
    if unit == "steps":
        return value >= 1 and (not whole or float(value).is_integer())
    if unit == "int":
        return float(value).is_integer()
    return True


def number(draw, ctx: Ctx, unit: str, low: float | None = None, high: float | None = None, whole: bool = False, fallback: float | None = None) -> E:
    """A number of `unit` whose value is in range; falls back to a literal."""
    e = num(draw, ctx, unit, draw(st.integers(0, 2)))
    ok = in_range(unit, e.value, whole) and (low is None or _as_count(unit, e.value) >= low) and (high is None or _as_count(unit, e.value) <= high)
    if ok:
        return e
    if fallback is None:
        fallback = {"prob": 0.5, "tokens": 16, "steps": 8, "int": 3, "float": 1.5}[unit]
        if low is not None:
            fallback = max(fallback, low)
        if high is not None:
            fallback = min(fallback, high)
    return lit(draw, fallback)


def _as_count(unit: str, value: float) -> float:
    return math.floor(value) if unit in COUNT_UNITS else value


def count_value(e: E) -> int:
    """What the checker keeps of a tokens/steps/int count: rounded down."""
    return int(math.floor(e.value))


# ----------------------------------------------------------------- per-token scores


def signal(draw, ctx: Ctx, queries_ok: bool, names: list[str] | None = None) -> E:
    names = names or ["key_norm", "value_norm", "key_sim", "redundancy"] + (["attn", "attn_logits"] if queries_ok else [])
    name = draw(st.sampled_from(names))
    b = BUILTINS[name]
    args = []
    for arg in b.args:
        if draw(st.booleans()):
            args.append((arg.name, None, False))
            continue
        if arg.kind == "enum":
            value = E((draw(st.sampled_from(arg.choices)),))
        else:
            value = number(draw, ctx, arg.unit)
        args.append((arg.name, value, False))
    return E(call(draw, name, args), ATOM, kind="tensor", nonneg=b.result == "nonneg", queries=b.needs_queries)


def tensor(draw, ctx: Ctx, queries_ok: bool, depth: int = 2, avoid: frozenset = frozenset()) -> E:
    """A per-token score; `avoid`: calibrated scalars it must not depend on."""
    refs = [t for t in ctx.tensors if (queries_ok or not t.queries) and not (t.uses & avoid)]
    choice = draw(st.integers(0, 9)) if depth > 0 else draw(st.integers(0, 3))
    if choice <= 1 or (choice <= 3 and not refs):
        return signal(draw, ctx, queries_ok)
    if choice <= 3:
        return draw(st.sampled_from(refs))
    inner = tensor(draw, ctx, queries_ok, depth - 1, avoid)
    if choice <= 5:  # a transform
        fn = draw(st.sampled_from(["softmax", "normalize", "log", "exp", "pool", "head_mean"]))
        if fn == "pool":
            op = E((draw(st.sampled_from(["max", "mean"])),))
            kernel = lit(draw, draw(st.sampled_from([1, 3, 5, 7, 31])))
            toks = call(draw, "pool", [("op", op, True), ("kernel", kernel, True), ("x", inner, True)])
            nonneg = inner.nonneg
        else:
            if BUILTINS[fn].args[0].nonneg and not inner.nonneg:
                inner = make_nonneg(draw, inner)
            toks = call(draw, fn, [("x", inner, True)])
            result = BUILTINS[fn].result
            nonneg = inner.nonneg if result == "same" else result == "nonneg"
        return replace(inner, toks=toks, prec=ATOM, nonneg=nonneg)
    if choice == 6:  # negation
        return replace(inner, toks=("-", *paren(draw, inner, NEG)), prec=NEG, nonneg=False)
    op = draw(st.sampled_from("+-*/"))
    if choice == 7:  # score op score
        other = tensor(draw, ctx, queries_ok, depth - 1, avoid)
    else:  # score op number (a plain number, a dimensionless param or a calibrated scalar)
        cals = [c for c in ctx.calibrations if c not in avoid]
        if cals and draw(st.booleans()):
            cal = draw(st.sampled_from(cals))
            other = E((cal,), ATOM, value=None, unit="float", nonneg=True, uses=frozenset({cal}))
        else:
            other = number(draw, ctx, draw(st.sampled_from(["float", "prob", "int"])))
            if other.value == 0:
                other = lit(draw, 2)
    left, right = (inner, other) if draw(st.booleans()) or op in "/" else (other, inner)
    nonneg = left.nonneg and right.nonneg and op != "-"
    return binop(draw, left, op, right, kind="tensor", nonneg=nonneg, queries=inner.queries or other.queries, uses=inner.uses | other.uses)


def make_nonneg(draw, t: E) -> E:
    fn = draw(st.sampled_from(["softmax", "normalize", "exp"]))
    return replace(t, toks=(fn, "(", *t.toks, ")"), prec=ATOM, nonneg=True)


def nonneg_tensor(draw, ctx: Ctx, queries_ok: bool, avoid: frozenset = frozenset()) -> E:
    t = tensor(draw, ctx, queries_ok, avoid=avoid)
    return t if t.nonneg else make_nonneg(draw, t)


# ----------------------------------------------------------------- selections


def selection(draw, ctx: Ctx, bounded: bool, depth: int = 2, positional_only: bool = False) -> E:
    kinds = ["first", "last"] if positional_only else ["first", "last", "top_k", "top_p"] + ([] if bounded else ["threshold"])
    if depth > 0 and not positional_only and draw(st.integers(0, 4)) == 0:
        kinds = ["union"]
    kind = draw(st.sampled_from(kinds))
    q = ctx.observe
    if kind in ("first", "last"):
        count = number(draw, ctx, "tokens", high=5000)
        n = count_value(count)
        return E((kind, *paren(draw, count, SUM)), POSITIONAL, kind="selection", max_tokens=n, protected=n, positional=True)
    if kind == "top_k":
        score = tensor(draw, ctx, q)
        k = number(draw, ctx, "tokens", high=5000)
        toks = call(draw, "top_k", [("x", score, True), ("k", k, True)])
        return E(toks, ATOM, kind="selection", queries=score.queries, max_tokens=count_value(k))
    if kind == "top_p":
        score = nonneg_tensor(draw, ctx, q)
        p = number(draw, ctx, "prob")
        limit = number(draw, ctx, "tokens", high=5000) if bounded or draw(st.booleans()) else None
        toks = call(draw, "top_p", [("x", score, True), ("p", p, True), ("limit", limit, False)])
        return E(toks, ATOM, kind="selection", queries=score.queries, max_tokens=count_value(limit) if limit else None)
    if kind == "threshold":
        score = tensor(draw, ctx, q)
        bound = number(draw, ctx, draw(st.sampled_from(["float", "prob"])))
        op = draw(st.sampled_from([">", ">=", "<", "<="]))
        left, right = (score, bound) if draw(st.booleans()) else (bound, score)
        toks = (*paren(draw, left, SUM), op, *paren(draw, right, SUM))
        return E(toks, COMPARE, kind="selection", queries=score.queries, max_tokens=None)
    a = selection(draw, ctx, bounded, depth - 1)
    b = selection(draw, ctx, bounded, depth - 1)
    toks = (*paren(draw, a, UNION), "|", *paren(draw, b, POSITIONAL))
    most = a.max_tokens + b.max_tokens if a.max_tokens is not None and b.max_tokens is not None else None
    return E(toks, UNION, kind="selection", queries=a.queries or b.queries, max_tokens=most, protected=a.protected + b.protected)


def index_set(draw, ctx: Ctx) -> tuple[str, ...]:
    if draw(st.booleans()):
        lo = draw(st.integers(0, 40))
        hi = lo + draw(st.integers(0, 40))
        a, b = number(draw, ctx, "int", fallback=lo), number(draw, ctx, "int", fallback=hi)
        if not (0 <= a.value <= b.value <= 4096):
            a, b = lit(draw, lo), lit(draw, hi)
        return (*paren(draw, a, SUM), "..", *paren(draw, b, SUM))
    values = draw(st.lists(st.integers(0, 4096), min_size=1, max_size=5, unique=True))
    toks: list[str] = ["["]
    for i, v in enumerate(values):
        if i:
            toks.append(",")
        toks.extend(lit(draw, v).toks)
    return (*toks, "]")


def layer_shape(draw, ctx: Ctx) -> tuple[tuple[str, ...], float]:
    """(tokens, peak factor as the checker computes it)."""
    kind = draw(st.sampled_from(["uniform", "pyramid", "linear", "table"]))
    if kind == "uniform":
        return ("uniform", "(", ")"), 1.0
    if kind == "pyramid":
        beta = number(draw, ctx, "float", low=1.0, fallback=20)
        given = draw(st.booleans())
        toks = call(draw, "pyramid", [("beta", beta if given else None, False)])
        b = float(beta.value) if given else 20.0
        return toks, 2 - 1 / b
    if kind == "linear":
        # first/last are keywords, so linear's arguments can only be positional.
        first = lit(draw, draw(st.sampled_from([0, 0.5, 1, 2, 4])))
        last = lit(draw, draw(st.sampled_from([0.5, 1, 2, 3])))
        mean = (first.value + last.value) / 2
        return ("linear", "(", *first.toks, ",", *last.toks, ")"), max(first.value, last.value) / mean
    weights = draw(st.lists(st.sampled_from([0, 0.5, 1, 2, 3]), min_size=1, max_size=6))
    if sum(weights) <= 0:
        weights[0] = 1
    toks: list[str] = ["["]
    for i, w in enumerate(weights):
        if i:
            toks.append(",")
        toks.extend(lit(draw, w).toks)
    ws = [float(w) for w in weights]
    return (*toks, "]"), max(ws) / (sum(ws) / len(ws))


# ======================================================================
# Statements and whole policies
# ======================================================================


def cap_for(draw, total: float, positional: int, scored: bool, protected: int = 0) -> E:
    """A cap the checker accepts for a keep set of at most `total` tokens."""
    low = math.ceil(total + 1e-6)
    if protected and protected >= low:
        low = protected + 1
    if not protected and scored and positional >= low:
        low = positional + 1
    return lit(draw, max(low, 1) + draw(st.sampled_from([0, 0, 1, 7, 100])))


def param_statement(draw, ctx: Ctx) -> list[str]:
    name = ctx.fresh(draw)
    unit = draw(st.sampled_from(UNITS))
    default = number(draw, ctx, unit, whole=unit in ("tokens", "steps"))
    value = default.value
    if unit in COUNT_UNITS:
        value = int(value)
    ctx.params[name] = (unit, value)
    return ["param", name, ":", unit, "=", *default.toks]


def calibrate_statement(draw, ctx: Ctx, name: str) -> list[str]:
    q = ctx.observe
    scope = draw(st.sampled_from([["layer"], ["kv_head"], ["(", "layer", ",", "kv_head", ")"], ["(", "kv_head", ",", "layer", ")"], ["(", "layer", ")"]]))
    avoid = frozenset({name})
    target = nonneg_tensor(draw, ctx, q, avoid=avoid)
    items = [["target", *call(draw, "top_p_count", [("x", target, True), ("p", number(draw, ctx, "prob"), True)])]]
    inner = tensor(draw, ctx, q)
    op = draw(st.sampled_from("*/+"))
    t = E((name,), ATOM)
    mixed = binop(draw, inner, op, t) if draw(st.booleans()) or op == "/" else binop(draw, t, op, inner)
    fn = draw(st.sampled_from(["softmax", "normalize", "exp"]))
    items.append(["metric", fn, "(", *mixed.toks, ")"])
    if draw(st.booleans()):
        solver = draw(st.sampled_from(["adam", "bisect"]))
        spec = [("lr", lit(draw, draw(st.sampled_from([0.01, 0.1, 1]))), False)] if solver == "adam" else []
        spec += [("steps", lit(draw, draw(st.integers(1, 500))), False), ("tol", lit(draw, draw(st.sampled_from([0.01, 0.001]))), False)]
        spec = [(n, v if draw(st.booleans()) else None, r) for n, v, r in spec]
        items.append(["solve", *call(draw, solver, spec)])
    lo, hi = draw(st.sampled_from([(0.001, 10), (0.5, 2), (0.01, 100), (1, 1.5)]))
    has_clamp, has_init = draw(st.booleans()), draw(st.booleans())
    if not has_clamp:
        lo, hi = 0.001, 10
    if has_clamp:
        items.append(["clamp", "[", *lit(draw, lo).toks, ",", *lit(draw, hi).toks, "]"])
    if has_init or not lo <= 1 <= hi:
        items.append(["init", *lit(draw, draw(st.sampled_from([lo, hi, (lo + hi) / 2]))).toks])
    fit = draw(st.sampled_from(["none", "once", "every", "from"]))
    if fit == "once":
        items.append(["fit", "once"])
    elif fit == "every":
        items.append(["fit", "every", *number(draw, ctx, "int", low=1, fallback=4).toks, "compressions"])
    elif fit == "from":
        items.append(["fit", "from", '"' + draw(st.sampled_from(["t.json", "calib/T.pt", "a b#{c}.json"])) + '"'])
    items = draw(st.permutations(items))
    return ["calibrate", name, "per", *scope, "{", *[t for item in items for t in item], "}"]


def keep_statement(draw, ctx: Ctx, name: str, sel: E, clauses_ok: bool, capped: bool) -> tuple[list[str], float, str]:
    """Tokens, the selection's peak (max tokens x by-layer factor) and its `per`."""
    clauses: list[list[str]] = []
    factor, per = 1.0, "kv_head"
    if clauses_ok and not sel.positional:
        per = draw(st.sampled_from(["none", "kv_head", "kv_head"] + ([] if capped else ["layer"])))
        if per != "none":
            clauses.append(["per", per])
        else:
            per = "kv_head"
        if per == "layer" and draw(st.booleans()):
            clauses.append(["floor", *paren(draw, number(draw, ctx, "prob"), SUM)])
        if draw(st.integers(0, 2)) == 0:
            shape, factor = layer_shape(draw, ctx)
            clauses.append(["by", "layer", *shape])
    for word in ("layers", "kv_heads"):
        if draw(st.integers(0, 4)) == 0:
            clauses.append(["in", word, *index_set(draw, ctx)])
    clauses = draw(st.permutations(clauses))
    peak = sel.max_tokens * factor if sel.max_tokens is not None else math.inf
    return ["keep", name, "=", *sel.toks, *[t for c in clauses for t in c]], peak, per


def merge_tokens(draw, ctx: Ctx) -> list[str]:
    toks = ["merge", "evicted", "into", draw(st.sampled_from(["nearest", "top"]))]
    if draw(st.booleans()):
        toks += ["weighted", "by", *nonneg_tensor(draw, ctx, ctx.observe).toks]
    return toks


def compress_statement(draw, ctx: Ctx) -> list[str]:
    triggers: list[list[str]] = []
    kinds = draw(st.lists(st.sampled_from(["prefill", "every", "when"]), min_size=1, max_size=3))
    if ctx.prefill_only:
        kinds = ["prefill"]
    if kinds.count("prefill") > 1:
        kinds = ["prefill"] + [k for k in kinds if k != "prefill"]
    for kind in kinds:
        if kind == "prefill":
            triggers.append(["at", "prefill"])
            continue
        guard: list[str] = []
        if kind == "when" or draw(st.booleans()):
            guard = ["when", "length", draw(st.sampled_from([">", ">="])), *number(draw, ctx, "tokens").toks]
        if kind == "every":
            triggers.append(["every", *number(draw, ctx, "steps").toks, "steps", *guard])
        else:
            triggers.append(guard)
    out = ["compress"]
    for i, t in enumerate(triggers):
        if i:
            out.append(",")
        out.extend(t)
    return out


def cascade_statement(draw, ctx: Ctx, protected: int) -> list[str]:
    n = draw(st.integers(1, 3))
    names = [ctx.fresh(draw, "t") for _ in range(n)]
    out = ["cascade", "{"]
    for i, name in enumerate(names):
        clauses: list[list[str]] = []
        if i == 0:
            clauses.append(["new"])
        else:
            if draw(st.booleans()):
                src = draw(st.sampled_from(names[:i]))
                every = ["every", *number(draw, ctx, "int", low=1, fallback=2).toks, "compressions"] if draw(st.booleans()) else []
                clauses.append(["from", src, *every])
        capped = draw(st.booleans())
        if i > 0 and draw(st.booleans()):
            sel = selection(draw, ctx, bounded=capped)
            per = draw(st.sampled_from(["", "kv_head"] + ([] if capped else ["layer"])))
            clauses.append(["select", *sel.toks, *(["per", per] if per else [])])
            if capped:
                scored = not sel.positional
                clauses.append(["cap", *cap_for(draw, protected + sel.max_tokens, sel.protected, scored, protected).toks])
        elif capped:
            clauses.append(["cap", *number(draw, ctx, "tokens", low=1, fallback=64).toks])
            ctx.prefill_only = ctx.prefill_only or i > 0
        if draw(st.booleans()):
            clauses.append(["layout", draw(st.sampled_from(["contiguous", "mask", "flatten_max", "flatten_sum"]))])
        if draw(st.booleans()):
            clauses.append(["store", draw(st.sampled_from(["native", "fp16", "bf16", "int8", "int4"]))])
        if draw(st.integers(0, 3)) == 0:
            clauses.append(merge_tokens(draw, ctx))
        if not clauses:
            clauses.append(["layout", "mask"])
        clauses = draw(st.permutations(clauses))
        out += ["tier", name, ":"]
        for j, c in enumerate(clauses):
            if j:
                out.append(",")
            out.extend(c)
    return out + ["}"]


@st.composite
def valid_policy(draw) -> tuple[list[list[str]], list[str]]:
    """(statements as token lists, header tokens)."""
    ctx = Ctx()
    statements: list[list[str]] = []
    name = ctx.fresh(draw)
    header = ["policy", name]
    if draw(st.booleans()):
        doc = draw(st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"'), max_size=30))
        header.append(f'"{doc}"')

    for _ in range(draw(st.integers(0, 4))):
        statements.append(param_statement(draw, ctx))
    ctx.observe = draw(st.booleans())
    if ctx.observe:
        statements.append(["observe", "queries", "last", *number(draw, ctx, "tokens", low=1, fallback=32).toks])
    for _ in range(draw(st.integers(0, 2))):  # states see every query, observed or not
        state_name = ctx.fresh(draw)
        update = signal(draw, ctx, queries_ok=True, names=["attn"])  # what a state may accumulate
        decay = ["decay", *number(draw, ctx, "prob").toks] if draw(st.booleans()) else []
        statements.append(["state", state_name, "+=", *update.toks, *decay])
        ctx.tensors.append(E((state_name,), kind="tensor", nonneg=update.nonneg, uses=update.uses))
    for _ in range(draw(st.integers(0, 1))):
        cal = ctx.fresh(draw)
        statements.append(calibrate_statement(draw, ctx, cal))
        ctx.calibrations.append(cal)
    for _ in range(draw(st.integers(0, 3))):
        score_name = ctx.fresh(draw)
        expr = tensor(draw, ctx, ctx.observe)
        statements.append(["score", score_name, "=", *expr.toks])
        ctx.tensors.append(E((score_name,), kind="tensor", nonneg=expr.nonneg, queries=expr.queries, uses=expr.uses))

    mode = draw(st.sampled_from(["none", "keeps", "keeps", "cascade"]))
    if mode == "keeps":
        capped = draw(st.booleans())
        peaks, positional, scored = [], 0, False
        for _ in range(draw(st.integers(1, 3))):
            sel = selection(draw, ctx, bounded=capped)
            toks, peak, _ = keep_statement(draw, ctx, ctx.fresh(draw), sel, clauses_ok=True, capped=capped)
            statements.append(toks)
            peaks.append(peak)
            positional += sel.protected
            scored = scored or not sel.positional
        if capped:
            statements.append(["cap", *cap_for(draw, sum(peaks), positional, scored).toks])
    elif mode == "cascade":
        protected = 0
        for _ in range(draw(st.integers(0, 2))):
            sel = selection(draw, ctx, bounded=True, positional_only=True)
            toks, _, _ = keep_statement(draw, ctx, ctx.fresh(draw), sel, clauses_ok=False, capped=False)
            statements.append(toks)
            protected += sel.protected
        statements.append(cascade_statement(draw, ctx, protected))
        if draw(st.integers(0, 3)) == 0:  # the policy cap must hold the first/last keeps
            statements.append(["cap", *cap_for(draw, protected, protected, scored=False).toks])
    elif draw(st.integers(0, 3)) == 0:
        statements.append(["cap", *number(draw, ctx, "tokens", low=1, fallback=100).toks])
    if mode != "none":
        statements.append(compress_statement(draw, ctx))
    if draw(st.integers(0, 3)) == 0:
        statements.append(merge_tokens(draw, ctx))
    if draw(st.integers(0, 3)) == 0:
        statements.append(["skip", "layers", *index_set(draw, ctx)])
    statements = draw(st.permutations(statements))
    return statements, header


# ----------------------------------------------------------------- layout: whitespace and comments

COMMENT_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=20)
_GLUE = set("(){}[],:=|+-*/")


def _can_touch(left: str, right: str) -> bool:
    if not left or not right:
        return False
    a, b = left[-1], right[0]
    if a in "<>+" and b == "=":
        return False
    if a == "." or b == ".":
        return False
    if left == '"' or (left.startswith('"') and right.startswith('"')):
        return False
    return a in _GLUE or b in _GLUE


def separator(draw, left: str, right: str, comments: list[str]) -> str:
    kind = draw(st.sampled_from(["space"] * 10 + ["none"] * 3 + ["newline"] * 3 + ["tab", "blank", "comment", "crlf", "formfeed", "cr"]))
    if kind == "none" and _can_touch(left, right):
        return ""
    if kind == "comment":
        text = "#" + draw(COMMENT_TEXT)
        comments.append(text)
        return draw(st.sampled_from([" ", "  ", ""])) + text + "\n" + draw(st.sampled_from(["", "  ", "\n"]))
    return {"none": " ", "space": " ", "newline": "\n  ", "tab": "\t", "blank": "\n\n  ", "crlf": "\r\n", "formfeed": "\x0c", "cr": " \r "}[kind]


@st.composite
def valid_policy_text(draw) -> tuple[str, list[str]]:
    statements, header = draw(valid_policy())
    tokens = [*header, "{", *[t for s in statements for t in s], "}"]
    comments: list[str] = []
    parts = []
    if draw(st.integers(0, 3)) == 0:
        text = "#" + draw(COMMENT_TEXT)
        comments.append(text)
        parts.append(text + "\n")
    for i, tok in enumerate(tokens):
        if i:
            parts.append(separator(draw, tokens[i - 1], tok, comments))
        parts.append(tok)
    if draw(st.booleans()):
        parts.append("\n")
    if draw(st.integers(0, 3)) == 0:
        text = "#" + draw(COMMENT_TEXT)
        comments.append(text)
        parts.append(" " + text)
    return "".join(parts), comments


# ======================================================================
# Properties of valid policies
# ======================================================================


def fmt(text: str) -> str:
    return formatter.format_policy(syntax.parse(text), text)


def comment_texts(text: str) -> Counter:
    return Counter(c.text for c in syntax.parse(text).comments)


def _note(message: str) -> None:
    """hypothesis.note inside a hypothesis test; nothing in a plain one."""
    try:
        note(message)
    except InvalidArgument:
        pass


def assert_formatting_keeps_meaning(text: str, policy: ir.Policy) -> str:
    formatted = fmt(text)
    _note(f"formatted:\n{formatted}")
    again = kvpolicy.compile_text(formatted, "formatted.kvp")
    assert again.content_hash == policy.content_hash
    assert again.model_dump() == policy.model_dump()
    assert fmt(formatted) == formatted, "fmt is not idempotent"
    assert comment_texts(formatted) == comment_texts(text), "fmt lost or changed a comment"
    return formatted


def assert_json_round_trip(policy: ir.Policy) -> None:
    back = ir.Policy.model_validate_json(policy.model_dump_json())
    assert back == policy
    assert back.content_hash == policy.content_hash


SHIPPED = library.shipped()


@settings(max_examples=300, **SETTINGS)
@given(valid_policy_text())
@example(("policy e {}", []))
@example((SHIPPED["hardkv"], [l.strip()[l.strip().index("#"):] for l in SHIPPED["hardkv"].splitlines() if "#" in l]))
def test_generated_policies_check_and_format(case) -> None:
    text, comments = case
    note(f"source:\n{text}")
    policy = kvpolicy.compile_text(text, "generated.kvp")
    assert Counter(c.rstrip() for c in comments) == comment_texts(text), "the parser lost a comment"
    assert_formatting_keeps_meaning(text, policy)
    assert_json_round_trip(policy)
    # The same text as UTF-8 bytes means the same thing.
    assert kvpolicy.compile_text(text.encode("utf-8"), "generated.kvp") == policy


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_policies_are_canonical(name: str) -> None:
    text = SHIPPED[name]
    policy = kvpolicy.compile_text(text, f"policies/{name}.kvp")
    assert fmt(text) == text, f"policies/{name}.kvp is not in canonical form"
    assert_formatting_keeps_meaning(text, policy)
    assert_json_round_trip(policy)


# ======================================================================
# Well-formed text with random meaning: every grammar form in every slot
# ======================================================================
# The checker must reject nonsense with positioned errors (never crash), and
# `fmt` must print the same tree back whatever the text means.

WORDS = sorted(set(BUILTINS) | ENUM_WORDS | set(UNITS) | {"s", "z", "T", "p", "budget", "window", "acc", "x", "k"})


def any_call(draw, depth: int) -> E:
    """A call, with positional and keyword arguments in any order."""
    toks: list[str] = [draw(st.sampled_from(WORDS)), "("]
    for i in range(draw(st.integers(0, 3))):
        if i:
            toks.append(",")
        if draw(st.booleans()):
            toks += [draw(st.sampled_from(WORDS)), "="]
        toks += any_expr(draw, depth - 1).toks
    return E((*toks, ")"))


def any_expr(draw, depth: int = 3) -> E:
    choice = draw(st.integers(0, 14)) if depth > 0 else draw(st.integers(0, 2))
    if choice == 0:
        return E((literal_text(draw, draw(st.sampled_from([0, 1, 2, 7, 0.5, 1e-3, 1024, 4096, 1e15]))),))
    if choice in (1, 2):
        return E((draw(st.sampled_from(WORDS)),))
    if choice in (3, 4):
        return any_call(draw, depth)
    if choice == 5:
        toks = ["["]
        for i in range(draw(st.integers(0, 3))):
            if i:
                toks.append(",")
            toks += any_expr(draw, depth - 1).toks
        return E((*toks, "]"))
    if choice == 6:
        inner = any_expr(draw, depth - 1)
        return E(("-", *paren(draw, inner, NEG)), NEG)
    if choice in (7, 8, 9):
        op = draw(st.sampled_from("+-*/"))
        return binop(draw, any_expr(draw, depth - 1), op, any_expr(draw, depth - 1))
    if choice == 10:
        return E((draw(st.sampled_from(["first", "last"])), *paren(draw, any_expr(draw, depth - 1), SUM)), POSITIONAL)
    if choice in (11, 12):
        a, b = any_expr(draw, depth - 1), any_expr(draw, depth - 1)
        return E((*paren(draw, a, SUM), draw(st.sampled_from([">", ">=", "<", "<="])), *paren(draw, b, SUM)), COMPARE)
    a, b = any_expr(draw, depth - 1), any_expr(draw, depth - 1)
    return E((*paren(draw, a, UNION), "|", *paren(draw, b, POSITIONAL)), UNION)


def any_index_set(draw) -> list[str]:
    if draw(st.booleans()):
        toks = ["["]
        for i in range(draw(st.integers(0, 3))):
            if i:
                toks.append(",")
            toks += any_expr(draw, 1).toks
        return [*toks, "]"]
    return [*any_expr(draw, 2).toks, "..", *any_expr(draw, 2).toks]


def any_name(draw) -> str:
    return draw(st.sampled_from(WORDS + ["a", "b", "t0", "t1", "dense", "sparse"]))


def any_merge(draw) -> list[str]:
    toks = ["merge", "evicted", "into", any_name(draw)]
    return toks + (["weighted", "by", *any_expr(draw).toks] if draw(st.booleans()) else [])


def any_statement(draw) -> list[str]:
    kind = draw(st.sampled_from(["param", "observe", "score", "state", "calibrate", "keep", "keep", "cap", "skip", "merge", "compress", "cascade"]))
    e = lambda depth=3: list(any_expr(draw, depth).toks)  # noqa: E731
    if kind == "param":
        return ["param", any_name(draw), ":", any_name(draw), "=", *e()]
    if kind == "observe":
        return ["observe", "queries", "last", *e()]
    if kind == "score":
        return ["score", any_name(draw), "=", *e()]
    if kind == "state":
        return ["state", any_name(draw), "+=", *e(), *(["decay", *e(1)] if draw(st.booleans()) else [])]
    if kind == "calibrate":
        names = draw(st.lists(st.sampled_from(["layer", "kv_head", "head", "x"]), min_size=1, max_size=3))
        scope = [names[0]] if len(names) == 1 and draw(st.booleans()) else ["(", *",".join(names).replace(",", " , ").split(), ")"]
        items: list[str] = []
        for _ in range(draw(st.integers(0, 6))):
            item = draw(st.sampled_from(["target", "metric", "solve", "init", "clamp", "fit"]))
            if item == "solve":
                items += ["solve", *any_call(draw, 2).toks]
            elif item == "clamp":
                items += ["clamp", "[", *e(1), ",", *e(1), "]"]
            elif item == "fit":
                items += draw(st.sampled_from([["fit", "once"], ["fit", "every", *e(1), "compressions"], ["fit", "from", '"f.json"'], ["fit", "from", '""']]))
            else:
                items += [item, *e()]
        return ["calibrate", any_name(draw), "per", *scope, "{", *items, "}"]
    if kind == "keep":
        toks = ["keep", any_name(draw), "=", *e()]
        for _ in range(draw(st.integers(0, 3))):
            clause = draw(st.sampled_from(["per", "floor", "by", "in"]))
            if clause == "per":
                toks += ["per", any_name(draw)]
            elif clause == "floor":
                toks += ["floor", *e(2)]
            elif clause == "by":
                toks += ["by", "layer", *e(2)]
            else:
                toks += ["in", draw(st.sampled_from(["layers", "kv_heads", "heads"])), *any_index_set(draw)]
        return toks
    if kind == "cap":
        return ["cap", *e()]
    if kind == "skip":
        return ["skip", "layers", *any_index_set(draw)]
    if kind == "merge":
        return any_merge(draw)
    if kind == "compress":
        toks = ["compress"]
        for i in range(draw(st.integers(1, 3))):
            if i:
                toks.append(",")
            guard = ["when", "length", draw(st.sampled_from([">", ">=", "<", "<="])), *e(2)]
            toks += draw(st.sampled_from([["at", "prefill"], ["every", *e(2), "steps"], ["every", *e(2), "steps", *guard], guard]))
        return toks
    toks = ["cascade", "{"]
    for _ in range(draw(st.integers(0, 3))):
        toks += ["tier", any_name(draw), ":"]
        for j in range(draw(st.integers(1, 4))):
            if j:
                toks.append(",")
            clause = draw(st.sampled_from(["new", "from", "select", "layout", "store", "cap", "merge"]))
            if clause == "new":
                toks.append("new")
            elif clause == "from":
                toks += ["from", any_name(draw), *(["every", *e(1), "compressions"] if draw(st.booleans()) else [])]
            elif clause == "select":
                toks += ["select", *e(), *(["per", any_name(draw)] if draw(st.booleans()) else [])]
            elif clause in ("layout", "store"):
                toks += [clause, any_name(draw)]
            elif clause == "cap":
                toks += ["cap", *e(2)]
            else:
                toks += any_merge(draw)
    return toks + ["}"]


@st.composite
def any_policy_text(draw) -> str:
    statements = [any_statement(draw) for _ in range(draw(st.integers(0, 8)))]
    tokens = ["policy", any_name(draw), *(['"doc"'] if draw(st.booleans()) else []), "{", *[t for s in statements for t in s], "}"]
    comments: list[str] = []
    parts = [tokens[0]]
    for i in range(1, len(tokens)):
        parts.append(separator(draw, tokens[i - 1], tokens[i], comments))
        parts.append(tokens[i])
    return "".join(parts) + "\n"


def shape(node):
    """An AST without positions, unions flattened (`a | (b | c)` prints as `a | b | c`)."""
    from dataclasses import fields, is_dataclass

    from kvpolicy import ast as A

    if isinstance(node, A.Binary) and node.op == "|":
        parts: list = []
        for side in (node.left, node.right):
            sub = shape(side)
            parts.extend(sub[1:] if isinstance(sub, tuple) and sub and sub[0] == "union" else [sub])
        return ("union", *parts)
    if isinstance(node, A.Ident):
        return node.name
    if is_dataclass(node):
        return (type(node).__name__, *(shape(getattr(node, f.name)) for f in fields(node) if f.name not in ("span", "name_span", "comments")))
    if isinstance(node, (tuple, list)):
        return tuple(shape(x) for x in node)
    return node


def assert_fmt_prints_the_same_tree(text: str, tree) -> str:
    formatted = formatter.format_policy(tree, text)
    _note(f"formatted:\n{formatted}")
    again = syntax.parse(formatted, "formatted.kvp")
    assert shape(again) == shape(tree), "fmt changed the tree"
    assert fmt(formatted) == formatted, "fmt is not idempotent"
    assert Counter(c.text for c in again.comments) == Counter(c.text for c in tree.comments), "fmt lost or changed a comment"
    return formatted


@settings(max_examples=400, **SETTINGS)
@given(any_policy_text())
def test_any_well_formed_text_checks_or_reports(text: str) -> None:
    _note(f"source:\n{text}")
    try:
        tree = syntax.parse(text, "any.kvp")  # the generator writes only well-formed text ...
    except kvpolicy.PolicyError as err:  # ... except a positional argument after a keyword one
        assert {d.message for d in err.diagnostics} == {"a positional argument cannot follow a keyword argument"}
        return
    formatted = assert_fmt_prints_the_same_tree(text, tree)
    policy = check_mutant(text.encode("utf-8"), "any.kvp")
    try:
        again = kvpolicy.compile_text(formatted, "formatted.kvp")
    except kvpolicy.PolicyError as err:
        assert_good_diagnostics(err, formatted.encode(), "formatted.kvp")
        assert policy is None, f"the formatted text no longer checks:\n{err}"
        return
    assert policy is not None, "the formatted text checks but the original did not"
    assert again.content_hash == policy.content_hash
    assert_json_round_trip(policy)


# ======================================================================
# Mutations of the shipped policies
# ======================================================================

TOKEN_RE = re.compile(rb"[A-Za-z_][A-Za-z_0-9]*|[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|\.\.|>=|<=|\+=|#[^\n]*|\"[^\"\n]*\"|\S")
INSERT_TOKENS = sorted(KEYWORDS | set(BUILTINS)) + list("{}()[],:=|+-*/<>\"#") + [
    "..", ">=", "+=", "0", "1", "-5", "0.5", "1e400", "99999999999999999999", "1e-400", "4097", "layer", "kv_head",
    "budget", "window", "s", "z", "T", "p", "\"unterminated", "# comment", "\n", "attn(", "top_p(s,", "first first", "-" * 200,
]
NAME_WORDS = {w.encode() for w in KEYWORDS | set(BUILTINS) | ENUM_WORDS | set(UNITS)}
ODD_CHARS = [b"\x00", b"\xff", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98\x80", "é".encode(), "\u00a0".encode(), b"\t", b"\r", b"\x0c", b"\x1b", b"\\"]


def _tokens(data: bytes) -> list[tuple[int, int]]:
    return [m.span() for m in TOKEN_RE.finditer(data)]


@st.composite
def mutant(draw, names: tuple[str, ...] = tuple(sorted(SHIPPED))) -> tuple[str, bytes]:
    name = draw(st.sampled_from(names))
    data = SHIPPED[name].encode("utf-8")
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from([
            "delete_char", "insert_char", "replace_char", "delete_token", "insert_token", "replace_token",
            "duplicate_line", "swap_lines", "truncate", "insert_bytes", "rename", "rename",
        ]))
        n = len(data)
        if op == "delete_char" and n:
            i = draw(st.integers(0, n - 1))
            data = data[:i] + data[i + 1 :]
        elif op in ("insert_char", "replace_char"):
            i = draw(st.integers(0, n))
            ch = draw(st.one_of(st.sampled_from(ODD_CHARS), st.sampled_from([bytes([c]) for c in b"{}()[],:=|+-*/<>.\"#\n 0123456789az_"])))
            data = data[:i] + ch + data[i + (1 if op == "replace_char" else 0) :]
        elif op in ("delete_token", "replace_token", "insert_token"):
            spans = _tokens(data)
            if not spans:
                continue
            start, end = draw(st.sampled_from(spans))
            new = draw(st.sampled_from(INSERT_TOKENS)).encode()
            if op == "delete_token":
                data = data[:start] + data[end:]
            elif op == "replace_token":
                data = data[:start] + new + data[end:]
            else:
                at = draw(st.sampled_from([start, end]))
                data = data[:at] + b" " + new + b" " + data[at:]
        elif op in ("duplicate_line", "swap_lines"):
            lines = data.split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            if op == "duplicate_line":
                lines.insert(i, lines[i])
            else:
                j = draw(st.integers(0, len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
            data = b"\n".join(lines)
        elif op == "rename":  # one name becomes another word: a built-in, a keyword, another name
            names = [m.span() for m in re.finditer(rb"[A-Za-z_][A-Za-z_0-9]*", data)]
            if not names:
                continue
            start, end = draw(st.sampled_from(names))
            words = sorted({m.group() for m in re.finditer(rb"[A-Za-z_][A-Za-z_0-9]*", data)} | NAME_WORDS)
            data = data[:start] + draw(st.sampled_from(words)) + data[end:]
        elif op == "truncate":
            data = data[: draw(st.integers(0, n))]
        elif op == "insert_bytes":
            i = draw(st.integers(0, n))
            data = data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    return name, data


def assert_good_diagnostics(err: kvpolicy.PolicyError, data: bytes, filename: str) -> None:
    lines = data.decode("utf-8", "replace").split("\n")
    assert err.diagnostics, "a PolicyError without diagnostics"
    for d in err.diagnostics:
        assert 1 <= d.span.line <= len(lines) + 1, (d, len(lines))
        assert d.span.col >= 1, d
        if d.span.line <= len(lines):
            assert d.span.col <= len(lines[d.span.line - 1]) + 1, (d, lines[d.span.line - 1])
        assert d.message and "\n" not in d.message, d
    rendered = err.render()
    first = err.diagnostics[0]
    assert rendered.startswith(f"{filename}:{first.span.line}:{first.span.col}: error: "), rendered
    heads = [line for line in rendered.split("\n") if re.match(rf"{re.escape(filename)}:\d+:\d+: error: ", line)]
    assert len(heads) == len(err.diagnostics), rendered
    assert "Traceback" not in rendered


def check_mutant(data: bytes, filename: str = "mutant.kvp") -> ir.Policy | None:
    try:
        return kvpolicy.compile_text(data, filename)
    except kvpolicy.PolicyError as err:
        assert_good_diagnostics(err, data, filename)
        return None


@pytest.mark.parametrize("shipped", sorted(SHIPPED))
@settings(max_examples=150, **SETTINGS)
@given(draws=st.data())
def test_mutants_check_or_report_a_position(shipped: str, draws) -> None:
    name, data = draws.draw(mutant((shipped,)), label="mutant")
    note(f"mutant of {name}: {data!r}")
    policy = check_mutant(data)
    if policy is not None:
        assert_json_round_trip(policy)
    # Whatever parses must also format: to text that parses, idempotently,
    # keeping every comment, and meaning the same.
    try:
        tree = syntax.parse(data, "mutant.kvp")
    except kvpolicy.PolicyError:
        return
    formatted = assert_fmt_prints_the_same_tree(data.decode("utf-8"), tree)
    try:
        again = kvpolicy.compile_text(formatted, "formatted.kvp")
    except kvpolicy.PolicyError as err:
        assert_good_diagnostics(err, formatted.encode(), "formatted.kvp")
        assert policy is None, f"the formatted text no longer checks:\n{err}"
        return
    assert policy is not None, "the formatted text checks but the original did not"
    assert again.content_hash == policy.content_hash and again.model_dump() == policy.model_dump()


_TMP = tempfile.TemporaryDirectory(prefix="kvpolicy-fuzz-")


@settings(max_examples=150, **SETTINGS)
@given(mutant())
def test_mutants_through_the_cli(case) -> None:
    name, data = case
    path = os.path.join(_TMP.name, f"{name}.kvp")
    with open(path, "wb") as f:
        f.write(data)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["check", path])
    stderr = err.getvalue()
    assert code in (0, 1), stderr
    assert "Traceback" not in stderr and "Traceback" not in out.getvalue()
    if code == 1:
        assert re.match(rf"{re.escape(path)}:\d+:\d+: error: ", stderr), stderr
    else:
        assert stderr == ""
