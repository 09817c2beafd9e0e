"""IR -> Program: what a policy computes for one model shape, the one thing
backends read.

    program = lower(policy, shape)
    program.nodes    numbered expression nodes in dependency order; each
                     node's inputs come before it, each named score is one node
    program.steps    typed steps a runtime executes, in order:
                     Observe -> Accumulate -> Score -> Calibrate -> Select ->
                     Merge -> Store (or Tier steps for a cascade)

Per-layer counts are resolved for the shape (`by layer` budgets), so a backend
never redoes budget arithmetic. Every node's `op` is a key of
kvpolicy.ops.OPS; backends are tables from those keys to implementations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import ir
from .budgets import layer_counts
from .diagnostics import Diagnostic, PolicyError
from .errors import KvpolicyError
from .model_shape import ModelShape
from .ops import ARITH_OPS, OPS, PHYSICAL_LAYOUTS
from .walk import walk

# ------------------------------------------------------------------ nodes


@dataclass(frozen=True)
class Node:
    index: int
    op: str  # a key of ops.OPS
    inputs: tuple[int, ...]  # indices of earlier nodes
    attrs: dict = field(default_factory=dict)  # the op's non-tensor arguments (group, kernel, p, value, name)
    axes: str = "token"  # rows | token | counts | scalar (see ops.py)
    nonneg: bool = False
    name: str | None = None  # the named score this node computes, if any
    expr: ir.Node | None = field(default=None, compare=False, repr=False)  # the IR it was lowered from


# ------------------------------------------------------------------ steps


@dataclass(frozen=True)
class Observe:
    window: int  # recent queries each layer remembers


@dataclass(frozen=True)
class StateUpdate:
    name: str
    update: int  # node: the per-query-row update, read once per new query
    decay: float


@dataclass(frozen=True)
class Accumulate:
    states: tuple[StateUpdate, ...]


@dataclass(frozen=True)
class Score:
    scores: tuple[int, ...]  # nodes of the named scores, in evaluation order


@dataclass(frozen=True)
class Calibrate:
    name: str
    scope: tuple[str, ...]
    target: int  # node: a top_p_count
    metric: int  # node
    p: float
    solver: ir.Solver
    init: float
    clamp: tuple[float, float]
    fit: ir.Fit


@dataclass(frozen=True)
class Select:
    op: str  # first | last | top_k | top_p | threshold | union
    score: int | None = None  # node of the score (scored selections)
    counts: tuple[int, ...] | None = None  # per layer: n (first/last), k (top_k), limit (top_p)
    attrs: dict = field(default_factory=dict)  # p (top_p), operator and value (threshold)
    parts: tuple["Select", ...] = ()  # union

    def count(self, layer: int) -> int | None:
        return None if self.counts is None else self.counts[layer]

    @property
    def positional(self) -> bool:
        return self.op in ("first", "last") or (self.op == "union" and all(p.positional for p in self.parts))

    def flat(self) -> tuple["Select", ...]:
        """This selection's leaves (a union's parts, recursively)."""
        return tuple(leaf for part in self.parts for leaf in part.flat()) if self.op == "union" else (self,)


@dataclass(frozen=True)
class Keep:
    name: str
    select: Select
    per: str  # kv_head | layer
    floor: float | None
    layers: tuple[int, ...] | None
    kv_heads: tuple[int, ...] | None


@dataclass(frozen=True)
class Merge:
    into: str
    weight: int | None  # node
    tier: str | None = None  # None: the policy's own merge


@dataclass(frozen=True)
class Store:
    layout: str  # flatten_max | flatten_sum
    physical: bool = True


@dataclass(frozen=True)
class Tier:
    index: int
    name: str
    source: int | None  # index of the source tier; None: new tokens
    every: int
    select: Select | None
    per: str
    layout: str
    store: str
    cap: int | None
    merge: Merge | None

    @property
    def physical(self) -> bool:
        return self.layout in PHYSICAL_LAYOUTS


Step = Observe | Accumulate | Score | Calibrate | Keep | Merge | Store | Tier

# ------------------------------------------------------------------ program


@dataclass(frozen=True)
class Program:
    policy: ir.Policy
    shape: ModelShape
    nodes: tuple[Node, ...]
    steps: tuple[Step, ...]
    scores: dict[str, int]  # named score -> node
    source: object = field(default=None, compare=False, repr=False)  # kvpolicy.Policy, when known

    # What the old Plan said, so engines read one object.
    @property
    def compresses(self) -> bool:
        return bool(self.policy.triggers)

    @property
    def observe_window(self) -> int:
        return next((s.window for s in self.steps if isinstance(s, Observe)), 0)

    @property
    def stages(self) -> tuple[str, ...]:
        names = {Observe: "observe", Accumulate: "accumulate", Score: "score", Calibrate: "calibrate",
                 Keep: "select", Merge: "merge", Store: "layout", Tier: "select"}
        out: list[str] = []
        for step in self.steps:
            name = names[type(step)]
            if name not in out:
                out.append(name)
        if any(isinstance(s, Tier) for s in self.steps):
            if any(isinstance(s, Tier) and s.merge for s in self.steps) and "merge" not in out:
                out.append("merge")
            out.append("layout")
        return tuple(out)

    @property
    def storage_layout(self) -> str:
        """How an engine stores each layer's kept tokens after compaction:
        flatten_sum when the policy (or, in a cascade, any tier) asks for it,
        else flatten_max (every kv head padded to the layer's fullest)."""
        return storage_layout(self.policy)

    def of(self, kind) -> tuple:
        """The steps of one kind, in order."""
        return tuple(step for step in self.steps if isinstance(step, kind))

    def due(self, phase: str, decode_step: int, held: int) -> bool:
        """Whether a layer holding `held` tokens (max over its heads) compresses
        now. phase is "prefill" (right after the prompt) or "decode"; decode_step
        counts generated tokens from 1."""
        for trigger in self.policy.triggers:
            if trigger.min_length is not None and held < trigger.min_length:
                continue
            if trigger.kind == "prefill" and phase == "prefill":
                return True
            if trigger.kind == "every" and phase == "decode" and decode_step % trigger.every == 0:
                return True
            if trigger.kind == "when":
                return True
        return False

    def ops(self) -> list[str]:
        """Every operation the program uses, in first-use order (nodes, then selections)."""
        used = [node.op for node in self.nodes]
        for step in self.steps:
            if isinstance(step, (Keep, Tier)) and step.select is not None:
                used.append(step.select.op)
                used.extend(leaf.op for leaf in step.select.flat())
        return list(dict.fromkeys(used))

    def dump(self) -> str:
        """A readable listing (for debugging and docs)."""
        lines = [f"program {self.policy.name} for {self.shape.name} ({self.shape.num_layers} layers, {self.shape.num_kv_heads} kv heads)"]
        for n in self.nodes:
            attrs = ", ".join(f"{k}={v}" for k, v in n.attrs.items())
            args = ", ".join(f"%{i}" for i in n.inputs)
            named = f"  # {n.name}" if n.name else ""
            lines.append(f"  %{n.index} = {n.op}({', '.join(x for x in (args, attrs) if x)}) : {n.axes}{', >= 0' if n.nonneg else ''}{named}")
        for step in self.steps:
            lines.append(f"  {type(step).__name__.lower()} {step}")
        return "\n".join(lines)


# ------------------------------------------------------------------ facts that need no model shape


def storage_layout(policy: ir.Policy) -> str:
    """flatten_sum when the policy (or, in a cascade, any tier) asks for it, else flatten_max."""
    if policy.cascade:
        return "flatten_sum" if any(t.layout == "flatten_sum" for t in policy.cascade) else "flatten_max"
    return policy.layout


_SELECTIONS = (ir.First, ir.Last, ir.TopK, ir.TopP, ir.Threshold)


def selections(policy: ir.Policy) -> list:
    """Every leaf selection of the policy's keeps and tiers (unions opened)."""
    return [node for node in walk(policy) if isinstance(node, _SELECTIONS)]


def op_of(node) -> str | None:
    """The operation (a key of ops.OPS) an IR node is, or None for a non-expression node."""
    if isinstance(node, ir.Signal):
        return node.name
    if isinstance(node, ir.Apply):
        return node.fn
    if isinstance(node, ir.Arith):
        return ARITH_OPS[node.operator]
    if isinstance(node, ir.Negate):
        return "neg"
    if isinstance(node, ir.Const):
        return "const"
    if isinstance(node, ir.Ref):
        return None if node.kind == "score" else node.kind
    if isinstance(node, _SELECTIONS + (ir.SelectUnion,)):
        return node.kind
    return None


def selection_leaves(selection) -> list:
    """The leaf selections of one selection (a union opened, recursively)."""
    return [node for node in walk(selection) if isinstance(node, _SELECTIONS)]


def sized_by_scores(policy: ir.Policy) -> bool:
    """Whether some selection keeps a number of tokens that follows the scores (top_p, threshold)."""
    return any(OPS[s.kind].sized_by_scores for s in selections(policy))


# ------------------------------------------------------------------ lowering


class _Lowering:
    def __init__(self, policy: ir.Policy, shape: ModelShape):
        self.policy = policy
        self.shape = shape
        self.nodes: list[Node] = []
        self.interned: dict[tuple, int] = {}
        self.named: dict[str, int] = {}
        self.state_nonneg: dict[str, bool] = {}

    def add(self, op: str, inputs: tuple[int, ...], attrs: dict, expr) -> int:
        key = (op, inputs, tuple(sorted(attrs.items())))
        if key in self.interned:
            return self.interned[key]
        spec = OPS[op]
        ins = [self.nodes[i] for i in inputs]
        axes = spec.axes
        if axes == "rows" and attrs.get("queries", "none") != "none":
            axes = "token"  # the signal reduced its query rows already
        if axes == "inputs":
            present = {n.axes for n in ins}
            axes = next((a for a in ("rows", "token", "counts") if a in present), "scalar")
        if spec.result == "same":
            nonneg = all(n.nonneg for n in ins) and (op != "const" or attrs["value"] >= 0) and (op != "state" or self.state_nonneg.get(attrs["name"], False))
        elif spec.name in ("add", "mul", "div"):
            nonneg = all(n.nonneg for n in ins)
        else:
            nonneg = spec.result == "nonneg"
        index = len(self.nodes)
        self.nodes.append(Node(index, op, inputs, attrs, axes, nonneg, None, expr))
        self.interned[key] = index
        return index

    def expr(self, e) -> int:
        if isinstance(e, ir.Const):
            return self.add("const", (), {"value": e.value}, e)
        if isinstance(e, ir.Ref):
            if e.kind == "score":
                return self.score(e.name)
            return self.add(e.kind, (), {"name": e.name}, e)
        if isinstance(e, ir.Signal):
            return self.add(e.name, (), dict(e.options), e)
        if isinstance(e, ir.Apply):
            return self.add(e.fn, tuple(self.expr(a) for a in e.args), dict(e.options), e)
        if isinstance(e, ir.Arith):
            return self.add(ARITH_OPS[e.operator], (self.expr(e.left), self.expr(e.right)), {}, e)
        if isinstance(e, ir.Negate):
            return self.add("neg", (self.expr(e.operand),), {}, e)
        raise TypeError(f"not an expression: {e!r}")

    def score(self, name: str) -> int:
        if name not in self.named:
            index = self.expr(self.policy.scores[name])
            node = self.nodes[index]
            if node.name is None:
                self.nodes[index] = Node(node.index, node.op, node.inputs, node.attrs, node.axes, node.nonneg, name, node.expr)
            self.named[name] = index
        return self.named[name]

    def counts(self, n: int | None, by_layer: ir.LayerShape | None) -> tuple[int, ...] | None:
        if n is None:
            return None
        return tuple(layer_counts(n, by_layer, self.shape.num_layers)) if by_layer is not None else (n,) * self.shape.num_layers

    def select(self, s, by_layer: ir.LayerShape | None) -> Select:
        if isinstance(s, ir.SelectUnion):
            return Select("union", parts=tuple(self.select(p, by_layer) for p in s.parts))
        if isinstance(s, (ir.First, ir.Last)):
            return Select(s.kind, counts=self.counts(s.count, None))  # positional counts are written per layer
        score = self.expr(s.score)
        if isinstance(s, ir.TopK):
            return Select("top_k", score, self.counts(s.count, by_layer))
        if isinstance(s, ir.TopP):
            floor = {"floors": self.counts(s.floor, by_layer)} if s.floor is not None else {}
            return Select("top_p", score, self.counts(s.limit, by_layer), {"p": s.p} | floor)
        return Select("threshold", score, None, {"operator": s.operator, "value": s.value})

    def merge(self, m: ir.Merge | None, tier: str | None) -> Merge | None:
        if m is None:
            return None
        return Merge(m.into, self.expr(m.weight) if m.weight is not None else None, tier)


def lower(policy, shape: ModelShape) -> Program:
    """The program of `policy` (a kvpolicy.Policy or an ir.Policy) for `shape`.
    Raises a positioned PolicyError when the policy does not fit the shape."""
    source = policy if hasattr(policy, "source") else None
    p: ir.Policy = policy.ir if hasattr(policy, "ir") else policy
    check_shape(p, shape, source)
    lo = _Lowering(p, shape)
    steps: list = []
    if p.observe:
        steps.append(Observe(p.observe))
    if p.states:
        updates = []
        for state in p.states:
            update = lo.expr(state.update)
            lo.state_nonneg[state.name] = lo.nodes[update].nonneg and state.decay >= 0
            updates.append(StateUpdate(state.name, update, state.decay))
        steps.append(Accumulate(tuple(updates)))
    if p.compresses:
        steps.append(Score(tuple(lo.score(name) for name in p.scores)))
    for cal in p.calibrations:  # also without a trigger: `kvpolicy calibrate` fits them
        steps.append(Calibrate(cal.name, cal.scope, lo.expr(cal.target), lo.expr(cal.metric), float(cal.target.options["p"]),
                               cal.solver, cal.init, cal.clamp, cal.fit))
    if p.compresses:
        for keep in p.keeps:
            steps.append(Keep(keep.name, lo.select(keep.select, keep.by_layer), keep.per, keep.floor, keep.layers, keep.kv_heads))
        if p.cascade:
            names = [t.name for t in p.cascade]
            for index, tier in enumerate(p.cascade):
                steps.append(Tier(index, tier.name, None if tier.source == "new" else names.index(tier.source), tier.every,
                                  lo.select(tier.select, None) if tier.select is not None else None, tier.per, tier.layout,
                                  tier.store, tier.cap, lo.merge(tier.merge, tier.name)))
        else:
            if p.merge is not None:
                steps.append(lo.merge(p.merge, None))
            steps.append(Store(p.layout))
    return Program(p, shape, tuple(lo.nodes), tuple(steps), dict(lo.named), source)


# ------------------------------------------------------------------ shape checks


def check_shape(policy: ir.Policy, s: ModelShape, source=None) -> None:
    """What the checker cannot know before the model is chosen: layer and head
    indices in range, by-layer tables of the right length, tier stores the HF
    engine can hold. Positioned when the source is known."""
    problems = []
    if s.num_q_heads % s.num_kv_heads:
        raise KvpolicyError(f"{s.name}: {s.num_q_heads} query heads do not group onto {s.num_kv_heads} kv heads")
    for keep in policy.keeps:
        for index in keep.layers or ():
            if index >= s.num_layers:
                problems.append(("keep", keep.name, f"keep '{keep.name}' names layer {index}, but {s.name} has {s.num_layers} layers (0..{s.num_layers - 1})"))
                break
        for index in keep.kv_heads or ():
            if index >= s.num_kv_heads:
                problems.append(("keep", keep.name, f"keep '{keep.name}' names kv head {index}, but {s.name} has {s.num_kv_heads} kv heads (0..{s.num_kv_heads - 1})"))
                break
        shape = keep.by_layer
        if shape is not None and shape.kind == "table" and len(shape.weights) != s.num_layers:
            problems.append(("keep", keep.name, f"keep '{keep.name}' has a by-layer table of {len(shape.weights)} weights, but {s.name} has {s.num_layers} layers"))
    for index in policy.skip_layers:
        if index >= s.num_layers:
            problems.append(("skip", None, f"skip names layer {index}, but {s.name} has {s.num_layers} layers (0..{s.num_layers - 1})"))
            break
    # Stored tiers are held by the HF engine (backends/hf/stores.py). New
    # tokens arrive at native precision (attention reads them in the same
    # forward), and a flatten_sum layer has its own per-head storage.
    flatten_sum = next((t.name for t in policy.cascade if t.layout == "flatten_sum"), None)
    for tier in policy.cascade:
        if tier.store != "native" and tier.source == "new":
            problems.append(("tier", tier.name, f"tier {tier.name}: store {tier.store} is not supported on the tier that receives new tokens; store them in a later tier (KIVI keeps recent tokens at full precision)"))
        elif tier.store != "native" and flatten_sum is not None:
            problems.append(("tier", tier.name, f"tier {tier.name}: store {tier.store} cannot be combined with layout flatten_sum (tier {flatten_sum}) yet"))
    if problems:
        if source is None:
            raise KvpolicyError("; ".join(message for _, _, message in problems))
        raise PolicyError([Diagnostic(source.locate(kind, name), message) for kind, name, message in problems], source.source)
