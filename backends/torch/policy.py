"""The torch reference backend: a compiled policy for one model shape.

This is the oracle every other backend is checked against, and the CPU
execution path of the HF engine. Engine-facing API:

    engine = TorchPolicy(policy, ModelShape(layers, q_heads, kv_heads, head_dim))
    run = engine.new_sequence()                     # per-sequence runtime state
    engine.observe(run, layer, queries, positions)  # every forward, post-RoPE
    engine.accumulate(layer_probs, states)          # when engine.plan has "accumulate"
    if engine.due(run, layer, phase, held):
        decision = engine.compress_layer(run, layer, inputs)   # kept mask, merged values
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from kvpolicy import ir
from kvpolicy.model_shape import ModelShape
from kvpolicy.program import Accumulate, Calibrate, Keep, Merge, Program, Tier, lower
from kvpolicy.runtime.window import QueryWindow

from . import select as sel
from .calibrate import Calibrator, FitResult
from .evaluate import Evaluator, LayerInputs
from .merge import merge_evicted
from .signals import reduce_group


@dataclass
class SequenceRun:
    """Runtime state of one sequence: query windows, fitted temperatures,
    compression counts (per layer, since guards are per layer)."""

    windows: list[QueryWindow]
    decode_step: int = 0
    compressions: list[int] = field(default_factory=list)
    temperatures: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    fit_errors: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


@dataclass
class LayerDecision:
    kept: torch.Tensor  # [Hkv, T] bool: the valid slots to keep
    physical: bool  # True: compact kept slots to a prefix; False: mask in place
    values: torch.Tensor | None = None  # [Hkv, T, D] when merging changed values
    tiers: torch.Tensor | None = None  # [Hkv, T] long tier index per slot (cascades)


@dataclass(frozen=True)
class EventOps:
    """What a compression event runs once its scores exist, as one backend
    implements it: the torch reference (select.py, merge.py) here, kernels in
    backends/triton/engine.py. The control (which keep or tier runs, unions
    with protected tokens, cascade transitions) is TorchPolicy's, shared."""

    selections: dict  # Select.op -> (select, scores, candidates, protected, layer) -> [Hkv, T] mask
    per_layer_top_k: Callable  # (token scores [Hkv, T], candidates, k, floor) -> mask
    positional: Callable  # (first/last Select, valid, key_pos, layer) -> mask
    merge_evicted: Callable  # (keys, values, valid, kept, weights, into) -> values [Hkv, T, D]


TORCH_EVENT_OPS = EventOps(sel.SELECTIONS, sel.per_layer_top_k, sel.positional, merge_evicted)


class TorchPolicy:
    backend = "torch"

    def __init__(self, policy, shape: ModelShape, program: Program | None = None):
        self.source = policy if hasattr(policy, "source") else None
        self.ir: ir.Policy = policy.ir if hasattr(policy, "ir") else policy
        self.shape = shape
        self.program: Program = program or lower(policy, shape)  # lowering checks the policy against the shape
        self.plan = self.program  # the name engines read
        self.calibrators = {c.name: Calibrator(self.program, c) for c in self.program.of(Calibrate)}
        self.keeps = self.program.of(Keep)
        self.tiers = self.program.of(Tier)
        self.merge = next((m for m in self.program.of(Merge) if m.tier is None), None)
        accumulate = self.program.of(Accumulate)
        self.states = accumulate[0].states if accumulate else ()
        self.calibration_files = self._load_calibration_files()

    # ------------------------------------------------------------- runtime

    def new_sequence(self) -> SequenceRun:
        return SequenceRun(
            windows=[QueryWindow(self.plan.observe_window) for _ in range(self.shape.num_layers)],
            compressions=[0] * self.shape.num_layers,
        )

    def observe(self, run: SequenceRun, layer: int, queries: torch.Tensor, positions: torch.Tensor) -> None:
        """Record a forward's queries [Hq, n, D] (post-RoPE) at positions [n]."""
        if self.plan.observe_window:
            run.windows[layer].append(queries, positions)

    def accumulate(self, probs: torch.Tensor, states: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token states after one forward: probs [Hq, n, L] are the new
        queries' attention over the first L held slots (the slots past L are
        ones no new query sees, e.g. the future of a chunk of a prefill);
        states are [Hkv, T] aligned with the slots (new slots start at 0)."""
        out = {}
        num_kv, seen = valid.shape[0], probs.shape[-1]
        for state in self.states:
            current = states[state.name]
            update = reduce_group(probs.float(), num_kv, self.program.nodes[state.update].attrs["group"])  # [Hkv, n, L] one row per new query
            head, tail = current[:, :seen], current[:, seen:]
            for row in update.unbind(dim=1):  # query by query, in order, as the method defines it
                head = state.decay * head + row
            if state.decay != 1.0:
                for _ in range(update.shape[1]):
                    tail = state.decay * tail
            out[state.name] = torch.cat([head, tail], dim=1).masked_fill(~valid, 0.0)
        return out

    def due(self, run: SequenceRun, layer: int, phase: str, held: int, decode_step: int | None = None) -> bool:
        """Whether `layer`, holding `held` tokens (its fullest head), compresses
        at the run's decode step (or at `decode_step`, to look ahead)."""
        if layer in self.ir.skip_layers:
            return False
        return self.plan.due(phase, run.decode_step if decode_step is None else decode_step, held)

    def compress_layer(self, run: SequenceRun, layer: int, inputs: LayerInputs) -> LayerDecision:
        run.compressions[layer] += 1
        self._observed(run, layer, inputs)
        scores = self._scores(run, layer, inputs)
        protected, applies = self._protected(layer, inputs)
        if self.tiers:
            return self._cascade(run, layer, inputs, scores, protected)
        ops = self.event_ops
        candidates = inputs.valid & ~protected
        scored = torch.zeros_like(inputs.valid)
        for keep in self.keeps:
            if not self._keep_applies(keep, layer) or keep.select.positional:
                continue  # first/last tokens are already in `protected`
            heads = self._head_mask(keep)
            if keep.per == "layer" and keep.select.op == "top_k":
                chosen = ops.per_layer_top_k(scores.token_scores(keep.select.score), candidates & heads[:, None], keep.select.count(layer), keep.floor)
            else:
                chosen = ops.selections[keep.select.op](keep.select, scores, candidates & heads[:, None], protected, layer)
            scored |= chosen & heads[:, None]
        kept = torch.where(applies[:, None], (protected | scored) & inputs.valid, inputs.valid)
        values = self._merge(self.merge, scores, inputs, kept)
        return LayerDecision(kept=kept, physical=True, values=values)

    # ------------------------------------------------------------- backend hooks

    event_ops: EventOps = TORCH_EVENT_OPS

    def _scores(self, run: SequenceRun, layer: int, inputs: LayerInputs):
        """The event's scores: an object with token_scores(node) and inputs.
        Torch evaluates the program's nodes lazily; what a calibration fit
        evaluated is reused."""
        fitted: dict[int, torch.Tensor] = {}
        calibration = self._temperatures(run, layer, inputs, fitted)
        return Evaluator(self.program, inputs, calibration, values=fitted)

    # ------------------------------------------------------------- pieces

    def _load_calibration_files(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """`fit from "FILE"`: name -> (values, errors) [layers, kv_heads], read
        once, checked against the model's shape and the calibration's hash
        (errors positioned at the `fit from` line when the source is known)."""
        from kvpolicy import calibration_file

        out = {}
        for cal in self.ir.calibrations:
            if cal.fit.kind == "file":
                s = self.shape
                cf = calibration_file.load_for(self.source or self.ir, cal.name, s.num_layers, s.num_kv_heads, s.name)
                out[cal.name] = (torch.from_numpy(cf.values[cal.name].copy()), torch.from_numpy(cf.errors[cal.name].copy()))
        return out

    def calibrate_layer(self, run: SequenceRun, layer: int, inputs: LayerInputs) -> dict[str, FitResult]:
        """Fit every calibration on one layer now, whatever its `fit` clause
        says, and record the values in `run` (what `kvpolicy calibrate` runs
        after a prefill; the online fit sees the same inputs)."""
        self._observed(run, layer, inputs)
        return {cal.name: self._fit(run, layer, cal, inputs, {}) for cal in self.program.of(Calibrate)}

    def _observed(self, run: SequenceRun, layer: int, inputs: LayerInputs) -> None:
        """Give `inputs` the layer's observed query window, if the policy reads one."""
        if self.plan.observe_window:
            window = run.windows[layer]
            inputs.queries, inputs.query_pos = window.queries, window.positions

    def _fit(self, run: SequenceRun, layer: int, cal: Calibrate, inputs: LayerInputs, scores: dict) -> FitResult:
        """Fit `cal` on this layer and record the result in `run`."""
        result = self.calibrators[cal.name].fit(inputs, scores)
        run.temperatures[(cal.name, layer)] = result.temperature
        run.fit_errors[(cal.name, layer)] = result.error
        return result

    def _temperatures(self, run: SequenceRun, layer: int, inputs: LayerInputs, scores: dict) -> dict[str, torch.Tensor]:
        out = {}
        for cal in self.program.of(Calibrate):
            key = (cal.name, layer)
            if cal.fit.kind == "file":
                if key not in run.temperatures:
                    values, errors = self.calibration_files[cal.name]
                    run.temperatures[key], run.fit_errors[key] = values[layer], errors[layer]
            else:
                count = run.compressions[layer]
                refit = cal.fit.kind == "every" and (count - 1) % cal.fit.every == 0
                if key not in run.temperatures or refit:
                    self._fit(run, layer, cal, inputs, scores)
            t = run.temperatures[key]
            out[cal.name] = t if t.numel() == inputs.num_kv else t.expand(inputs.num_kv)
        return out

    def _keep_applies(self, keep: Keep, layer: int) -> bool:
        return keep.layers is None or layer in keep.layers

    def _head_mask(self, keep: Keep) -> torch.Tensor:
        heads = torch.ones(self.shape.num_kv_heads, dtype=torch.bool)
        if keep.kv_heads is not None:
            heads[:] = False
            heads[list(keep.kv_heads)] = True
        return heads

    def _protected(self, layer: int, inputs: LayerInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(protected [Hkv, T], applies [Hkv]): tokens kept by first/last, and
        the heads some keep applies to (the others are not compressed)."""
        protected = torch.zeros_like(inputs.valid)
        applies = torch.zeros(inputs.num_kv, dtype=torch.bool)
        for keep in self.keeps:
            if not self._keep_applies(keep, layer):
                continue
            heads = self._head_mask(keep)
            applies |= heads
            for part in keep.select.flat():
                if part.positional:
                    protected |= self.event_ops.positional(part, inputs.valid, inputs.key_pos, layer) & heads[:, None]
        if self.tiers:
            applies[:] = True
        return protected, applies

    def _merge(self, merge: Merge | None, scores, inputs: LayerInputs, kept: torch.Tensor):
        if merge is None:
            return None
        weights = scores.token_scores(merge.weight) if merge.weight is not None else None
        return self.event_ops.merge_evicted(inputs.keys, inputs.values, inputs.valid, kept, weights, merge.into)

    def _cascade(self, run: SequenceRun, layer: int, inputs: LayerInputs, scores, protected: torch.Tensor) -> LayerDecision:
        """Tiers: new tokens sit in tier 0. At compression c, each later tier
        due at c (c = 1, 1 + every, 1 + 2 every, ...) takes the tokens of its source tier and its
        own: with a select, the chosen (and protected) ones stay, the rest are
        evicted; without one, all move. The event is physical if any tier that
        ran stores its tokens contiguously, else a mask update."""
        count = run.compressions[layer]
        tiers = inputs.tiers.clone() if getattr(inputs, "tiers", None) is not None else torch.zeros_like(inputs.key_pos)
        kept = inputs.valid.clone()
        physical = False
        values = None
        for tier in self.tiers[1:]:
            index, source = tier.index, tier.source
            if (count - 1) % tier.every:  # every N compressions, the first included
                continue
            members = kept & ((tiers == source) | (tiers == index))
            if tier.select is not None:
                chosen = self.event_ops.selections[tier.select.op](tier.select, scores, members & ~protected, protected, layer)
                stay = chosen | (members & protected)
                if tier.merge is not None:
                    values = self._merge(tier.merge, scores, inputs, kept & ~(members & ~stay))
                kept &= ~(members & ~stay)
                members = stay
            tiers = torch.where(members, torch.full_like(tiers, index), tiers)
            physical |= tier.physical
        return LayerDecision(kept=kept, physical=physical, values=values, tiers=tiers)
