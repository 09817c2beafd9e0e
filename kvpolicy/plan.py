"""IR -> Plan: the ordered stages a runtime runs at each compression event,
and the schedule that says when an event happens.

    observe -> accumulate -> score -> calibrate -> select -> merge -> layout

A stage appears only if the policy needs it. Engines call `due` after each
forward pass; backends implement the stages. Nothing here imports an engine.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import ir

from .ops import PHYSICAL_LAYOUTS  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Plan:
    policy: ir.Policy
    stages: tuple[str, ...]
    observe_window: int  # queries to remember per layer (0: none)

    @property
    def compresses(self) -> bool:
        return bool(self.policy.triggers)

    @property
    def storage_layout(self) -> str:
        """How an engine stores each layer's kept tokens after compaction:
        flatten_sum when the policy (or, in a cascade, any tier) asks for it,
        else flatten_max (every kv head padded to the layer's fullest)."""
        if self.policy.cascade:
            return "flatten_sum" if any(t.layout == "flatten_sum" for t in self.policy.cascade) else "flatten_max"
        return self.policy.layout

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


def lower(policy: ir.Policy) -> Plan:
    stages = []
    if policy.observe:
        stages.append("observe")
    if policy.states:
        stages.append("accumulate")
    if policy.compresses:
        stages.append("score")
        if policy.calibrations:
            stages.append("calibrate")
        stages.append("select")
        if policy.merge or any(t.merge for t in policy.cascade):
            stages.append("merge")
        stages.append("layout")
    return Plan(policy=policy, stages=tuple(stages), observe_window=policy.observe or 0)
