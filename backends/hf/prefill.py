"""One full-cache prefill, forked into many policies.

Every policy that compresses *after* the prefill forward sees exactly what a
full cache sees during it: the same keys, values, queries and last logits
(pristine layers run transformers' own attention). So an experiment that runs
many policies on one prompt can pay for the prefill once:

    prefilled = kvpolicy.hf.prefill(model, prompt_ids, window=64)
    kvpolicy.hf.score(model, prompt_ids, continuation, policy=pol, prefilled=prefilled)

A fork is bit-identical to running the policy's own prefill. Policies that
accumulate per-token state during the prefill (H2O's accumulated attention)
fork from a prefill that accumulated the same states (`states=`): it takes
the same attention path as their own runs (probabilities, not SDPA), so a
prefill with states serves only policies with states, one without only
policies without. `can_fork` is False otherwise, and for policies observing
more queries than were recorded.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field

import torch

import kvpolicy
from kvpolicy import ir
from kvpolicy.backends.torch import ModelShape, TorchPolicy
from kvpolicy.runtime.window import QueryWindow

from . import attention
from .cache import PolicyCache


def state_key(state: ir.State) -> str:
    """What a state accumulates, whatever the policy calls it."""
    return json.dumps(state.model_dump(mode="json", exclude={"name"}), sort_keys=True)


class _RecordingEngine(TorchPolicy):
    """The full cache, recording the last `window` queries of every layer
    and accumulating the given states (under names of its own)."""

    def __init__(self, shape: ModelShape, window: int, states: dict[str, ir.State]):
        full = kvpolicy.load("full").ir
        renamed = [state.model_copy(update={"name": f"s{i}"}) for i, state in enumerate(states.values())]
        super().__init__(full.model_copy(update={"states": renamed}), shape)
        self.window = window
        self.state_names = {key: f"s{i}" for i, key in enumerate(states)}

    def new_sequence(self):
        run = super().new_sequence()
        run.windows = [QueryWindow(self.window) for _ in range(self.shape.num_layers)]
        return run

    def observe(self, run, layer, queries, positions) -> None:
        run.windows[layer].append(queries, positions)


@dataclass
class Prefilled:
    prompt_ids: torch.Tensor  # [1, n]
    keys: list[torch.Tensor]  # per layer [1, Hkv, n, D]
    values: list[torch.Tensor]
    windows: list[QueryWindow]  # per layer: the last `window` queries
    window: int
    logits: torch.Tensor  # [vocab] the prompt's last position
    seconds: float
    states: dict[str, list[torch.Tensor]]  # state_key -> per layer [Hkv, n]
    # The last policy's cache after its prefill compression: (policy IR as JSON, cache).
    last_compressed: tuple[str, PolicyCache] | None = field(default=None, repr=False, compare=False)

    def can_fork(self, engine: TorchPolicy) -> bool:
        wanted = {state_key(state) for state in engine.ir.states}
        return (bool(wanted) == bool(self.states) and wanted <= set(self.states)
                and engine.plan.observe_window <= self.window)

    def fork(self, engine: TorchPolicy) -> PolicyCache:
        """A cache holding the prompt as if `engine` had prefilled it (not yet
        compressed). The recorded tensors are copied, never shared."""
        if not self.can_fork(engine):
            raise ValueError(f"policy {engine.ir.name} cannot start from a shared prefill")
        cache = PolicyCache(engine)
        for index, layer in enumerate(cache.layers):
            layer.update(self.keys[index].clone(), self.values[index].clone())
            for state in engine.ir.states:
                layer.states[state.name] = self.states[state_key(state)][index].clone()
            recorded = self.windows[index]
            if recorded.queries is not None:
                engine.observe(cache.run, index, recorded.queries, recorded.positions)
        return cache

    def compressed(self, engine: TorchPolicy) -> PolicyCache:
        """fork(engine), then the policy's prefill compression. The last
        policy's result is kept and copied, so scoring and then generating
        under one policy compresses (and calibrates) once."""
        key = engine.ir.model_dump_json()
        if self.last_compressed is None or self.last_compressed[0] != key:
            cache = self.fork(engine)
            cache.compress("prefill")
            self.last_compressed = (key, cache)
        kept = self.last_compressed[1]
        return copy.deepcopy(kept, memo={id(kept.engine): engine})


@torch.inference_mode()
def prefill(model, prompt_ids: torch.Tensor, window: int = 64, states=()) -> Prefilled:
    """Run the prompt once with the full cache, keeping what forks need:
    the last `window` queries of every layer and the given states (ir.State
    of the policies to fork, e.g. `policy.ir.states`)."""
    attention.install(model)
    wanted = {state_key(state): state for state in states}
    engine = _RecordingEngine(ModelShape.from_config(model.config), window, wanted)
    cache = PolicyCache(engine)
    ids = prompt_ids if prompt_ids.dim() == 2 else prompt_ids[None]
    start = time.perf_counter()
    with attention.active(cache):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    return Prefilled(
        prompt_ids=ids,
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        windows=cache.run.windows,
        window=window,
        logits=out.logits[0, -1].clone(),
        seconds=time.perf_counter() - start,
        states={key: [layer.states[name] for layer in cache.layers] for key, name in engine.state_names.items()},
    )
