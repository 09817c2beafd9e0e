"""The operation table: every operation of the language declared once.

What each layer needs to know about an operation lives here and nowhere else:
its arguments and their units (the checker, typecheck, did-you-mean, the
language reference), what it reads from the model (queries, keys, values,
positions, states), its output axes (one row per observed query, or one row
per head), its value range, and whether the number of tokens it keeps depends
on the scores (top_p, threshold) rather than on a count alone.

`OPS` holds every operation a lowered program can contain, including the core
ones the user writes as syntax (arithmetic, `first n`, `score > tau`);
`BUILTINS` is the callable subset (what `name(...)` may call). Adding a
signal is one entry here (see docs/internals.md).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str  # "tensor" | "number" | "enum"
    unit: str | None = None  # for numbers: tokens | steps | prob | int | float
    choices: tuple[str, ...] = ()  # for enums
    default: object = None  # None: required
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    odd: bool = False  # pool kernels are odd so the window is centred
    nonneg: bool = False  # tensor must be non-negative (top_p, top_p_count)


# What an operation may read from one layer of one sequence.
QUERIES, KEYS, VALUES, POSITIONS, STATES, CALIBRATION = "queries", "keys", "values", "positions", "states", "calibration"

# Output axes of an expression node, per kv head:
#   "rows":   one row per observed query [Q, T]
#   "token":  one row [1, T] (does not depend on queries)
#   "counts": one number per query row [Q] (top_p_count)
#   "scalar": one number (constants, calibrated scalars per head)
#   "inputs": the broadcast of its inputs' axes (transforms, arithmetic)


@dataclass(frozen=True)
class Op:
    name: str
    role: str  # signal | transform | count | selection | layer_shape | solver | core
    args: tuple[Arg, ...]
    doc: str
    reads: frozenset[str] = frozenset()
    result: str = "real"  # value range: "nonneg" | "real" | "same" (as its tensor inputs)
    axes: str = "inputs"
    sized_by_scores: bool = False  # selection: how many it keeps depends on the scores
    callable: bool = True  # written as name(...); False: syntax (arithmetic, first n, score > tau)
    mixes_heads: bool = False  # a head's value depends on the other kv heads of the layer

    @property
    def needs_queries(self) -> bool:
        return QUERIES in self.reads


_GROUP = Arg("group", "enum", choices=("mean", "max", "sum"), default="mean")
_QUERIES = Arg("queries", "enum", choices=("none", "mean", "sum", "max"), default="none")
_ATTN_READS = frozenset({QUERIES, KEYS, POSITIONS})

_TABLE = [
    # signals
    Op("attn", "signal", (_GROUP, _QUERIES), "attention probabilities of observed queries over held tokens, reduced over the GQA group", _ATTN_READS, "nonneg", "rows"),
    Op("attn_logits", "signal", (Arg("group", "enum", choices=("mean", "max", "sum"), default="max"), _QUERIES), "pre-softmax attention scores q.k/sqrt(d), reduced over the GQA group", _ATTN_READS, "real", "rows"),
    Op("key_norm", "signal", (), "L2 norm of each held key", frozenset({KEYS}), "nonneg", "token"),
    Op("value_norm", "signal", (), "L2 norm of each held value", frozenset({VALUES}), "nonneg", "token"),
    Op("key_sim", "signal", (), "cosine similarity of each key to the head's mean key", frozenset({KEYS}), "real", "token"),
    Op("redundancy", "signal", (Arg("threshold", "number", "prob", default=0.5),), "R-KV redundancy: softmax over tokens of each key's mean cosine similarity to the others (pairs below threshold ignored, most recent duplicate spared)", frozenset({KEYS, POSITIONS}), "nonneg", "token"),
    # transforms
    Op("softmax", "transform", (Arg("x", "tensor"),), "softmax over held tokens", result="nonneg"),
    Op("normalize", "transform", (Arg("x", "tensor"),), "shift so the minimum is 0, then divide by the sum", result="nonneg"),
    Op("log", "transform", (Arg("x", "tensor", nonneg=True),), "natural logarithm (of a non-negative score)", result="real"),
    Op("exp", "transform", (Arg("x", "tensor"),), "exponential", result="nonneg"),
    Op("pool", "transform", (Arg("op", "enum", choices=("max", "mean")), Arg("kernel", "number", "int", low=1, high=4095, odd=True), Arg("x", "tensor")), "1-D pooling along tokens, stride 1, centred window", result="same"),
    Op("head_mean", "transform", (Arg("x", "tensor"),), "mean over the kv heads of a layer: every head gets the same score", result="same", mixes_heads=True),
    # counts (calibration targets)
    Op("top_p_count", "count", (Arg("x", "tensor", nonneg=True), Arg("p", "number", "prob")), "per query row: how many largest entries reach mass p", result="nonneg", axes="counts"),
    # selections
    Op("top_k", "selection", (Arg("x", "tensor"), Arg("k", "number", "tokens")), "the k highest-scoring tokens"),
    Op("top_p", "selection", (Arg("x", "tensor", nonneg=True), Arg("p", "number", "prob"), Arg("limit", "number", "tokens", default=-1), Arg("floor", "number", "tokens", default=0)), "fewest highest-scoring tokens whose normalised mass reaches p (at most limit, at least floor)", sized_by_scores=True),
    Op("first", "selection", (Arg("n", "number", "tokens"),), "the n valid tokens with the smallest logical positions (protected)", frozenset({POSITIONS}), callable=False),
    Op("last", "selection", (Arg("n", "number", "tokens"),), "the n valid tokens with the largest logical positions (protected)", frozenset({POSITIONS}), callable=False),
    Op("threshold", "selection", (Arg("x", "tensor"), Arg("value", "number", "float")), "every token whose score passes `score OP value`", sized_by_scores=True, callable=False),
    Op("union", "selection", (), "what any part keeps", callable=False),
    # by-layer shapes
    Op("uniform", "layer_shape", (), "the same count in every layer"),
    Op("pyramid", "layer_shape", (Arg("beta", "number", "float", default=20.0, low=1.0),), "PyramidKV: linear from (2 - 1/beta) x count at layer 0 to count/beta at the last"),
    Op("linear", "layer_shape", (Arg("start", "number", "float", low=0.0), Arg("end", "number", "float", low=0.0)), "weights linear from start (layer 0) to end (last layer)"),
    # calibration solvers
    Op("adam", "solver", (Arg("lr", "number", "float", default=0.01), Arg("steps", "number", "int", default=50, low=1, high=100000), Arg("tol", "number", "float", default=0.01)), "Adam on the squared mass error"),
    Op("bisect", "solver", (Arg("steps", "number", "int", default=40, low=1, high=100000), Arg("tol", "number", "float", default=0.01)), "bisection on the temperature (mass is monotone in it)"),
    # core: written as syntax, present in every lowered program
    Op("const", "core", (), "a number", result="same", axes="scalar", callable=False),
    Op("state", "core", (), "a per-token state (`state acc += ...`)", frozenset({STATES}), "same", "token", callable=False),
    Op("calibration", "core", (), "a calibrated scalar per (layer[, kv_head])", frozenset({CALIBRATION}), "nonneg", "scalar", callable=False),
    Op("add", "core", (Arg("left", "tensor"), Arg("right", "tensor")), "left + right", callable=False),
    Op("sub", "core", (Arg("left", "tensor"), Arg("right", "tensor")), "left - right", callable=False),
    Op("mul", "core", (Arg("left", "tensor"), Arg("right", "tensor")), "left * right", callable=False),
    Op("div", "core", (Arg("left", "tensor"), Arg("right", "tensor")), "left / right", callable=False),
    Op("neg", "core", (Arg("x", "tensor"),), "-x", callable=False),
]

OPS: dict[str, Op] = {op.name: op for op in _TABLE}
BUILTINS: dict[str, Op] = {name: op for name, op in OPS.items() if op.callable}
ARITH_OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
Builtin = Op  # the checker's name for a callable operation

# How tightly each written form binds (formatter and explain): higher binds tighter.
PRECEDENCE = {"|": 1, "positional": 2, ">": 3, ">=": 3, "<": 3, "<=": 3, "+": 4, "-": 4, "*": 5, "/": 5, "neg": 6, "atom": 7}

UNITS = ("tokens", "steps", "prob", "int", "float")
LAYOUTS = ("contiguous", "mask", "flatten_max", "flatten_sum")
PHYSICAL_LAYOUTS = ("contiguous", "flatten_max", "flatten_sum")  # compaction moves tokens; "mask" does not
POLICY_LAYOUTS = ("flatten_max", "flatten_sum")  # a non-cascade policy always compacts what it keeps
STORES = ("native", "fp16", "bf16", "int8", "int4")
MERGE_TARGETS = ("nearest", "top")
GRANULARITIES = ("kv_head", "layer")
SCOPES = ("layer", "kv_head")
RESTRICTABLE = ("layers", "kv_heads")


def names_with_role(*roles: str) -> list[str]:
    return [name for name, op in BUILTINS.items() if op.role in roles]


def reading(*inputs: str, role: str = "signal") -> tuple[str, ...]:
    """Names of the operations of `role` that read any of `inputs` (e.g. the
    signals the HF engine must hand held keys or values to)."""
    return tuple(name for name, op in OPS.items() if op.role == role and op.reads & set(inputs))
