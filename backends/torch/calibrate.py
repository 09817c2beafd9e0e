"""Logits calibration: fit a temperature per (layer, kv_head) so that the
calibrated metric needs as many tokens to reach mass p as the target says.

For each observed query row q of head h: N[h, q] = the target count (e.g.
top_p_count(softmax(z), p)); mass(T)[h, q] = the sum of the N[h, q] *largest*
entries of the metric at temperature T (normalised over the row).

What is fitted: per head, the T at which the **mean over rows** of mass(T)
equals p. The paper minimises mean_q (mass_q - p)^2 and stops when
max_q |mass_q - p| < tol. On real attention the rows of one head differ (a
row whose target count is smaller than a max-pool plateau cannot reach p at
any T), so no T puts every row within tol: the max-row rule never fires, and
the mean of squares is minimised by a T that lets a few unreachable rows pull
it far from where the typical row needs it (on SmolLM2, heads ended with mean
mass 0.98-1.0 against p = 0.9, their counts further from the target than at
init). The mean mass is monotone in T (a softmax at a lower temperature
majorises one at a higher temperature), so it has one root inside the clamp
when p is reachable there, and both solvers find that root:

- adam: minimises (mean_q mass_q - p)^2 with T the optimised leaf; a head is
  done (frozen, not even moved by Adam's momentum) once |mean mass - p| < tol;
  the result is the best T seen per head, not the last;
- bisect: halves [lo, hi] on the sign of mean mass - p, same stop, same best.

Where p is out of reach (mean mass < p even at the lower clamp, or > p at the
upper one) both end at that clamp bound. `FitResult.error` is |mean mass - p|
at the returned T (what the stop rule tests); `row_error` is mean_q
|mass_q - p|, the spread between rows that no single T removes.

Unlike the public HARD-KV code, T is the optimised leaf itself (so it moves),
the mass sums the largest entries (not the first in time order), and every
(layer, head) gets its own T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .evaluate import Evaluator, LayerInputs


@dataclass(frozen=True)
class FitResult:
    temperature: torch.Tensor  # [Hkv] (or [1] for a per-layer scope)
    error: torch.Tensor  # [Hkv] |mean over query rows of mass - p| at the returned T
    row_error: torch.Tensor  # [Hkv] mean over query rows of |mass - p| at the returned T
    steps: int  # solver iterations run
    converged: torch.Tensor  # [Hkv] bool: error < tol


def depends_on(program, name: str) -> set[int]:
    """Indices of the program's nodes whose value depends on calibration `name`."""
    out: set[int] = set()
    for node in program.nodes:  # inputs come first, so one pass suffices
        if (node.op == "calibration" and node.attrs["name"] == name) or any(i in out for i in node.inputs):
            out.add(node.index)
    return out


def independent_parts(program, index: int, dependent: set[int]) -> list[int]:
    """The largest sub-nodes of node `index` that do not depend on the calibration."""
    if index not in dependent:
        return [index]
    return [part for i in program.nodes[index].inputs for part in independent_parts(program, i, dependent)]


ROUNDING = 1e-6  # relative slack of the order check in _RowMass


class _RowMass:
    """[Hkv, Q]: sum of the counts[h, q] largest normalised entries of each
    row of a metric. The solver asks at many temperatures, and T rarely
    changes *which* entries are a row's largest (softmax(x / T) keeps the
    order, up to exp's rounding and entries that underflow to ties), so the
    last set is tried first: the rows are sorted again only if its smallest
    entry falls below the largest one outside it by more than a rounding
    error (such a swap moves the mass by ~1e-7, far below tol)."""

    def __init__(self, valid: torch.Tensor, counts: torch.Tensor):
        self.valid = valid[:, None, :]
        self.counts = counts.clamp(min=1, max=valid.shape[-1]).long()[..., None]  # [Hkv, Q, 1]
        self.top: torch.Tensor | None = None  # [Hkv, Q, T] bool: the counted entries of each row

    def __call__(self, metric: torch.Tensor) -> torch.Tensor:
        values = torch.where(self.valid & torch.isfinite(metric), metric, torch.zeros_like(metric)).clamp(min=0)
        values = values / values.sum(dim=-1, keepdim=True).clamp(min=1e-30)
        if self.top is None or not self._still_largest(values.detach()):
            order = values.detach().argsort(dim=-1, descending=True)
            rank = torch.arange(values.shape[-1]).expand_as(order)
            self.top = torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, rank < self.counts)
        return torch.where(self.top, values, torch.zeros_like(values)).sum(dim=-1)

    def _still_largest(self, values: torch.Tensor) -> bool:
        smallest_in = torch.where(self.top, values, torch.full_like(values, float("inf"))).amin(dim=-1)
        largest_out = torch.where(self.top, torch.zeros_like(values), values).amax(dim=-1)
        return bool((smallest_in >= largest_out * (1 - ROUNDING)).all())


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

    def __init__(self, program, calibration):
        self.program = program
        self.cal = calibration  # a program Calibrate step: target and metric are nodes
        self.p = calibration.p
        self.per_head = "kv_head" in calibration.scope
        self.dependent = depends_on(program, calibration.name)

    def fit(self, inputs: LayerInputs, scores: dict | None = None) -> FitResult:
        """Fit on one layer. `scores`, if given, holds named scores already
        evaluated on these inputs, and receives the ones the fit evaluates
        that do not depend on the calibration (the engine's selection reuses
        them: R-KV's redundancy is not computed twice)."""
        # Engines run under torch.inference_mode; fitting needs autograd, and
        # tensors made in inference mode cannot be saved for backward: copy them.
        with torch.inference_mode(False), torch.enable_grad():
            return self._fit(_normal_copy(inputs), {} if scores is None else scores)

    def _fit(self, inputs: LayerInputs, scores: dict) -> FitResult:
        plain = Evaluator(self.program, inputs, values={index: value.clone() for index, value in scores.items()})
        counts = plain.value(self.cal.target)  # [Hkv, Q] long
        # What does not depend on T is evaluated once: the named scores, and
        # the metric's largest T-free parts (R-KV's redundancy, a max-pool),
        # so the solver's steps only redo what T changes.
        parts = {part: plain.value(part) for part in independent_parts(self.program, self.cal.metric, self.dependent)}
        # Nothing the plain evaluator reached depends on a calibration (it has none).
        scores.update({index: value for index, value in plain.values.items() if torch.is_tensor(value)})
        # Every T-free node the metric reaches lies inside one of these parts,
        # so the solver's evaluator needs no memo of named scores. -inf
        # (masked) entries become a huge finite negative: x / T then has a
        # finite gradient (0), where -inf / T would make it NaN.
        fixed = {key: _finite(value) for key, value in parts.items() if torch.is_tensor(value)}
        heads = inputs.num_kv if self.per_head else 1

        row_mass = _RowMass(inputs.valid, counts)

        def mass_at(temperature: torch.Tensor) -> torch.Tensor:
            t = temperature if self.per_head else temperature.expand(inputs.num_kv)
            evaluator = Evaluator(self.program, inputs, calibration={self.cal.name: t}, values=fixed)
            return row_mass(evaluator.tensor(self.cal.metric))

        lo, hi = self.cal.clamp
        solve = self._bisect if self.cal.solver.kind == "bisect" else self._adam
        temperature, steps = solve(mass_at, heads, lo, hi)
        with torch.no_grad():
            mass = mass_at(temperature)
        error = self._mean_error(mass)
        return FitResult(temperature, error, self._row_error(mass), steps, error < self.cal.solver.tol)

    # ------------------------------------------------------------- errors per head

    def _mean_mass(self, mass: torch.Tensor) -> torch.Tensor:
        """[heads]: mean over query rows (and over heads, for a per-layer scope)."""
        return mass.mean(dim=-1) if self.per_head else mass.mean().reshape(1)

    def _mean_error(self, mass: torch.Tensor) -> torch.Tensor:
        return (self._mean_mass(mass) - self.p).abs()

    def _row_error(self, mass: torch.Tensor) -> torch.Tensor:
        return self._mean_mass((mass - self.p).abs())

    # ------------------------------------------------------------- solvers

    def _adam(self, mass_at, heads: int, lo: float, hi: float) -> tuple[torch.Tensor, int]:
        solver = self.cal.solver
        temperature = torch.full((heads,), float(self.cal.init), requires_grad=True)
        optimizer = torch.optim.Adam([temperature], lr=solver.lr)
        best = temperature.detach().clone()
        best_error = torch.full((heads,), float("inf"))
        done = torch.zeros(heads, dtype=torch.bool)
        steps = 0
        for steps in range(1, solver.steps + 1):
            mass = mass_at(temperature)
            mean_mass = self._mean_mass(mass)
            with torch.no_grad():
                error = (mean_mass - self.p).abs()
                better = error < best_error
                best = torch.where(better, temperature.detach(), best)
                best_error = torch.where(better, error, best_error)
                done |= error < solver.tol
            if bool(done.all()):
                break
            optimizer.zero_grad()
            ((mean_mass - self.p) ** 2).sum().backward()
            before = temperature.detach().clone()
            optimizer.step()
            with torch.no_grad():
                temperature.clamp_(lo, hi)
                # A head within tolerance stays put (Adam's momentum would move it).
                temperature.copy_(torch.where(done, before, temperature))
        else:
            with torch.no_grad():  # the last step's T has not been measured yet
                error = self._mean_error(mass_at(temperature))
                best = torch.where(error < best_error, temperature.detach(), best)
        return best.clone(), steps

    def _bisect(self, mass_at, heads: int, lo: float, hi: float) -> tuple[torch.Tensor, int]:
        solver = self.cal.solver
        low = torch.full((heads,), float(lo))
        high = torch.full((heads,), float(hi))
        best = torch.full((heads,), float(self.cal.init))
        best_error = torch.full((heads,), float("inf"))
        steps = 0
        with torch.no_grad():
            # The bounds first: where p is out of reach the answer is a bound.
            for bound in (low, high):
                error = self._mean_error(mass_at(bound))
                better = error < best_error
                best, best_error = torch.where(better, bound, best), torch.where(better, error, best_error)
            for steps in range(1, solver.steps + 1):
                if bool((best_error < solver.tol).all()):
                    steps -= 1
                    break
                mid = (low + high) / 2
                mean_mass = self._mean_mass(mass_at(mid))
                error = (mean_mass - self.p).abs()
                better = (error < best_error) & (best_error >= solver.tol)
                best, best_error = torch.where(better, mid, best), torch.where(better, error, best_error)
                # Mass falls as T rises: too much mass -> raise T.
                too_much = mean_mass > self.p
                low = torch.where(too_much, mid, low)
                high = torch.where(too_much, high, mid)
        return best.clone(), steps
