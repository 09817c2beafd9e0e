"""Policy expressions -> kernel steps.

An expression tree is cut where a template must materialise a tensor
(signals, softmax, normalize, pool, head_mean, top_p_count, the per-token
mean a selection reads); everything elementwise between two cuts (+ - * /,
negation, log, exp, numbers, calibrated scalars, states, named scores) is
inlined into the consumer as one @triton.jit function of (h, r, offs,
tmask). Numbers are folded in double precision, as the torch backend folds
them, and passed as runtime arguments: a new param value changes the
arguments, never the code.

Each emitter below handles one operation; `EMITTERS` is the table from
operation to emitter. An operation with no emitter is a compile error.
"""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field

from kvpolicy import ir
from kvpolicy.errors import KvpolicyError
from kvpolicy.program import op_of


class Unsupported(KvpolicyError):
    """A construct no template can lower yet (`what` names it)."""

    def __init__(self, what: str, kind: str = "score", name: str | None = None):
        super().__init__(f"the triton backend cannot lower {what} yet")
        self.what, self.kind, self.name = what, kind, name
        self.score: str | None = None  # the named score it sits in, if any


@dataclass(frozen=True)
class Buffer:
    """A tensor a step writes: [Hkv, rows, T] float32 (rows "Q" or 1), or
    [Hkv, T] for token scores, [Hkv, rows] int64 for counts."""

    id: int
    rows: str | int  # "Q" (one per observed query) or 1


@dataclass
class Inline:
    """An elementwise expression over leaves, as Triton source."""

    code: str
    tensors: list[Buffer | tuple] = field(default_factory=list)  # Buffer, or ("state", name)
    scalars: list[str] = field(default_factory=list)  # calibration names ([Hkv] per layer)
    consts: list[float] = field(default_factory=list)
    rows: str | int = 1


@dataclass
class Step:
    """One kernel launch. `template` names a fused template (with `inline`) or
    a fixed kernel; `static` are its constexprs (code), `args` its runtime
    numbers (values, never code)."""

    template: str
    out: Buffer
    inline: Inline | None = None
    inputs: tuple = ()  # buffers a fixed kernel reads
    static: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)
    note: str = ""  # what it computes, for the kernel header

    @property
    def kernel(self) -> str:
        return self.template if self.inline is None else f"{self.template}_{self.out.id}"


GROUPS = {"mean": 0, "max": 1, "sum": 2}
QUERY_REDUCE = {"mean": 0, "sum": 1, "max": 2}


class Lowering:
    """Walks a policy's expressions once; `steps` come out in dependency order."""

    def __init__(self, policy: ir.Policy):
        self.policy = policy
        self.steps: list[Step] = []
        self._memo: dict[str, Buffer] = {}  # canonical JSON of a subexpression -> its buffer
        self.computes: dict[int, tuple[str, object]] = {}  # buffer id -> ("tensor" | "token_scores", expression)
        self._next = 0

    # ------------------------------------------------------------- entry points

    def tensor(self, expr) -> Buffer:
        """The expression materialised as [Hkv, rows, T]."""
        key = _canonical(expr)
        if key in self._memo:
            return self._memo[key]
        emitter = EMITTERS.get(_operation(expr))
        if emitter is None:
            raise Unsupported(_describe(expr))
        if emitter is _emit_elementwise:
            inline = self.inline(expr)
            buf = self._step("map", inline.rows, inline=inline, note=_describe(expr))
        else:
            buf = emitter(self, expr)
        self._memo[key] = buf
        self.computes.setdefault(buf.id, ("tensor", expr))
        return buf

    def token_scores(self, expr) -> Buffer:
        """[Hkv, T]: what a selection ranks (the mean over observed rows)."""
        key = "token_scores:" + _canonical(expr)
        if key not in self._memo:
            inline = self.inline(expr)
            self._memo[key] = self._step("token_scores", "T", inline=inline, note=f"token scores of {_describe(expr)}")
            self.computes[self._memo[key].id] = ("token_scores", expr)
        return self._memo[key]

    def inline(self, expr) -> Inline:
        """The elementwise part of `expr` as code; the rest materialised as leaves."""
        out = Inline("")
        out.code = self._inline(expr, out)
        return out

    # ------------------------------------------------------------- recursion

    def _inline(self, e, out: Inline) -> str:
        folded = _fold(e)
        if folded is not None:
            out.consts.append(folded)
            return f"c{len(out.consts) - 1}"
        if isinstance(e, ir.Ref) and e.kind == "calibration":
            if e.name not in out.scalars:
                out.scalars.append(e.name)
            return f"s{out.scalars.index(e.name)}"
        if isinstance(e, ir.Ref) and e.kind == "state":
            return self._leaf(("state", e.name), 1, out)
        if isinstance(e, ir.Arith):
            left, right = self._inline(e.left, out), self._inline(e.right, out)
            if e.operator == "/":  # IEEE division on every target (GPU '/' may be approximate)
                return f"tl.math.div_rn({left}, {right})"
            return f"({left} {e.operator} {right})"
        if isinstance(e, ir.Negate):
            return f"(-{self._inline(e.operand, out)})"
        if isinstance(e, ir.Apply) and e.fn in ("log", "exp"):
            return f"tl.{e.fn}({self._inline(e.args[0], out)})"
        return self._leaf(self.tensor(e), None, out)

    def _leaf(self, source, rows, out: Inline) -> str:
        if source not in out.tensors:
            out.tensors.append(source)
        rows = source.rows if isinstance(source, Buffer) else rows
        if rows == "Q":
            out.rows = "Q"
        return f"x{out.tensors.index(source)}"

    def _step(self, template: str, rows, **kw) -> Buffer:
        buf = Buffer(self._next, rows)
        self._next += 1
        self.steps.append(Step(template, buf, **kw))
        return buf


# ----------------------------------------------------------------- emitters


def _emit_score_ref(low: Lowering, e: ir.Ref) -> Buffer:
    try:
        return low.tensor(low.policy.scores[e.name])
    except Unsupported as err:
        err.score = err.score or e.name  # the innermost named score holding the construct
        raise


def _emit_window(low: Lowering, e: ir.Signal) -> Buffer:
    probs = e.name == "attn"
    group = str(e.options.get("group", "mean" if probs else "max"))
    buf = low._step("window_signal", "Q", static={"PROBS": probs, "GROUP": GROUPS[group]},
                    note=f"{e.name}(group = {group}) of the observed window")
    how = str(e.options.get("queries", "none"))
    if how != "none":
        buf = low._step("reduce_queries", 1, inputs=(buf,), static={"HOW": QUERY_REDUCE[how]}, note=f"{how} over observed queries")
    return buf


def _emit_norm(low: Lowering, e: ir.Signal) -> Buffer:
    return low._step("row_norm", 1, static={"WHICH": e.name}, note=f"{e.name}()")


def _emit_key_sim(low: Lowering, e: ir.Signal) -> Buffer:
    return low._step("key_sim", 1, note="key_sim()")


def _emit_redundancy(low: Lowering, e: ir.Signal) -> Buffer:
    raw = low._step("redundancy_rows", 1, args={"threshold": float(e.options["threshold"])}, note="R-KV mean similarity to later duplicates")
    inline = Inline("x0", [raw], rows=1)
    return low._step("softmax", 1, inline=inline, note="redundancy(): softmax over tokens of the mean similarity")


def _emit_fused(template: str):
    def emit(low: Lowering, e: ir.Apply) -> Buffer:
        inline = low.inline(e.args[0])
        static = {}
        if e.fn == "pool":
            static = {"KS": int(e.options["kernel"]), "IS_MAX": e.options["op"] == "max"}
        args = {"p": float(e.options["p"])} if e.fn == "top_p_count" else {}
        return low._step(template, inline.rows, inline=inline, static=static, args=args, note=_describe(e))

    return emit


def _emit_elementwise(low: Lowering, e) -> Buffer:  # marker: handled by Lowering.tensor
    raise AssertionError


# Keyed by kvpolicy.ops.OPS names (program.op_of); "score" is a reference to a
# named score, which the lowering materialises once.
EMITTERS = {
    "score": _emit_score_ref,
    "attn": _emit_window,
    "attn_logits": _emit_window,
    "key_norm": _emit_norm,
    "value_norm": _emit_norm,
    "key_sim": _emit_key_sim,
    "redundancy": _emit_redundancy,
    "softmax": _emit_fused("softmax"),
    "normalize": _emit_fused("normalize"),
    "pool": _emit_fused("pool"),
    "head_mean": _emit_fused("head_mean"),
    "top_p_count": _emit_fused("top_p_count"),
    **dict.fromkeys(("log", "exp", "add", "sub", "mul", "div", "neg", "const", "state", "calibration"), _emit_elementwise),
}


# ----------------------------------------------------------------- helpers


def _operation(e) -> str | None:
    """The operation an IR expression is (a key of EMITTERS)."""
    return op_of(e) or ("score" if isinstance(e, ir.Ref) else None)


def _is_elementwise(e) -> bool:
    return EMITTERS.get(_operation(e)) is _emit_elementwise


_PYTHON_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _fold(e) -> float | None:
    """The value of an all-number subtree, in Python floats (as torch folds it)."""
    if isinstance(e, ir.Const):
        return float(e.value)
    if isinstance(e, ir.Negate):
        inner = _fold(e.operand)
        return None if inner is None else -inner
    if isinstance(e, ir.Arith):
        left, right = _fold(e.left), _fold(e.right)
        if left is None or right is None:
            return None
        if e.operator == "/" and right == 0:
            return None  # let the kernel divide (inf / nan as torch gives them)
        return _PYTHON_OPS[e.operator](left, right)
    return None


def _canonical(e) -> str:
    return json.dumps(e.model_dump(mode="json"), sort_keys=True)


def _describe(e) -> str:
    """A short readable form of an expression, for headers and diagnostics."""
    if isinstance(e, ir.Const):
        return "a number"
    if isinstance(e, ir.Ref):
        return e.name
    if isinstance(e, ir.Signal):
        return f"{e.name}()"
    if isinstance(e, ir.Apply):
        return f"{e.fn}({', '.join(_describe(a) for a in e.args)})"
    if isinstance(e, ir.Arith):
        return f"{_describe(e.left)} {e.operator} {_describe(e.right)}"
    if isinstance(e, ir.Negate):
        return f"-{_describe(e.operand)}"
    return type(e).__name__
