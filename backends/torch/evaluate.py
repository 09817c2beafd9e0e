"""Evaluate IR expressions on one layer of one sequence.

Tensors are float32 [Hkv, Q, T] or [Hkv, 1, T] in physical slot order.
Invalid slots (holes, dropped tokens) are excluded everywhere: transforms
treat them as absent (-inf into softmax and max-pool, 0 into mean-pool and
normalize) and selections never pick them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvpolicy import ir

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
    """Evaluates expressions of one policy on one layer, each named score once."""

    def __init__(self, policy: ir.Policy, inputs: LayerInputs, calibration: dict[str, torch.Tensor] | None = None,
                 memo: dict | None = None, fixed: dict | None = None):
        self.policy = policy
        self.inputs = inputs
        self.calibration = calibration or {}  # name -> [Hkv] (or [1]) tensor
        self.memo: dict[str, torch.Tensor] = dict(memo or {})
        self.fixed = fixed or {}  # id(subexpression of the policy's IR) -> its value, already evaluated
        self._logits: torch.Tensor | None = None

    # ------------------------------------------------------------- entry points

    def tensor(self, expr) -> torch.Tensor:
        """An expression as a tensor [Hkv, Q|1, T] (numbers broadcast)."""
        value = self._eval(expr)
        if not torch.is_tensor(value) or value.dim() < 3:
            value = torch.as_tensor(value, dtype=torch.float32).reshape(-1, 1, 1).expand(self.inputs.num_kv, 1, self.inputs.keys.shape[1])
        return value

    def token_scores(self, expr) -> torch.Tensor:
        """[Hkv, T]: the expression averaged over observed queries; -inf where invalid."""
        value = self.tensor(expr)
        if value.shape[1] == 1:  # one row (states, key norms): its own mean; + 0.0 turns -0.0 into 0.0 as the sum below does
            return (value[:, 0] + 0.0).masked_fill(~self.inputs.valid, NEG_INF)
        finite = torch.isfinite(value)
        mean = signals.sum_over(torch.where(finite, value, torch.zeros_like(value)), 1) / finite.sum(dim=1).clamp(min=1)
        all_masked = ~finite.any(dim=1)
        mean = torch.where(all_masked, value.amax(dim=1), mean)  # every row -inf stays -inf
        return mean.masked_fill(~self.inputs.valid, NEG_INF)

    # ------------------------------------------------------------- recursion

    def _eval(self, e):
        if id(e) in self.fixed:
            return self.fixed[id(e)]
        if isinstance(e, ir.Const):
            return float(e.value)
        if isinstance(e, ir.Ref):
            return self._ref(e)
        if isinstance(e, ir.Signal):
            return self._signal(e)
        if isinstance(e, ir.Apply):
            return self._apply(e)
        if isinstance(e, ir.Arith):
            left, right = self._eval(e.left), self._eval(e.right)
            left, right = self._broadcastable(left), self._broadcastable(right)
            return {"+": lambda: left + right, "-": lambda: left - right, "*": lambda: left * right, "/": lambda: left / right}[e.operator]()
        if isinstance(e, ir.Negate):
            return -self._broadcastable(self._eval(e.operand))
        raise TypeError(f"not an expression: {e!r}")

    def _broadcastable(self, value):
        # A calibrated scalar per kv head [Hkv] (or [1]) lines up with [Hkv, Q, T].
        if torch.is_tensor(value) and value.dim() == 1:
            return value.reshape(-1, 1, 1)
        return value

    def _ref(self, ref: ir.Ref):
        if ref.kind == "calibration":
            return self.calibration[ref.name]
        if ref.kind == "state":
            return self.inputs.states[ref.name][:, None, :].float()
        if ref.name not in self.memo:
            self.memo[ref.name] = self._eval(self.policy.scores[ref.name])
        return self.memo[ref.name]

    def _query_logits(self) -> torch.Tensor:
        if self._logits is None:
            x = self.inputs
            if x.queries is None or x.queries.shape[1] == 0:
                raise ValueError("this policy reads observed queries, but none were recorded")
            self._logits = signals.query_logits(x.queries, x.keys, x.valid, x.key_pos, x.query_pos)
        return self._logits

    def _signal(self, s: ir.Signal) -> torch.Tensor:
        x, o = self.inputs, s.options
        if s.name == "attn":
            return signals.attn(self._query_logits(), x.num_kv, o["group"], o["queries"])
        if s.name == "attn_logits":
            return signals.attn_logits(self._query_logits(), x.num_kv, o["group"], o["queries"])
        if s.name == "key_norm":
            return signals.key_norm(x.keys)
        if s.name == "value_norm":
            return signals.value_norm(x.values)
        if s.name == "key_sim":
            return signals.key_sim(x.keys, x.valid)
        if s.name == "redundancy":
            return signals.redundancy(x.keys, x.valid, x.key_pos, float(o["threshold"]))
        raise ValueError(f"unknown signal {s.name}")

    def _apply(self, a: ir.Apply):
        args = [self.tensor(arg) for arg in a.args]
        x = args[0]
        valid = self.inputs.valid[:, None, :]
        if a.fn == "softmax":
            return torch.softmax(x.masked_fill(~valid, NEG_INF), dim=-1).nan_to_num(0.0)
        if a.fn == "normalize":
            return normalize(x, valid)
        if a.fn == "log":
            return torch.log(x)
        if a.fn == "exp":
            return torch.exp(x)
        if a.fn == "pool":
            return pool(x, valid, a.options["op"], int(a.options["kernel"]))
        if a.fn == "head_mean":
            return head_mean(x, valid)
        if a.fn == "top_p_count":
            return top_p_count(x, valid, float(a.options["p"]))
        raise ValueError(f"unknown function {a.fn}")


def normalize(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Shift so the minimum over valid slots is 0, divide by the sum (uniform if all equal)."""
    finite = valid & torch.isfinite(x)
    low = torch.where(finite, x, torch.full_like(x, float("inf"))).amin(dim=-1, keepdim=True)
    shifted = torch.where(finite, x - low, torch.zeros_like(x))
    total = shifted.sum(dim=-1, keepdim=True)
    uniform = finite.float() / finite.float().sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, shifted / total.clamp(min=1e-30), uniform)


def pool(x: torch.Tensor, valid: torch.Tensor, op: str, kernel: int) -> torch.Tensor:
    """1-D pooling along tokens, stride 1, centred window; invalid slots are
    excluded (-inf for max, 0 for mean; the mean divides by the kernel size, as
    torch's avg_pool1d with count_include_pad does) and stay invalid."""
    h, q, t = x.shape
    flat = x.reshape(h * q, 1, t)
    pad = kernel // 2
    if op == "max":
        src = flat.masked_fill(~valid.expand(h, q, t).reshape(h * q, 1, t), NEG_INF)
        out = F.max_pool1d(src, kernel, stride=1, padding=pad)
    else:
        src = torch.where(valid.expand(h, q, t).reshape(h * q, 1, t) & torch.isfinite(flat), flat, torch.zeros_like(flat))
        out = F.avg_pool1d(src, kernel, stride=1, padding=pad, count_include_pad=True)
    out = out.reshape(h, q, t)
    return out.masked_fill(~valid.expand(h, q, t), NEG_INF if op == "max" else 0.0)


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
