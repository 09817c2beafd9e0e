"""TritonPolicy: the torch backend's engine-facing object, with every
compression stage run by the policy's generated kernels.

Engines use it exactly as they use TorchPolicy (observe, accumulate, due,
compress_layer -> LayerDecision). A compression event runs the fused
scoring steps (lowering.py), then selection, unions with protected tokens,
cascade transitions and merge-on-evict through the select_rows / merge
kernels; a bisection calibration fit runs by kernel too. Still on the torch
side: the Adam fit (it needs the metric's gradient; the kernels read the
temperatures it fits) and per-token state accumulation.
"""
from __future__ import annotations

import torch

from kvpolicy import ir
from kvpolicy.backends.torch import LayerInputs, ModelShape, TorchPolicy
from kvpolicy.backends.torch.policy import LayerDecision, SequenceRun
from kvpolicy.diagnostics import Diagnostic, PolicyError
from kvpolicy.plan import PHYSICAL_LAYOUTS

from . import launch, render
from .lowering import Unsupported


def build(policy) -> render.Rendered:
    """Render a policy's kernels; a construct no template lowers is a
    positioned compile error when the source is known."""
    try:
        return render.render(policy)
    except Unsupported as err:
        source = policy if hasattr(policy, "source") else None
        if source is None:
            raise
        raise PolicyError([Diagnostic(_locate(source, err), str(err))], source.source) from None


def _locate(policy, err: Unsupported):
    """The `score` statement holding the construct, else the statement using it."""
    if err.score is not None:
        from kvpolicy import ast, syntax

        tree = syntax.parse(policy.source.text, policy.source.filename)
        for st in tree.statements:
            if isinstance(st, ast.Score) and st.name.name == err.score:
                return st.span
    return policy.locate(err.kind, err.name)


class _Scores:
    """Token scores of one compression event, read from the kernels' buffers."""

    def __init__(self, rendered: render.Rendered, buffers: dict[int, torch.Tensor], valid: torch.Tensor):
        self.rendered, self.buffers, self.valid = rendered, buffers, valid

    def __call__(self, expr) -> torch.Tensor:
        return self.buffers[self.rendered.lowering.token_scores(expr).id]


class TritonPolicy(TorchPolicy):
    backend = "triton"

    def __init__(self, policy, shape: ModelShape, program=None):
        super().__init__(policy, shape, program=program)
        self.rendered = build(policy)
        self.kernels = render.load(self.rendered)
        # What a compression reads: selection and merge scores (the fit, on the
        # torch side for now, evaluates its own target).
        low = self.rendered.lowering
        roots = [low.token_scores(expr) for kind, _, expr in render.policy_expressions(self.ir) if kind != "calibrate"]
        self.event_steps = launch.needed(self.rendered.steps, roots)

    # ------------------------------------------------------------- one event

    def compress_layer(self, run: SequenceRun, layer: int, inputs: LayerInputs) -> LayerDecision:
        run.compressions[layer] += 1
        self._observed(run, layer, inputs)
        calibration = self._temperatures(run, layer, inputs, {})
        buffers = launch.run_steps(self.kernels, self.rendered.steps, inputs, calibration, self.event_steps)
        scores = _Scores(self.rendered, buffers, inputs.valid)
        protected, applies = self._protected_kernels(layer, inputs)
        if self.ir.cascade:
            return self._cascade_kernels(run, layer, inputs, scores, protected)
        candidates = inputs.valid & ~protected
        scored = torch.zeros_like(inputs.valid)
        for keep in self.ir.keeps:
            if not self._keep_applies(keep, layer) or _positional_only(keep.select):
                continue
            heads = self._head_mask(keep)[:, None]
            count_for = self._count(keep, layer)
            if keep.per == "layer" and isinstance(keep.select, ir.TopK):
                chosen = launch.per_layer_top_k(self.kernels, scores(keep.select.score), candidates & heads, count_for(keep.select.count), keep.floor)
            else:
                chosen = self._select(keep.select, scores, candidates & heads, protected, inputs.valid, count_for)
            scored |= chosen & heads
        kept = torch.where(applies[:, None], (protected | scored) & inputs.valid, inputs.valid)
        return LayerDecision(kept=kept, physical=True, values=self._merge_kernels(self.ir.merge, scores, inputs, kept))

    # ------------------------------------------------------------- calibration

    def _fit(self, run: SequenceRun, layer: int, cal: ir.Calibration, inputs: LayerInputs, scores: dict):
        """Bisection fits by kernel: the target counts and the metric at each
        trial temperature come from the generated steps, the row masses from
        row_mass; the solver's control (bounds, stop rule, best T) is the
        torch backend's own. Adam (which needs the metric's gradient) still
        fits on the torch side."""
        if cal.solver.kind != "bisect":
            return super()._fit(run, layer, cal, inputs, scores)
        from kvpolicy.backends.torch.calibrate import FitResult

        calibrator = self.calibrators[cal.name]
        low = self.rendered.lowering
        target, metric = low.tensor(cal.target), low.tensor(cal.metric)
        counts = launch.run_steps(self.kernels, self.rendered.steps, inputs, {}, launch.needed(self.rendered.steps, [target]))[target.id]
        metric_steps = launch.needed(self.rendered.steps, [metric])
        heads = inputs.num_kv if calibrator.per_head else 1

        def mass_at(temperature: torch.Tensor) -> torch.Tensor:
            t = temperature if calibrator.per_head else temperature.expand(inputs.num_kv)
            values = launch.run_steps(self.kernels, self.rendered.steps, inputs, {cal.name: t}, metric_steps)[metric.id]
            return launch.row_mass(self.kernels, values.expand(inputs.num_kv, counts.shape[1], -1), inputs.valid, counts)

        lo, hi = cal.clamp
        temperature, steps = calibrator._bisect(mass_at, heads, lo, hi)
        mass = mass_at(temperature)
        error = calibrator._mean_error(mass)
        result = FitResult(temperature, error, calibrator._row_error(mass), steps, error < cal.solver.tol)
        run.temperatures[(cal.name, layer)] = result.temperature
        run.fit_errors[(cal.name, layer)] = result.error
        return result

    # ------------------------------------------------------------- pieces

    def _select(self, sel, scores, candidates, protected, valid, count_for) -> torch.Tensor:
        mod = self.kernels
        if isinstance(sel, (ir.First, ir.Last)):
            return torch.zeros_like(valid)  # in `protected` already
        if isinstance(sel, ir.SelectUnion):
            out = torch.zeros_like(valid)
            for part in sel.parts:
                out |= self._select(part, scores, candidates, protected, valid, count_for)
            return out
        if isinstance(sel, ir.TopK):
            return launch.top_k(mod, scores(sel.score), candidates, count_for(sel.count))
        if isinstance(sel, ir.TopP):
            limit = count_for(sel.limit) if sel.limit is not None else None
            return launch.top_p(mod, scores(sel.score), candidates, protected, valid, sel.p, limit)
        return launch.threshold(mod, scores(sel.score), candidates, sel.operator, sel.value)

    def _protected_kernels(self, layer: int, inputs: LayerInputs):
        protected = torch.zeros_like(inputs.valid)
        applies = torch.zeros(inputs.num_kv, dtype=torch.bool)
        for keep in self.ir.keeps:
            if not self._keep_applies(keep, layer):
                continue
            heads = self._head_mask(keep)
            applies |= heads
            for part in _positional_parts(keep.select):
                mask = launch.positional(self.kernels, isinstance(part, ir.First), part.count, inputs.valid, inputs.key_pos)
                protected |= mask & heads[:, None]
        if self.ir.cascade:
            applies[:] = True
        return protected, applies

    def _merge_kernels(self, merge, scores, inputs: LayerInputs, kept):
        if merge is None:
            return None
        weights = scores(merge.weight) if merge.weight is not None else None
        return launch.merge_evicted(self.kernels, inputs.keys, inputs.values, inputs.valid, kept, weights, merge.into)

    def _cascade_kernels(self, run, layer: int, inputs: LayerInputs, scores, protected) -> LayerDecision:
        """TorchPolicy._cascade's rule (tiers due at compression c take their
        source's tokens and their own, a select keeps the chosen and the
        protected), with selections and merges by kernel."""
        count = run.compressions[layer]
        tiers = inputs.tiers.clone() if inputs.tiers is not None else torch.zeros_like(inputs.key_pos)
        names = [t.name for t in self.ir.cascade]
        kept = inputs.valid.clone()
        physical, values = False, None
        for index, tier in enumerate(self.ir.cascade[1:], start=1):
            if (count - 1) % tier.every:
                continue
            members = kept & ((tiers == names.index(tier.source)) | (tiers == index))
            if tier.select is not None:
                chosen = self._select(tier.select, scores, members & ~protected, protected, inputs.valid, lambda n: n)
                stay = chosen | (members & protected)
                if tier.merge is not None:
                    values = self._merge_kernels(tier.merge, scores, inputs, kept & ~(members & ~stay))
                kept &= ~(members & ~stay)
                members = stay
            tiers = torch.where(members, torch.full_like(tiers, index), tiers)
            physical |= tier.layout in PHYSICAL_LAYOUTS
        return LayerDecision(kept=kept, physical=physical, values=values, tiers=tiers)


def _positional_only(sel) -> bool:
    if isinstance(sel, ir.SelectUnion):
        return all(_positional_only(p) for p in sel.parts)
    return isinstance(sel, (ir.First, ir.Last))


def _positional_parts(sel) -> list:
    if isinstance(sel, (ir.First, ir.Last)):
        return [sel]
    if isinstance(sel, ir.SelectUnion):
        return [q for part in sel.parts for q in _positional_parts(part)]
    return []
