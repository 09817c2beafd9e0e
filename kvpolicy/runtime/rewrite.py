"""The block-table rewriter: apply a kept set per (layer, kv_head) to one
sequence of a PagedKV, in one of two layouts.

- flatten_max: each head's kept tokens move, in their current physical order,
  into slots 0..count-1; the physical length becomes the largest count over
  all (layer, head); shorter heads have invalid holes up to it. Whole blocks
  past the new length go back to the pool. Costly to prepare, and attention
  then walks only max-count slots.
- mask: nothing moves; dropped slots are marked invalid. Attention still
  walks the full physical length. Blocks are freed only at the tail: if
  every head dropped the last slots, the physical length shrinks to one past
  the last slot any head keeps (the same rule flatten_max ends with), and
  whole blocks past it are freed. Interior blocks are never freed, since the
  shared block table must stay dense.

Logical positions travel with their tokens; logical_length never changes
here. Tokens dropped once never come back (kept must be a subset of valid).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from .errors import InvalidKeep
from .paged import INVALID_POSITION, PagedKV, SequenceState


class Layout(str, Enum):
    FLATTEN_MAX = "flatten_max"
    MASK = "mask"


# What compact() accepts as a kept set:
# - a bool tensor [layers, kv_heads, physical_length];
# - an integer tensor [layers, kv_heads, k] (the same count k for every head);
# - a nested sequence [layers][kv_heads] of 1-D integer tensors or int lists.
# Index forms hold physical slot indices, strictly increasing.
KeptSet = torch.Tensor | Sequence[Sequence[torch.Tensor | Sequence[int]]]


@dataclass(frozen=True)
class CompactResult:
    layout: Layout
    previous_physical_length: int
    physical_length: int
    freed_block_ids: list[int]  # already returned to the pool
    kept_counts: torch.Tensor  # [layers, kv_heads]


def kept_mask(store: PagedKV, seq_id: Hashable, kept: KeptSet) -> torch.Tensor:
    """Normalise a kept set to a bool mask [layers, kv_heads, physical_length]
    and check it names only valid slots."""
    state = store.sequence(seq_id)
    length = state.physical_length
    shape = (store.num_layers, store.num_kv_heads, length)
    if isinstance(kept, torch.Tensor) and kept.dtype == torch.bool:
        if tuple(kept.shape) != shape:
            raise InvalidKeep(f"kept mask must be shaped {list(shape)}, got {list(kept.shape)}")
        mask = kept.to(store.device)
    else:
        if isinstance(kept, torch.Tensor) and (kept.dim() != 3 or tuple(kept.shape[:2]) != shape[:2]):
            raise InvalidKeep(f"kept index tensor must be [{shape[0]}, {shape[1]}, k], got {list(kept.shape)}")
        if len(kept) != shape[0] or any(len(row) != shape[1] for row in kept):
            raise InvalidKeep(f"kept must list {shape[0]} layers of {shape[1]} kv heads")
        mask = torch.zeros(shape, dtype=torch.bool, device=store.device)
        for layer in range(shape[0]):
            for head in range(shape[1]):
                mask[layer, head] = _index_row_to_mask(kept[layer][head], length, layer, head, store.device)
    dropped_hole = mask & ~state.valid[..., :length]
    if dropped_hole.any():
        layer, head, slot = (int(i) for i in dropped_hole.nonzero()[0])
        raise InvalidKeep(f"layer {layer} head {head}: slot {slot} is kept but holds no valid token")
    return mask


def _index_row_to_mask(row, length: int, layer: int, head: int, device) -> torch.Tensor:
    indices = torch.as_tensor(row, device=device)
    if indices.numel() == 0:
        return torch.zeros(length, dtype=torch.bool, device=device)
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise InvalidKeep(f"layer {layer} head {head}: kept indices must be a 1-D integer tensor")
    if (indices[1:] <= indices[:-1]).any():
        raise InvalidKeep(f"layer {layer} head {head}: kept indices must be strictly increasing")
    if indices[0] < 0 or indices[-1] >= length:
        raise InvalidKeep(f"layer {layer} head {head}: kept index out of range [0, {length})")
    row_mask = torch.zeros(length, dtype=torch.bool, device=device)
    row_mask[indices] = True
    return row_mask


def compact(
    store: PagedKV,
    seq_id: Hashable,
    kept: KeptSet,
    layout: Layout | str = Layout.FLATTEN_MAX,
) -> CompactResult:
    """Keep exactly `kept` (physical slot indices) per (layer, kv_head)."""
    layout = Layout(layout)
    state = store.sequence(seq_id)
    mask = kept_mask(store, seq_id, kept)
    previous_length = state.physical_length
    if layout is Layout.FLATTEN_MAX:
        _flatten(store, seq_id, state, mask)
    else:
        _apply_mask(state, mask)
    freed = store.truncate(seq_id, _occupied_length(state))
    return CompactResult(
        layout=layout,
        previous_physical_length=previous_length,
        physical_length=state.physical_length,
        freed_block_ids=freed,
        kept_counts=mask.sum(dim=-1),
    )


def _flatten(store: PagedKV, seq_id: Hashable, state: SequenceState, mask: torch.Tensor) -> None:
    # Target slot of each kept token = its rank among its head's kept tokens,
    # which preserves order; ranks never exceed sources, so nothing is
    # overwritten before it is read within move_slots.
    target = mask.cumsum(dim=-1) - 1
    for layer in range(store.num_layers):
        heads, sources = mask[layer].nonzero(as_tuple=True)
        targets = target[layer, heads, sources]
        moving = sources != targets
        if moving.any():
            store.move_slots(seq_id, layer, heads[moving], sources[moving], targets[moving])

    layers, heads, sources = mask.nonzero(as_tuple=True)
    targets = target[layers, heads, sources]
    new_positions = torch.full_like(state.positions, INVALID_POSITION)
    new_positions[layers, heads, targets] = state.positions[layers, heads, sources]
    new_valid = torch.zeros_like(state.valid)
    new_valid[layers, heads, targets] = True
    state.positions, state.valid = new_positions, new_valid


def _apply_mask(state: SequenceState, mask: torch.Tensor) -> None:
    length = mask.shape[-1]
    # mask is a subset of valid (checked), so this is "valid AND kept".
    state.valid[..., :length] = mask
    state.positions[..., :length][~mask] = INVALID_POSITION


def _occupied_length(state: SequenceState) -> int:
    """One past the last slot any head still holds (0 if none)."""
    occupied_slots = state.valid.any(dim=(0, 1)).nonzero()
    return int(occupied_slots[-1]) + 1 if occupied_slots.numel() else 0
