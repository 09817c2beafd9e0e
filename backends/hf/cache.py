"""A transformers Cache that holds what a policy keeps, for real: one
PolicyLayer (layer.py) per model layer, of the storage the policy's program
asks for, and the compression loop over them after each forward.
"""
from __future__ import annotations

import time

from transformers.cache_utils import Cache

from kvpolicy.backends.torch import LayerInputs, TorchPolicy

from .batched import LayerBatch
from .layer import PolicyLayer
from .stores import StoredLayer


def layer_factory(engine: TorchPolicy):
    """The one choice of how a policy's layers store K/V, made from its
    program: per-head segments (flatten_sum), padded (flatten_max), or tiered
    stores when a cascade tier is stored other than natively. Returns
    () -> a new layer."""
    heads = engine.shape.num_kv_heads
    states = [s.name for s in engine.ir.states]
    tier_stores = [tier.store for tier in engine.tiers]
    if any(store != "native" for store in tier_stores):  # int8/int4/fp16/bf16 tiers
        return lambda: StoredLayer(heads, states, tier_stores)
    return lambda: PolicyLayer(heads, states, bool(engine.tiers), engine.program.storage_layout)


class PolicyCache(Cache):
    """The per-sequence cache the HF engine runs a policy on."""

    def __init__(self, engine: TorchPolicy, block_size: int | None = None):
        self.engine = engine
        self.block_size = block_size  # apply the paged engines' per-head block rule (runtime/blocks.py)
        self.run = engine.new_sequence()
        new_layer = layer_factory(engine)
        super().__init__(layers=[new_layer() for _ in range(engine.shape.num_layers)])
        self.compress_seconds = 0.0
        self.compressions = 0
        self.batch = None if block_size else LayerBatch.for_engine(engine)  # None unless all layers can compress in one call

    def compress(self, phase: str) -> None:
        """Run the policy on every layer that is due (after a forward pass)."""
        if not self.engine.plan.compresses:
            return
        start = time.perf_counter()
        if self.block_size:
            self._compress_in_blocks(phase)
        elif self.batch is None or not self.batch.compress(self, phase):
            for index, layer in enumerate(self.layers):
                if layer.physical == 0 or not self.engine.due(self.run, index, phase, layer.held()):
                    continue
                keys, values = layer.padded_kv()
                inputs = LayerInputs(
                    keys=keys,
                    values=values,
                    valid=layer.valid,
                    key_pos=layer.positions,
                    states=dict(layer.states),
                    tiers=layer.tiers,
                )
                decision = self.engine.compress_layer(self.run, index, inputs)
                layer.apply(decision.kept, decision.physical, decision.values, decision.tiers)
                self.compressions += 1
        if phase == "prefill":  # free the prompt's dropped tokens now, not at the first append
            for layer in self.layers:
                layer.settle()
        self.compress_seconds += time.perf_counter() - start

    def _compress_in_blocks(self, phase: str) -> None:
        """Every layer's decision first, then one physical length for all of
        them by the block rule (what vLLM's paged cache can hold)."""
        from kvpolicy.runtime import blocks

        due = [layer.physical > 0 and self.engine.due(self.run, index, phase, layer.held()) for index, layer in enumerate(self.layers)]
        if not any(due):
            return
        kept, tiers = [], [None] * len(self.layers)
        for index, layer in enumerate(self.layers):
            if not due[index]:
                kept.append(layer.valid)
                continue
            keys, values = layer.padded_kv()
            inputs = LayerInputs(keys=keys, values=values, valid=layer.valid, key_pos=layer.positions, states=dict(layer.states), tiers=layer.tiers)
            decision = self.engine.compress_layer(self.run, index, inputs)
            if decision.values is not None:
                raise ValueError("block_size needs a policy whose events only drop tokens (no merge)")
            kept.append(decision.kept)  # a masked tier is compacted: attention never sees it again either way
            tiers[index] = decision.tiers
            self.compressions += 1
        first = self.layers[0]
        kept, _ = blocks.apply(kept, [layer.positions for layer in self.layers], [layer.valid for layer in self.layers],
                               first.logical, first.physical, self.block_size)
        for layer, layer_kept, layer_tiers in zip(self.layers, kept, tiers):
            layer.apply(layer_kept, True, None, layer_tiers)

    def steps_until_due(self, step: int, limit: int) -> int:
        """How many decode tokens, from decode step `step` on, can be appended
        in one forward before a layer is due to compress (the last of them may
        be): appending j tokens without compressing makes every head of a
        layer hold j more, so the schedule is known ahead. At most `limit`."""
        if not self.engine.plan.compresses:
            return limit
        held = [layer.held() for layer in self.layers]
        for ahead in range(1, limit):
            if any(layer.physical and self.engine.due(self.run, index, "decode", held[index] + ahead, step + ahead - 1)
                   for index, layer in enumerate(self.layers)):
                return ahead
        return limit

    def settle(self) -> None:
        """Carry out deferred compactions now (timed as compression)."""
        start = time.perf_counter()
        for layer in self.layers:
            layer.settle()
        self.compress_seconds += time.perf_counter() - start

    # ----------------------------------------------------------------- stats

    def kept_counts(self) -> list[list[int]]:
        return [layer.valid.sum(dim=1).tolist() for layer in self.layers]

    def kv_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def kv_bytes_full(self) -> int:
        """What a full cache would hold for the same tokens."""
        return sum(layer.bytes_per_token() * layer.logical for layer in self.layers if layer.logical)

    def bytes_per_token(self) -> int:
        """Bytes one more token adds to every layer (every head appends it)."""
        return sum(layer.bytes_per_token() for layer in self.layers)
