"""TritonPolicy: the torch backend's engine-facing object, with every
compression stage run by the policy's generated kernels.

Engines use it exactly as they use TorchPolicy (observe, accumulate, due,
compress_layer -> LayerDecision): the control over the program's steps
(which keep or tier runs, unions with protected tokens, cascade transitions)
is TorchPolicy's; this backend supplies the two hooks, `_scores` (the fused
scoring steps of lowering.py) and `event_ops` (selection, first/last and
merge-on-evict by the select_rows / merge kernels). A bisection calibration
fit runs by kernel too. Still on the torch side: the Adam fit (it needs the
metric's gradient; the kernels read the temperatures it fits) and per-token
state accumulation.
"""
from __future__ import annotations

import torch

from kvpolicy.backends.torch import LayerInputs, ModelShape, TorchPolicy
from kvpolicy.backends.torch.policy import EventOps, SequenceRun
from kvpolicy.backends.torch.select import union_over
from kvpolicy.diagnostics import Diagnostic, PolicyError
from kvpolicy.program import Calibrate, Keep, Merge, Tier

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


def rendered_expressions(program) -> dict[int, object]:
    """Program node -> the IR expression the kernels were rendered for (a named
    score is rendered as written at its use, e.g. a reference), pairing the
    program's keep, tier and merge steps with the IR they were lowered from."""
    policy, out = program.policy, {}

    def pair(step, written):
        if step.op == "union":
            for part, written_part in zip(step.parts, written.parts):
                pair(part, written_part)
        elif step.score is not None:
            out[step.score] = written.score

    for keep, written in zip(program.of(Keep), policy.keeps):
        pair(keep.select, written.select)
    for tier, written in zip(program.of(Tier), policy.cascade):
        if tier.select is not None:
            pair(tier.select, written.select)
        if tier.merge is not None and tier.merge.weight is not None:
            out[tier.merge.weight] = written.merge.weight
    for merge in program.of(Merge):
        if merge.tier is None and merge.weight is not None:
            out[merge.weight] = policy.merge.weight
    return out


class _Scores:
    """Token scores of one compression event, read from the kernels' buffers
    by program node."""

    def __init__(self, policy: "TritonPolicy", buffers: dict[int, torch.Tensor], inputs: LayerInputs):
        self.policy, self.buffers, self.inputs = policy, buffers, inputs

    def token_scores(self, node: int) -> torch.Tensor:
        expr = self.policy.expressions[node]
        return self.buffers[self.policy.rendered.lowering.token_scores(expr).id]


def kernel_event_ops(mod) -> EventOps:
    """The event operations of TorchPolicy, by the policy's kernels `mod`."""

    def top_p(sel, scores, candidates, protected, layer):
        kept = launch.top_p(mod, scores.token_scores(sel.score), candidates, protected, scores.inputs.valid, sel.attrs["p"], sel.count(layer))
        floors = sel.attrs.get("floors")
        if floors:  # top_p and top_k keep prefixes of one ranking: the floor is the longer prefix
            limit = sel.count(layer)
            kept |= launch.top_k(mod, scores.token_scores(sel.score), candidates, floors[layer] if limit is None else min(floors[layer], limit))
        return kept

    nothing = lambda sel, scores, candidates, protected, layer: torch.zeros_like(scores.inputs.valid)  # noqa: E731 (in `protected`)
    selections = {
        "first": nothing,
        "last": nothing,
        "top_k": lambda sel, scores, candidates, protected, layer: launch.top_k(mod, scores.token_scores(sel.score), candidates, sel.count(layer)),
        "top_p": top_p,
        "threshold": lambda sel, scores, candidates, protected, layer: launch.threshold(mod, scores.token_scores(sel.score), candidates, sel.attrs["operator"], sel.attrs["value"]),
    }
    selections["union"] = union_over(selections)
    return EventOps(
        selections=selections,
        per_layer_top_k=lambda scores, candidates, k, floor: launch.per_layer_top_k(mod, scores, candidates, k, floor),
        positional=lambda sel, valid, key_pos, layer: launch.positional(mod, sel.op == "first", sel.count(layer), valid, key_pos),
        merge_evicted=lambda keys, values, valid, kept, weights, into: launch.merge_evicted(mod, keys, values, valid, kept, weights, into),
    )


class TritonPolicy(TorchPolicy):
    backend = "triton"

    def __init__(self, policy, shape: ModelShape, program=None):
        super().__init__(policy, shape, program=program)
        self.rendered = build(policy)
        self.kernels = render.load(self.rendered)
        self.event_ops = kernel_event_ops(self.kernels)
        self.expressions = rendered_expressions(self.program)
        # What a compression reads: selection and merge scores (the fit, on the
        # torch side for now, evaluates its own target).
        low = self.rendered.lowering
        roots = [low.token_scores(expr) for kind, _, expr in render.policy_expressions(self.ir) if kind != "calibrate"]
        self.event_steps = launch.needed(self.rendered.steps, roots)

    def _scores(self, run: SequenceRun, layer: int, inputs: LayerInputs) -> _Scores:
        calibration = self._temperatures(run, layer, inputs, {})
        return _Scores(self, launch.run_steps(self.kernels, self.rendered.steps, inputs, calibration, self.event_steps), inputs)

    # ------------------------------------------------------------- calibration

    def _fit(self, run: SequenceRun, layer: int, cal: Calibrate, inputs: LayerInputs, scores: dict):
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
        nodes = self.program.nodes
        target, metric = low.tensor(nodes[cal.target].expr), low.tensor(nodes[cal.metric].expr)
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
