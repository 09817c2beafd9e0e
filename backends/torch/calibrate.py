"""Logits calibration: fit a temperature per (layer, kv_head) so that the
calibrated metric needs as many tokens to reach mass p as the target says.

For each observed query row q of head h: N[h, q] = the target count (e.g.
top_p_count(softmax(z), p)); mass(T)[h, q] = the sum of the N[h, q] *largest*
entries of the metric at temperature T (normalised over the row). The loss is
mean_q (mass - p)^2 per head; T is fitted by Adam (as the paper) or bisection
(mass falls as T grows, so the root is bracketed by the clamp).

Unlike the public HARD-KV code, T is the optimised leaf itself (so it moves),
the mass sums the largest entries (not the first in time order), and every
(layer, head) gets its own T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy import ir

from .evaluate import Evaluator, LayerInputs


@dataclass(frozen=True)
class FitResult:
    temperature: torch.Tensor  # [Hkv] (or [1] for a per-layer scope)
    error: torch.Tensor  # [Hkv] max over query rows of |mass - p| at the end
    steps: int


def references_of(expr, policy: ir.Policy, seen=None) -> set[str]:
    """Names of calibrations an expression depends on, through named scores."""
    seen = set() if seen is None else seen
    found: set[str] = set()
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, ir.Ref):
            if e.kind == "calibration":
                found.add(e.name)
            elif e.kind == "score" and e.name not in seen:
                seen.add(e.name)
                stack.append(policy.scores[e.name])
        elif isinstance(e, ir.Apply):
            stack.extend(e.args)
        elif isinstance(e, ir.Arith):
            stack.extend([e.left, e.right])
        elif isinstance(e, ir.Negate):
            stack.append(e.operand)
    return found


def _row_mass(metric: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[Hkv, Q]: sum of the counts[h, q] largest normalised entries of each row."""
    values = torch.where(valid[:, None, :] & torch.isfinite(metric), metric, torch.zeros_like(metric)).clamp(min=0)
    values = values / values.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    ordered = values.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(dim=-1)
    index = (counts - 1).clamp(min=0, max=ordered.shape[-1] - 1).long()
    return cumulative.gather(-1, index[..., None]).squeeze(-1)


def _normal_copy(inputs: LayerInputs) -> LayerInputs:
    def copy(x):
        return x.clone() if torch.is_tensor(x) else x

    return LayerInputs(
        keys=copy(inputs.keys),
        values=copy(inputs.values),
        valid=copy(inputs.valid),
        key_pos=copy(inputs.key_pos),
        queries=copy(inputs.queries),
        query_pos=copy(inputs.query_pos),
        states={k: copy(v) for k, v in inputs.states.items()},
        tiers=copy(inputs.tiers),
    )


def _finite(x):
    if torch.is_tensor(x) and x.is_floating_point():
        return x.clamp(min=-1e30)
    return x


class Calibrator:
    """Fits one calibration of a policy on one layer."""

    def __init__(self, policy: ir.Policy, calibration: ir.Calibration):
        self.policy = policy
        self.cal = calibration
        self.p = float(calibration.target.options["p"])
        self.per_head = "kv_head" in calibration.scope

    def fit(self, inputs: LayerInputs) -> FitResult:
        # Engines run under torch.inference_mode; fitting needs autograd, and
        # tensors made in inference mode cannot be saved for backward: copy them.
        with torch.inference_mode(False), torch.enable_grad():
            return self._fit(_normal_copy(inputs))

    def _fit(self, inputs: LayerInputs) -> FitResult:
        base = Evaluator(self.policy, inputs)
        counts = base._eval(self.cal.target)  # [Hkv, Q] long
        # Named scores that do not depend on T are computed once and shared.
        # -inf (masked) entries become a huge finite negative: x / T then has a
        # finite gradient (0), where -inf / T would make it NaN.
        shared = {
            name: _finite(base.memo[name])
            for name in base.memo
            if self.cal.name not in references_of(self.policy.scores[name], self.policy)
        }
        heads = inputs.num_kv if self.per_head else 1

        def mass_at(temperature: torch.Tensor) -> torch.Tensor:
            t = temperature if self.per_head else temperature.expand(inputs.num_kv)
            evaluator = Evaluator(self.policy, inputs, calibration={self.cal.name: t}, memo=shared)
            return _row_mass(evaluator.tensor(self.cal.metric), inputs.valid, counts)

        lo, hi = self.cal.clamp
        if self.cal.solver.kind == "bisect":
            return self._bisect(mass_at, heads, lo, hi)
        return self._adam(mass_at, heads, lo, hi)

    def _errors(self, mass: torch.Tensor) -> torch.Tensor:
        err = (mass - self.p).abs()
        return err.amax(dim=-1) if self.per_head else err.amax().reshape(1)

    def _adam(self, mass_at, heads: int, lo: float, hi: float) -> FitResult:
        solver = self.cal.solver
        temperature = torch.full((heads,), float(self.cal.init), requires_grad=True)
        optimizer = torch.optim.Adam([temperature], lr=solver.lr)
        steps = 0
        for steps in range(1, solver.steps + 1):
            mass = mass_at(temperature)
            per_head_loss = ((mass - self.p) ** 2).mean(dim=-1)
            error = self._errors(mass.detach())
            if bool((error < solver.tol).all()):
                steps -= 1
                break
            optimizer.zero_grad()
            per_head_loss.sum().backward()
            # Heads already within tolerance stay where they are.
            temperature.grad[error < solver.tol] = 0.0
            optimizer.step()
            with torch.no_grad():
                temperature.clamp_(lo, hi)
        with torch.no_grad():
            final = self._errors(mass_at(temperature))
        return FitResult(temperature.detach().clone(), final, steps)

    def _bisect(self, mass_at, heads: int, lo: float, hi: float) -> FitResult:
        solver = self.cal.solver
        low = torch.full((heads,), float(lo))
        high = torch.full((heads,), float(hi))
        mid = (low + high) / 2
        steps = 0
        with torch.no_grad():
            for steps in range(1, solver.steps + 1):
                mid = (low + high) / 2
                mass = mass_at(mid)
                mean_mass = mass.mean(dim=-1) if self.per_head else mass.mean().reshape(1)
                if bool((self._errors(mass) < solver.tol).all()):
                    break
                # Mass falls as T rises: too much mass -> raise T.
                too_much = mean_mass > self.p
                low = torch.where(too_much, mid, low)
                high = torch.where(too_much, high, mid)
            final = self._errors(mass_at(mid))
        return FitResult(mid.clone(), final, steps)
