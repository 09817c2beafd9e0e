"""The IR: what a policy means, the one contract between language and backends.

Names are resolved, params substituted and folded into constants, defaults
made explicit. Every model is frozen pydantic and round-trips through JSON;
`Policy.content_hash` identifies the behaviour (the doc string is left out).
Backends read only this; they never re-read the source.

Semantics a backend must implement are documented on each node; the language
reference (docs/language.md) says the same for users.
"""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .ops import LAYOUTS, POLICY_LAYOUTS, STORES  # the one home of these names

IR_VERSION = 1

Unit = Literal["tokens", "steps", "prob", "int", "float"]
Group = Literal["mean", "max", "sum"]


class Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ----------------------------------------------------------------- expressions
# Per-token expressions. Each evaluates, per (layer, kv_head), to a tensor
# [Q, T] (Q observed queries x T held tokens) or [1, T] when it does not
# depend on queries; selections average the query axis away.


class Const(Node):
    op: Literal["const"] = "const"
    value: float | int
    unit: Unit | None = None  # None: a plain number


class Ref(Node):
    """A named score, state or calibrated scalar defined elsewhere in the policy."""

    op: Literal["ref"] = "ref"
    name: str
    kind: Literal["score", "state", "calibration"]


class Signal(Node):
    """A quantity read from the model: attn, attn_logits, key_norm, value_norm,
    key_sim, redundancy. `options` holds every keyword, defaults filled in."""

    op: Literal["signal"] = "signal"
    name: str
    options: dict[str, str | float | int] = Field(default_factory=dict)


class Apply(Node):
    """A transform of tensors: softmax, normalize, log, exp, pool, head_mean, top_p_count."""

    op: Literal["apply"] = "apply"
    fn: str
    args: tuple["Expr", ...]
    options: dict[str, str | float | int] = Field(default_factory=dict)


class Arith(Node):
    op: Literal["arith"] = "arith"
    operator: Literal["+", "-", "*", "/"]
    left: "Expr"
    right: "Expr"


class Negate(Node):
    op: Literal["neg"] = "neg"
    operand: "Expr"


Expr = Annotated[Union[Const, Ref, Signal, Apply, Arith, Negate], Field(discriminator="op")]

# ----------------------------------------------------------------- selections
# A selection names, per (layer, kv_head), the set of held tokens to keep.
# Positional selections are applied first and protect their tokens; scored
# selections then choose among the remaining tokens.


class First(Node):
    kind: Literal["first"] = "first"
    count: int


class Last(Node):
    kind: Literal["last"] = "last"
    count: int


class TopK(Node):
    kind: Literal["top_k"] = "top_k"
    score: Expr
    count: int


class TopP(Node):
    """Fewest highest-scoring tokens whose normalised score mass reaches p,
    at most `limit` of them when a limit is given, at least `floor` (of the
    candidates there are) when a floor is given: Ada-KV's safeguard for a
    head whose scores are peaked."""

    kind: Literal["top_p"] = "top_p"
    score: Expr
    p: float
    limit: int | None = None
    floor: int | None = None


class Threshold(Node):
    kind: Literal["threshold"] = "threshold"
    score: Expr
    operator: Literal[">", ">=", "<", "<="]
    value: float


class SelectUnion(Node):
    kind: Literal["union"] = "union"
    parts: tuple["Selection", ...]


Selection = Annotated[Union[First, Last, TopK, TopP, Threshold, SelectUnion], Field(discriminator="kind")]

# ----------------------------------------------------------------- statements


class Param(Node):
    unit: Unit
    value: float | int
    default: float | int


class LayerShape(Node):
    """How a count varies by layer; weights are normalised so their mean is 1."""

    kind: Literal["uniform", "pyramid", "linear", "table"]
    beta: float | None = None  # pyramid: the last layer gets count / beta
    start: float | None = None  # linear: relative weight of layer 0 ...
    end: float | None = None  # ... and of the last layer
    weights: tuple[float, ...] | None = None  # table: one weight per layer


class Keep(Node):
    name: str
    select: Selection
    per: Literal["kv_head", "layer"] = "kv_head"  # layer: the layer's heads share one budget
    floor: float | None = None  # per layer: each head keeps at least floor x its even share
    by_layer: LayerShape | None = None
    layers: tuple[int, ...] | None = None  # only these layers (None: all)
    kv_heads: tuple[int, ...] | None = None  # only these kv heads (None: all)


class State(Node):
    """Per-token accumulator: at each observed query, acc <- decay * acc + update."""

    name: str
    update: Expr
    decay: float = 1.0


class Solver(Node):
    kind: Literal["adam", "bisect"]
    steps: int
    tol: float
    lr: float | None = None  # adam only


class Fit(Node):
    kind: Literal["once", "every", "file"]
    every: int | None = None  # refit every N compressions
    file: str | None = None


class Calibration(Node):
    """A scalar per `scope` (e.g. per (layer, kv_head)) fitted so that the
    number of largest `metric` entries needed to reach mass p equals `target`
    (see docs/hardkv.md). `target` is a top_p_count application."""

    name: str
    scope: tuple[Literal["layer", "kv_head"], ...]
    target: Expr
    metric: Expr
    solver: Solver
    init: float
    clamp: tuple[float, float]
    fit: Fit


class Trigger(Node):
    kind: Literal["prefill", "every", "when"]
    every: int | None = None  # decode steps between compressions
    min_length: int | None = None  # run only when held length >= this


class Merge(Node):
    """Evicted tokens are merged into a kept one instead of dropped."""

    into: Literal["nearest", "top"]
    weight: Expr | None = None


class Tier(Node):
    """One level of a cascade. Tokens enter the first tier (`source == "new"`);
    every `every` compressions a tier takes tokens from `source`, applying
    `select` (None: all of them) and storing them with `layout` and `store`."""

    name: str
    source: str  # "new" or an earlier tier's name
    every: int = 1
    select: Selection | None = None
    per: Literal["kv_head", "layer"] = "kv_head"
    layout: Literal[LAYOUTS] = "contiguous"
    store: Literal[STORES] = "native"
    cap: int | None = None
    merge: Merge | None = None


class Policy(Node):
    ir_version: int = IR_VERSION
    name: str
    doc: str | None = None
    params: dict[str, Param] = Field(default_factory=dict)
    observe: int | None = None  # window of recent queries that score signals read
    scores: dict[str, Expr] = Field(default_factory=dict)  # in evaluation order
    states: tuple[State, ...] = ()
    calibrations: tuple[Calibration, ...] = ()
    keeps: tuple[Keep, ...] = ()
    cap: int | None = None  # at most this many tokens per kv head
    skip_layers: tuple[int, ...] = ()
    merge: Merge | None = None
    triggers: tuple[Trigger, ...] = ()  # empty: the policy never compresses
    cascade: tuple[Tier, ...] = ()
    # How compaction stores kept tokens (a cascade's tiers give their own):
    # flatten_max pads every kv head of a layer to its fullest head;
    # flatten_sum holds each head's tokens back to back, bytes = sum of counts.
    layout: Literal[POLICY_LAYOUTS] = "flatten_max"

    @property
    def compresses(self) -> bool:
        return bool(self.triggers)

    def canonical_json(self) -> str:
        data = self.model_dump(mode="json", exclude={"doc"})
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def content_hash(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_json().encode()).hexdigest()


for _model in (Apply, Arith, Negate, SelectUnion):
    _model.model_rebuild()
