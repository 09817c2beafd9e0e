"""One layer of the HF engine's cache: K/V plus per-slot metadata.

Every kv head has a slot axis; per-slot metadata (`valid`, logical
`positions`, states, tiers) is [Hkv, P], P being the most slots any head of
the layer has. Where the K/V live depends on the layer's storage, chosen once
per policy by cache.py (`layer_factory`):
- flatten_max: keys/values [1, Hkv, P, D]; a head holding fewer tokens has
  invalid slots (holes) that still cost bytes;
- flatten_sum: each head's slots back to back in one buffer (segments.py);
  a head's slots past its own length are not stored at all;
- tiered stores (int8/int4/fp16/bf16 cascade tiers): stores.py, a subclass.
Attention masks holes (see attention.py). Compaction gathers each head's kept
slots into a prefix and allocates smaller tensors, so the bytes held drop
with the budget. Under flatten_max the K/V gather waits for the next append
and shares its copy (policies that evict at every step would otherwise copy
the cache twice per token); `settle()` does it at once. `logical` counts the
tokens the layer has seen: HF derives positions (RoPE) from
get_seq_length(), which therefore returns the logical length, never the
physical one.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvpolicy.backends.torch.evaluate import held_first

from .segments import HeadSegments


class PolicyLayer(DynamicLayer):
    """One layer's K/V plus per-slot metadata, all aligned on the slot axis."""

    def __init__(self, num_kv_heads: int, state_names: list[str], cascade: bool, layout: str = "flatten_max"):
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.state_names = state_names
        self.cascade = cascade
        self.layout = layout
        self.segments = HeadSegments(num_kv_heads) if layout == "flatten_sum" else None
        # flatten_max compaction gathers K/V rows lazily: (rows, length) to take
        # from keys/values, applied with the next append (one copy, see update).
        self._pending: tuple[torch.Tensor, int] | None = None
        self.logical = 0  # tokens seen by this layer
        self.valid = torch.zeros(num_kv_heads, 0, dtype=torch.bool)
        self.positions = torch.zeros(num_kv_heads, 0, dtype=torch.long)
        self.states = {name: torch.zeros(num_kv_heads, 0) for name in state_names}
        self.tiers = torch.zeros(num_kv_heads, 0, dtype=torch.long) if cascade else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError("kvpolicy's HF cache holds one sequence (batch size 1)")
        n = key_states.shape[-2]
        lengths = self._slot_lengths()  # where each head's new slots go
        if self.segments is not None:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.segments.append(key_states[0], value_states[0])
            keys, values = key_states, value_states  # attention reads the segments (attention_groups)
        elif self._pending is not None:
            keys, values = self._compact_and_append(key_states, value_states)
        else:
            keys, values = super().update(key_states, value_states)
        heads = self.num_kv_heads
        new_pos = torch.arange(self.logical, self.logical + n).expand(heads, n)
        self.positions = _append_slots(self.positions, new_pos, lengths, -1)
        self.valid = _append_slots(self.valid, torch.ones(heads, n, dtype=torch.bool), lengths, False)
        for name in self.state_names:
            self.states[name] = _append_slots(self.states[name], torch.zeros(heads, n), lengths, 0.0)
        if self.tiers is not None:
            self.tiers = _append_slots(self.tiers, torch.zeros(heads, n, dtype=torch.long), lengths, 0)
        self.logical += n
        return keys, values

    def get_seq_length(self) -> int:
        return self.logical

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.physical + query_length, 0

    @property
    def physical(self) -> int:
        """Slots on the (padded) slot axis: the most any head of the layer has."""
        return self.valid.shape[1]

    def _slot_lengths(self) -> torch.Tensor:
        """[Hkv] slots each head has on the slot axis: P under flatten_max,
        each head's own segment length under flatten_sum."""
        if self.segments is None:
            return torch.full((self.num_kv_heads,), self.physical, dtype=torch.long)
        return torch.tensor(self.segments.lengths, dtype=torch.long)

    def stored_slots(self) -> torch.Tensor:
        """[Hkv] slots whose K/V each head holds in memory right now (what nbytes counts)."""
        if self.segments is not None:
            return torch.tensor(self.segments.lengths, dtype=torch.long)
        width = self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0
        return torch.full((self.num_kv_heads,), width, dtype=torch.long)

    def held(self) -> int:
        """Tokens held by the fullest head."""
        return int(self.valid.sum(dim=1).max()) if self.physical else 0

    def nbytes(self) -> int:
        if self.segments is not None:
            return self.segments.nbytes()
        if not self.is_initialized or self.keys.numel() == 0:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def bytes_per_token(self) -> int:
        """K and V of one token in every kv head of this layer."""
        sample = self.keys if self.segments is None else self.segments.keys
        return 2 * self.num_kv_heads * sample.shape[-1] * sample.element_size()

    def padded_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [Hkv, P, D] on the padded slot axis (what the policy engine reads)."""
        if self.segments is None:
            self.settle()
            return self.keys[0], self.values[0]
        return self.segments.padded(self.physical)

    def attention_groups(self) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
        """(kv heads, keys, values [1, heads, L, D]) to attend to, L <= P being
        slots 0..L-1 of those heads: all heads at once when they store the
        same number of slots, else one head (its own segment) at a time."""
        if self.segments is None:
            self.settle()
            return [(slice(0, self.num_kv_heads), self.keys, self.values)]
        if self.segments.uniform:
            keys, values = self.segments.stacked()
            return [(slice(0, self.num_kv_heads), keys[None], values[None])]
        groups = []
        for h in range(self.num_kv_heads):
            keys, values = self.segments.head(h)
            groups.append((slice(h, h + 1), keys[None, None], values[None, None]))
        return groups

    def apply(self, kept: torch.Tensor, physical: bool, values: torch.Tensor | None, tiers: torch.Tensor | None) -> None:
        """Keep only `kept` [Hkv, P]; compact to a prefix when `physical`."""
        self.settle()
        if values is not None:
            if self.segments is None:
                self.values = values[None].to(self.values.dtype)
            else:
                self.segments.set_values(values)
        if tiers is not None:
            self.tiers = tiers
        kept = kept & self.valid
        if not physical:
            self.valid = kept
            return
        if bool(kept.all()):  # nothing dropped and no holes: already compact
            return
        counts = kept.sum(dim=1)
        new_length = int(counts.max()) if counts.numel() else 0
        order = _kept_first(kept, counts, new_length)  # [Hkv, P']
        if self.segments is None:  # K/V rows to keep; gathered by settle() or the next append
            width = self.keys.shape[-2]
            self._pending = ((order + (torch.arange(self.num_kv_heads) * width)[:, None]).reshape(-1), new_length)
        else:  # each head stores exactly its kept slots
            self.segments.keep([order[h, : int(count)] for h, count in enumerate(counts)])
        self.positions = torch.gather(self.positions, 1, order)
        self.states = {name: torch.gather(s, 1, order) for name, s in self.states.items()}
        if bool((counts == new_length).all()):  # every head full: no holes to clear
            self.valid = torch.ones(self.num_kv_heads, new_length, dtype=torch.bool)
        else:
            self.valid = torch.arange(new_length)[None, :] < counts[:, None]
            self.positions = self.positions.masked_fill(~self.valid, -1)
            self.states = {name: s.masked_fill(~self.valid, 0.0) for name, s in self.states.items()}
        if self.tiers is not None:
            self.tiers = torch.gather(self.tiers, 1, order)

    def settle(self) -> None:
        """Carry out a deferred flatten_max compaction now (one row copy per kept slot)."""
        if self._pending is None:
            return
        rows, length = self._pending
        self._pending = None
        heads, dim = self.num_kv_heads, self.keys.shape[-1]
        self.keys = self.keys.reshape(-1, dim).index_select(0, rows).view(1, heads, length, dim)
        self.values = self.values.reshape(-1, dim).index_select(0, rows).view(1, heads, length, dim)

    def _compact_and_append(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """The deferred compaction and the append in one copy: each head's kept
        rows and then its new tokens go straight into new tensors (an append
        copies the whole cache anyway, as DynamicLayer's torch.cat does)."""
        rows, length = self._pending
        self._pending = None
        heads, n = self.num_kv_heads, key_states.shape[-2]
        # Row 0 stands in for the new tokens' slots; they are overwritten below.
        rows = torch.cat([rows.view(heads, length), rows.new_zeros(heads, n)], dim=1).reshape(-1)
        out = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            grown = old.reshape(-1, old.shape[-1]).index_select(0, rows).view(1, heads, length + n, -1)
            grown[:, :, length:] = new
            out.append(grown)
        self.keys, self.values = out
        return self.keys, self.values


def _kept_first(kept: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    """[Hkv, width] slot indices: each head's kept slots in their current
    (physical) order, then its dropped ones (stable)."""
    if bool((counts == width).all()):  # every head keeps `width`: nonzero is row-major, already in order
        return kept.nonzero()[:, 1].view(kept.shape[0], width)
    return held_first(kept)[:, :width]


def _append_slots(meta: torch.Tensor, new: torch.Tensor, lengths: torch.Tensor, fill) -> torch.Tensor:
    """Per-slot metadata [Hkv, P] grown by n = new.shape[1] slots: head h's new
    entries go right after its `lengths[h]` slots (flatten_sum heads can be
    shorter than P; the slots between stay holes filled with `fill`)."""
    width = meta.shape[1]
    if bool((lengths == width).all()):
        return torch.cat([meta, new.to(meta.dtype)], dim=1)
    grown = torch.cat([meta, meta.new_full(new.shape, fill)], dim=1)
    columns = lengths[:, None] + torch.arange(new.shape[1])[None, :]
    return grown.scatter(1, columns, new.to(meta.dtype))
