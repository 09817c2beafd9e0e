"""Interpret a program's expression nodes (kvpolicy.program) on one layer of one sequence.

Tensors are float32 [Hkv, Q, T] or [Hkv, 1, T] in physical slot order.
Invalid slots (holes, dropped tokens) are excluded everywhere: transforms
treat them as absent (-inf into softmax and max-pool, 0 into mean-pool and
normalize) and selections never pick them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import signals

NEG_INF = float("-inf")


@dataclass
class LayerInputs:
    """One layer of one sequence, as the engine holds it."""

    keys: torch.Tensor  # [Hkv, T, D]
    values: torch.Tensor  # [Hkv, T, D]
    valid: torch.Tensor  # [Hkv, T] bool
    key_pos: torch.Tensor  # [Hkv, T] long, logical positions
    queries: torch.Tensor | None = None  # [Hq, Q, D] observed window (post-RoPE)
    query_pos: torch.Tensor | None = None  # [Q] long
    states: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [Hkv, T]
    tiers: torch.Tensor | None = None  # [Hkv, T] long: cascade tier of each slot

    @property
    def num_kv(self) -> int:
        return self.keys.shape[0]


class Evaluator:
    """Interprets a program's expression nodes on one layer: each node is
    evaluated once, by the implementation `IMPLEMENTATIONS[node.op]`."""

    def __init__(self, program, inputs: LayerInputs, calibration: dict[str, torch.Tensor] | None = None,
                 values: dict[int, object] | None = None):
        self.program = program
        self.inputs = inputs
        self.calibration = calibration or {}  # name -> [Hkv] (or [1]) tensor
        self.values: dict[int, object] = dict(values or {})  # node index -> its value
        self._logits: torch.Tensor | None = None

    # ------------------------------------------------------------- entry points

    def value(self, index: int):
        """Node `index` as computed: a tensor [Hkv, Q|1, T] (or [Hkv, Q] counts), a number, or [Hkv] scalars."""
        if index not in self.values:
            node = self.program.nodes[index]
            args = [self.value(i) for i in node.inputs]
            self.values[index] = IMPLEMENTATIONS[node.op](self, node, args)
        return self.values[index]

    def tensor(self, index: int) -> torch.Tensor:
        """Node `index` as a tensor [Hkv, Q|1, T] (numbers broadcast)."""
        return self._as_tensor(self.value(index))

    def token_scores(self, index: int) -> torch.Tensor:
        """[Hkv, T]: node `index` averaged over observed queries; -inf where invalid."""
        value = self.tensor(index)
        if value.shape[1] == 1:  # one row (states, key norms): its own mean; + 0.0 turns -0.0 into 0.0 as the sum below does
            return (value[:, 0] + 0.0).masked_fill(~self.inputs.valid, NEG_INF)
        finite = torch.isfinite(value)
        mean = signals.sum_over(torch.where(finite, value, torch.zeros_like(value)), 1) / finite.sum(dim=1).clamp(min=1)
        all_masked = ~finite.any(dim=1)
        mean = torch.where(all_masked, value.amax(dim=1), mean)  # every row -inf stays -inf
        return mean.masked_fill(~self.inputs.valid, NEG_INF)

    # ------------------------------------------------------------- helpers for implementations

    def _as_tensor(self, value) -> torch.Tensor:
        if not torch.is_tensor(value) or value.dim() < 3:
            value = torch.as_tensor(value, dtype=torch.float32).reshape(-1, 1, 1).expand(self.inputs.num_kv, 1, self.inputs.keys.shape[1])
        return value

    def query_logits(self) -> torch.Tensor:
        if self._logits is None:
            x = self.inputs
            if x.queries is None or x.queries.shape[1] == 0:
                raise ValueError("this policy reads observed queries, but none were recorded")
            self._logits = signals.query_logits(x.queries, x.keys, x.valid, x.key_pos, x.query_pos)
        return self._logits

    @property
    def valid(self) -> torch.Tensor:
        return self.inputs.valid[:, None, :]


def _broadcastable(value):
    # A calibrated scalar per kv head [Hkv] (or [1]) lines up with [Hkv, Q, T].
    if torch.is_tensor(value) and value.dim() == 1:
        return value.reshape(-1, 1, 1)
    return value


def _arith(fn):
    return lambda ev, node, args: fn(_broadcastable(args[0]), _broadcastable(args[1]))


def _transform(fn):
    """An implementation whose tensor arguments arrive broadcast to [Hkv, Q|1, T]."""
    return lambda ev, node, args: fn(ev, node, *[ev._as_tensor(a) for a in args])


# One implementation per operation of kvpolicy.ops.OPS that is an expression
# node (selections are in select.py). `ev` gives the layer's inputs.
IMPLEMENTATIONS = {
    "const": lambda ev, node, args: float(node.attrs["value"]),
    "state": lambda ev, node, args: ev.inputs.states[node.attrs["name"]][:, None, :].float(),
    "calibration": lambda ev, node, args: ev.calibration[node.attrs["name"]],
    "add": _arith(lambda a, b: a + b),
    "sub": _arith(lambda a, b: a - b),
    "mul": _arith(lambda a, b: a * b),
    "div": _arith(lambda a, b: a / b),
    "neg": lambda ev, node, args: -_broadcastable(args[0]),
    "attn": lambda ev, node, args: signals.attn(ev.query_logits(), ev.inputs.num_kv, node.attrs["group"], node.attrs["queries"]),
    "attn_logits": lambda ev, node, args: signals.attn_logits(ev.query_logits(), ev.inputs.num_kv, node.attrs["group"], node.attrs["queries"]),
    "key_norm": lambda ev, node, args: signals.key_norm(ev.inputs.keys),
    "value_norm": lambda ev, node, args: signals.value_norm(ev.inputs.values),
    "key_sim": lambda ev, node, args: signals.key_sim(ev.inputs.keys, ev.inputs.valid),
    "redundancy": lambda ev, node, args: signals.redundancy(ev.inputs.keys, ev.inputs.valid, ev.inputs.key_pos, float(node.attrs["threshold"])),
    "softmax": _transform(lambda ev, node, x: torch.softmax(x.masked_fill(~ev.valid, NEG_INF), dim=-1).nan_to_num(0.0)),
    "normalize": _transform(lambda ev, node, x: normalize(x, ev.valid)),
    "log": _transform(lambda ev, node, x: torch.log(x)),
    "exp": _transform(lambda ev, node, x: torch.exp(x)),
    "pool": _transform(lambda ev, node, x: pool(x, ev.valid, node.attrs["op"], int(node.attrs["kernel"]))),
    "head_mean": _transform(lambda ev, node, x: head_mean(x, ev.valid)),
    "top_p_count": _transform(lambda ev, node, x: top_p_count(x, ev.valid, float(node.attrs["p"]))),
}


def normalize(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Shift so the minimum over valid slots is 0, divide by the sum (uniform if all equal)."""
    finite = valid & torch.isfinite(x)
    low = torch.where(finite, x, torch.full_like(x, float("inf"))).amin(dim=-1, keepdim=True)
    shifted = torch.where(finite, x - low, torch.zeros_like(x))
    total = shifted.sum(dim=-1, keepdim=True)
    uniform = finite.float() / finite.float().sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, shifted / total.clamp(min=1e-30), uniform)


def pool(x: torch.Tensor, valid: torch.Tensor, op: str, kernel: int) -> torch.Tensor:
    """1-D pooling along each head's held tokens, stride 1, centred window.
    Holes are skipped, not pooled over: a token's window is its nearest held
    neighbours in slot order, so where a head's tokens sit in the slots (the
    layout) does not change its scores. Past the ends of the held tokens
    nothing counts (-inf for max; the mean divides by the kernel size, as
    torch's avg_pool1d with count_include_pad does). Invalid slots stay invalid."""
    h, q, t = x.shape
    order = held_first(valid).expand(h, q, t)
    packed = _pool_prefix(x.gather(-1, order), valid.expand(h, q, t).gather(-1, order), op, kernel)
    return torch.empty_like(packed).scatter_(-1, order, packed)


def held_first(valid: torch.Tensor) -> torch.Tensor:
    """Slot indices along the last axis: the held slots in slot order, then
    the holes (a stable sort of "is a hole"). Pooling reads through it, in
    the torch and Triton backends; compaction gathers by it."""
    return torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)


def _pool_prefix(x: torch.Tensor, valid: torch.Tensor, op: str, kernel: int) -> torch.Tensor:
    """Pooling along slots where each row's held tokens are a prefix."""
    h, q, t = x.shape
    flat = x.reshape(h * q, 1, t)
    held = valid.reshape(h * q, 1, t)
    pad = kernel // 2
    if op == "max":
        out = F.max_pool1d(flat.masked_fill(~held, NEG_INF), kernel, stride=1, padding=pad)
    else:
        src = torch.where(held & torch.isfinite(flat), flat, torch.zeros_like(flat))
        out = F.avg_pool1d(src, kernel, stride=1, padding=pad, count_include_pad=True)
    return out.reshape(h, q, t).masked_fill(~valid, NEG_INF if op == "max" else 0.0)


def head_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the kv heads of a layer (each slot over the heads where it is valid)."""
    usable = valid & torch.isfinite(x)
    total = signals.sum_over(torch.where(usable, x, torch.zeros_like(x)), 0, keepdim=True)
    count = usable.float().sum(dim=0, keepdim=True)
    mean = total / count.clamp(min=1)
    return mean.expand_as(x).masked_fill(~valid, 0.0)


def top_p_count(x: torch.Tensor, valid: torch.Tensor, p: float) -> torch.Tensor:
    """Per row [Hkv, Q]: how many largest entries reach mass p of the row's total."""
    probs = torch.where(valid & torch.isfinite(x), x, torch.zeros_like(x)).clamp(min=0)
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    ordered = probs.sort(dim=-1, descending=True).values
    reached = ordered.cumsum(dim=-1) >= p - 1e-6
    first = torch.where(reached.any(dim=-1), reached.float().argmax(dim=-1), torch.full(reached.shape[:-1], reached.shape[-1] - 1))
    return first + 1
