"""The built-in functions of the language: one table, read by the checker
(arity, argument units, ranges, enum choices), the language reference and
the did-you-mean suggestions. Adding a signal starts here."""
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


@dataclass(frozen=True)
class Builtin:
    name: str
    role: str  # signal | transform | count | selection | layer_shape | solver
    args: tuple[Arg, ...]
    doc: str
    needs_queries: bool = False  # reads the observed query window
    result: str = "real"  # signal/transform value range: "nonneg" | "real" | "same"


_GROUP = Arg("group", "enum", choices=("mean", "max", "sum"), default="mean")
_QUERIES = Arg("queries", "enum", choices=("none", "mean", "sum", "max"), default="none")

BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        # signals
        Builtin("attn", "signal", (_GROUP, _QUERIES), "attention probabilities of observed queries over held tokens, reduced over the GQA group", True, "nonneg"),
        Builtin("attn_logits", "signal", (Arg("group", "enum", choices=("mean", "max", "sum"), default="max"), _QUERIES), "pre-softmax attention scores q.k/sqrt(d), reduced over the GQA group", True, "real"),
        Builtin("key_norm", "signal", (), "L2 norm of each held key", False, "nonneg"),
        Builtin("value_norm", "signal", (), "L2 norm of each held value", False, "nonneg"),
        Builtin("key_sim", "signal", (), "cosine similarity of each key to the head's mean key", False, "real"),
        Builtin("redundancy", "signal", (Arg("threshold", "number", "prob", default=0.5),), "R-KV redundancy: softmax over tokens of each key's mean cosine similarity to the others (pairs below threshold ignored, most recent duplicate spared)", False, "nonneg"),
        # transforms
        Builtin("softmax", "transform", (Arg("x", "tensor"),), "softmax over held tokens", result="nonneg"),
        Builtin("normalize", "transform", (Arg("x", "tensor"),), "shift so the minimum is 0, then divide by the sum", result="nonneg"),
        Builtin("log", "transform", (Arg("x", "tensor", nonneg=True),), "natural logarithm (of a non-negative score)", result="real"),
        Builtin("exp", "transform", (Arg("x", "tensor"),), "exponential", result="nonneg"),
        Builtin("pool", "transform", (Arg("op", "enum", choices=("max", "mean")), Arg("kernel", "number", "int", low=1, high=4095, odd=True), Arg("x", "tensor")), "1-D pooling along tokens, stride 1, centred window", result="same"),
        Builtin("head_mean", "transform", (Arg("x", "tensor"),), "mean over the kv heads of a layer: every head gets the same score", result="same"),
        # counts (calibration targets)
        Builtin("top_p_count", "count", (Arg("x", "tensor", nonneg=True), Arg("p", "number", "prob")), "per query row: how many largest entries reach mass p"),
        # selections
        Builtin("top_k", "selection", (Arg("x", "tensor"), Arg("k", "number", "tokens")), "the k highest-scoring tokens"),
        Builtin("top_p", "selection", (Arg("x", "tensor", nonneg=True), Arg("p", "number", "prob"), Arg("limit", "number", "tokens", default=-1)), "fewest highest-scoring tokens whose normalised mass reaches p (at most limit)"),
        # by-layer shapes
        Builtin("uniform", "layer_shape", (), "the same count in every layer"),
        Builtin("pyramid", "layer_shape", (Arg("beta", "number", "float", default=20.0, low=1.0),), "PyramidKV: linear from (2 - 1/beta) x count at layer 0 to count/beta at the last"),
        Builtin("linear", "layer_shape", (Arg("start", "number", "float", low=0.0), Arg("end", "number", "float", low=0.0)), "weights linear from start (layer 0) to end (last layer)"),
        # calibration solvers
        Builtin("adam", "solver", (Arg("lr", "number", "float", default=0.01), Arg("steps", "number", "int", default=50, low=1, high=100000), Arg("tol", "number", "float", default=0.01)), "Adam on the squared mass error"),
        Builtin("bisect", "solver", (Arg("steps", "number", "int", default=40, low=1, high=100000), Arg("tol", "number", "float", default=0.01)), "bisection on the temperature (mass is monotone in it)"),
    ]
}

UNITS = ("tokens", "steps", "prob", "int", "float")
LAYOUTS = ("contiguous", "mask", "flatten_max", "flatten_sum")
POLICY_LAYOUTS = ("flatten_max", "flatten_sum")  # a non-cascade policy always compacts what it keeps
STORES = ("native", "fp16", "bf16", "int8", "int4")
MERGE_TARGETS = ("nearest", "top")
GRANULARITIES = ("kv_head", "layer")
SCOPES = ("layer", "kv_head")
RESTRICTABLE = ("layers", "kv_heads")


def names_with_role(*roles: str) -> list[str]:
    return [name for name, b in BUILTINS.items() if b.role in roles]
