"""All layers of a compression event in one engine call, when that cannot
change what any layer keeps.

Decode-time policies (H2O, StreamingLLM, sliding window) evict at every step
in every layer. Run layer by layer, the engine's fixed cost (a few dozen
small tensor ops) is paid once per layer and step: most of the eviction time
on a 30-layer model. When the policy decides every (layer, kv head) on its
own, the layers' slot metadata can be stacked as the kv heads of one layer
[L x Hkv, P] and run through the same policy compiled for that shape: each
row gets exactly the decision it gets alone, because every stage the policy
uses works row by row (positional ranks, states, sort-based top_k / top_p,
thresholds, pooling along tokens).

Not batched (the per-layer path runs): anything that depends on the layer
index or spans heads (by-layer counts, layer / kv-head restrictions,
`per layer` budgets, head_mean, skipped layers), calibration, observed
queries, cascades, merging, and signals read from K/V (batching would copy
the whole cache); and any event where the layers are not all due with the
same slot count.
"""
from __future__ import annotations

import torch

from kvpolicy import ir
from kvpolicy.ops import KEYS, OPS, VALUES
from kvpolicy.program import op_of
from kvpolicy.walk import walk
from kvpolicy.backends.torch import LayerInputs, ModelShape, TorchPolicy

# What a row cannot decide alone: an operation that mixes the layer's kv heads,
# or one reading held keys/values outside attention (the batch hands neither).
ROW_UNSAFE = frozenset(name for name, op in OPS.items() if op.mixes_heads or (op.reads & {KEYS, VALUES} and not op.needs_queries))


def rows_decide_alone(policy: ir.Policy) -> bool:
    """Whether each (layer, kv head) row's decision depends on that row alone."""
    if policy.cascade or policy.calibrations or policy.merge is not None or policy.observe or policy.skip_layers:
        return False
    for keep in policy.keeps:
        if keep.per != "kv_head" or keep.by_layer is not None or keep.layers is not None or keep.kv_heads is not None:
            return False
    return not any(op_of(node) in ROW_UNSAFE for node in walk(policy))


class LayerBatch:
    """Runs a compression event for all layers at once (see the module doc)."""

    def __init__(self, engine: TorchPolicy):
        shape = engine.shape
        layers = shape.num_layers
        stacked = ModelShape(1, layers * shape.num_q_heads, layers * shape.num_kv_heads, shape.head_dim, shape.name)
        self.engine = engine
        self.stacked = type(engine)(engine.ir, stacked)  # the same backend, all layers as one
        self.stacked_run = self.stacked.new_sequence()

    @staticmethod
    def for_engine(engine: TorchPolicy) -> "LayerBatch | None":
        return LayerBatch(engine) if engine.plan.compresses and rows_decide_alone(engine.ir) else None

    def compress(self, cache, phase: str) -> bool:
        """Compress every layer of `cache` in one call; False (nothing done)
        when this event does not qualify."""
        layers = cache.layers
        width = layers[0].physical
        if width == 0 or any(layer.physical != width for layer in layers):
            return False
        valid = torch.cat([layer.valid for layer in layers])  # [L x Hkv, P]
        heads = layers[0].num_kv_heads
        held = valid.view(len(layers), heads, width).sum(dim=-1).amax(dim=-1).tolist()
        if not all(self.engine.due(cache.run, index, phase, held[index]) for index in range(len(layers))):
            return False
        inputs = LayerInputs(
            keys=valid.new_empty(valid.shape[0], width, 0, dtype=torch.float32),  # shape only: K/V are never read
            values=valid.new_empty(valid.shape[0], width, 0, dtype=torch.float32),
            valid=valid,
            key_pos=torch.cat([layer.positions for layer in layers]),
            states={name: torch.cat([layer.states[name] for layer in layers]) for name in layers[0].state_names},
        )
        self.stacked_run.decode_step = cache.run.decode_step
        decision = self.stacked.compress_layer(self.stacked_run, 0, inputs)
        for index, (layer, kept) in enumerate(zip(layers, decision.kept.view(len(layers), heads, width))):
            cache.run.compressions[index] += 1
            layer.apply(kept, decision.physical, None, None)
        cache.compressions += len(layers)
        return True
