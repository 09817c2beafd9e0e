"""A transformers Cache that holds what a policy keeps, for real.

Per layer it stores keys/values [1, Hkv, P, D] where P is the physical length:
the most tokens any head of the layer holds. A head holding fewer has invalid
slots (holes) marked in `valid`; attention masks them (see attention.py).
Compaction gathers each head's kept slots into a prefix and allocates smaller
tensors, so the bytes held drop with the budget. `logical` counts the tokens
the layer has seen: HF derives positions (RoPE) from get_seq_length(), which
therefore returns the logical length, never the physical one.
"""
from __future__ import annotations

import time

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvpolicy.backends.torch import LayerInputs, TorchPolicy


class PolicyLayer(DynamicLayer):
    """One layer's K/V plus per-slot metadata, all aligned on the slot axis."""

    def __init__(self, num_kv_heads: int, state_names: list[str], cascade: bool):
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.state_names = state_names
        self.cascade = cascade
        self.logical = 0  # tokens seen by this layer
        self.valid = torch.zeros(num_kv_heads, 0, dtype=torch.bool)
        self.positions = torch.zeros(num_kv_heads, 0, dtype=torch.long)
        self.states = {name: torch.zeros(num_kv_heads, 0) for name in state_names}
        self.tiers = torch.zeros(num_kv_heads, 0, dtype=torch.long) if cascade else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError("kvpolicy's HF cache holds one sequence (batch size 1)")
        keys, values = super().update(key_states, value_states)
        n = key_states.shape[-2]
        new_pos = torch.arange(self.logical, self.logical + n).expand(self.num_kv_heads, n)
        self.positions = torch.cat([self.positions, new_pos], dim=1)
        self.valid = torch.cat([self.valid, torch.ones(self.num_kv_heads, n, dtype=torch.bool)], dim=1)
        for name in self.state_names:
            self.states[name] = torch.cat([self.states[name], torch.zeros(self.num_kv_heads, n)], dim=1)
        if self.tiers is not None:
            self.tiers = torch.cat([self.tiers, torch.zeros(self.num_kv_heads, n, dtype=torch.long)], dim=1)
        self.logical += n
        return keys, values

    def get_seq_length(self) -> int:
        return self.logical

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        physical = self.keys.shape[-2] if self.is_initialized and self.keys.numel() else 0
        return physical + query_length, 0

    @property
    def physical(self) -> int:
        return self.valid.shape[1]

    def held(self) -> int:
        """Tokens held by the fullest head."""
        return int(self.valid.sum(dim=1).max()) if self.physical else 0

    def nbytes(self) -> int:
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def apply(self, kept: torch.Tensor, physical: bool, values: torch.Tensor | None, tiers: torch.Tensor | None) -> None:
        """Keep only `kept` [Hkv, P]; compact to a prefix when `physical`."""
        if values is not None:
            self.values = values[None].to(self.values.dtype)
        if tiers is not None:
            self.tiers = tiers
        kept = kept & self.valid
        if not physical:
            self.valid = kept
            return
        counts = kept.sum(dim=1)
        new_length = int(counts.max()) if counts.numel() else 0
        # Stable order: a head's kept slots, in their current physical order, first.
        order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices[:, :new_length]  # [Hkv, P']
        gather = order[None, :, :, None].expand(1, -1, -1, self.keys.shape[-1])
        self.keys = torch.gather(self.keys, 2, gather).contiguous()
        self.values = torch.gather(self.values, 2, gather).contiguous()
        self.positions = torch.gather(self.positions, 1, order)
        self.valid = torch.arange(new_length)[None, :] < counts[:, None]
        self.positions = self.positions.masked_fill(~self.valid, -1)
        self.states = {name: torch.gather(s, 1, order).masked_fill(~self.valid, 0.0) for name, s in self.states.items()}
        if self.tiers is not None:
            self.tiers = torch.gather(self.tiers, 1, order)


class PolicyCache(Cache):
    """The per-sequence cache the HF engine runs a policy on."""

    def __init__(self, engine: TorchPolicy):
        self.engine = engine
        self.run = engine.new_sequence()
        shape = engine.shape
        states = [s.name for s in engine.ir.states]
        layers = [PolicyLayer(shape.num_kv_heads, states, bool(engine.ir.cascade)) for _ in range(shape.num_layers)]
        super().__init__(layers=layers)
        self.compress_seconds = 0.0
        self.compressions = 0

    def compress(self, phase: str) -> None:
        """Run the policy on every layer that is due (after a forward pass)."""
        if not self.engine.plan.compresses:
            return
        start = time.perf_counter()
        for index, layer in enumerate(self.layers):
            if layer.physical == 0 or not self.engine.due(self.run, index, phase, layer.held()):
                continue
            inputs = LayerInputs(
                keys=layer.keys[0],
                values=layer.values[0],
                valid=layer.valid,
                key_pos=layer.positions,
                states=dict(layer.states),
                tiers=layer.tiers,
            )
            decision = self.engine.compress_layer(self.run, index, inputs)
            layer.apply(decision.kept, decision.physical, decision.values, decision.tiers)
            self.compressions += 1
        self.compress_seconds += time.perf_counter() - start

    # ----------------------------------------------------------------- stats

    def kept_counts(self) -> list[list[int]]:
        return [layer.valid.sum(dim=1).tolist() for layer in self.layers]

    def kv_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def kv_bytes_full(self) -> int:
        """What a full cache would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized and layer.keys.numel():
                per_token = 2 * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
                total += per_token * layer.logical
        return total
