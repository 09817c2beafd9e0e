"""A paged KV store: per-layer block tensors, one block table per sequence,
and per (layer, kv_head) metadata saying which physical slot holds which
logical (RoPE) position and whether the slot is still valid.

Storage layout (chosen to wrap vLLM's CPU cache without copying): one tensor
per layer shaped [num_blocks, kv_heads, block_size, 2 * head_dim], keys in
[..., :head_dim], values in [..., head_dim:]. Only `_kv_index` and the
keys()/values() views know this; another engine layout means changing them.

Physical vs logical. A sequence has one block table shared by all layers and
heads (vLLM has no head dimension in its block table), so every head appends
at the same physical slot: the sequence's `physical_length`. Physical slot p
lives in block `block_ids[p // block_size]` at offset `p % block_size`.
`logical_length` is one past the last logical position appended (the engine's
token counter; the next token's RoPE position) and never decreases, whatever
compaction does. After a compaction heads can hold fewer tokens than the
physical length: their surplus slots are holes, marked invalid, and new
tokens still land after the physical length, so a head's valid slots need not
be a prefix. Readers must always apply the validity mask.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import torch

from .errors import BlockLeak, PoolExhausted, RuntimeCoreError
from .pool import BlockPool

# Logical position stored in a slot that holds no token; kept so that a bug
# reading through the mask shows up as an impossible position.
INVALID_POSITION = -1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class SequenceState:
    """Bookkeeping of one sequence. The metadata tensors are sized to the
    capacity of the held blocks (len(block_ids) * block_size) so that decode
    steps only grow them once per block."""

    block_ids: list[int]
    physical_length: int
    logical_length: int
    positions: torch.Tensor  # [layers, kv_heads, capacity] int64 logical position per slot
    valid: torch.Tensor  # [layers, kv_heads, capacity] bool, False for holes and unused slots

    @property
    def capacity(self) -> int:
        return self.positions.shape[-1]

    def head_lengths(self) -> torch.Tensor:
        """[layers, kv_heads] number of valid (kept) tokens per head."""
        return self.valid.sum(dim=-1)


@dataclass(frozen=True)
class LayerView:
    """One layer of one sequence, padded to the physical length. keys/values
    at invalid slots are stale data: mask them out with `valid`."""

    keys: torch.Tensor  # [kv_heads, physical_length, head_dim]
    values: torch.Tensor  # [kv_heads, physical_length, head_dim]
    positions: torch.Tensor  # [kv_heads, physical_length] int64
    valid: torch.Tensor  # [kv_heads, physical_length] bool


class PagedKV:
    """K/V of many sequences in blocks drawn from one BlockPool."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        kv_caches: list[torch.Tensor] | None = None,
        pool: BlockPool | None = None,
    ):
        """kv_caches: existing per-layer tensors to wrap (e.g. an engine's),
        each [num_blocks, num_kv_heads, block_size, 2 * head_dim]; allocated
        here when None. pool: the block allocator; a fresh one when None."""
        if min(num_layers, num_kv_heads, head_dim, block_size) < 1:
            raise ValueError("num_layers, num_kv_heads, head_dim and block_size must be >= 1")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, num_kv_heads, block_size, 2 * head_dim)
        if kv_caches is None:
            kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        if len(kv_caches) != num_layers or any(tuple(t.shape) != shape for t in kv_caches):
            raise ValueError(f"kv_caches must be {num_layers} tensors shaped {list(shape)}")
        self.kv_caches = kv_caches
        self.dtype = kv_caches[0].dtype if kv_caches else dtype
        self.device = kv_caches[0].device if kv_caches else torch.device(device)
        self.pool = pool if pool is not None else BlockPool(num_blocks)
        if self.pool.num_blocks != num_blocks:
            raise ValueError("pool and store disagree on the number of blocks")
        self._sequences: dict[Hashable, SequenceState] = {}

    # ---- sizes -----------------------------------------------------------

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block occupies across all layers (K and V)."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * self.num_kv_heads * self.block_size * 2 * self.head_dim * element_size

    # ---- raw storage views -------------------------------------------------

    def keys(self, layer: int) -> torch.Tensor:
        """[num_blocks, kv_heads, block_size, head_dim] view of layer's keys."""
        return self.kv_caches[layer][..., : self.head_dim]

    def values(self, layer: int) -> torch.Tensor:
        """[num_blocks, kv_heads, block_size, head_dim] view of layer's values."""
        return self.kv_caches[layer][..., self.head_dim :]

    # ---- sequences -------------------------------------------------------

    def add_sequence(self, seq_id: Hashable) -> SequenceState:
        if seq_id in self._sequences:
            raise ValueError(f"sequence {seq_id!r} already exists")
        empty_shape = (self.num_layers, self.num_kv_heads, 0)
        state = SequenceState(
            block_ids=[],
            physical_length=0,
            logical_length=0,
            positions=torch.empty(empty_shape, dtype=torch.int64, device=self.device),
            valid=torch.empty(empty_shape, dtype=torch.bool, device=self.device),
        )
        self._sequences[seq_id] = state
        return state

    def sequence(self, seq_id: Hashable) -> SequenceState:
        try:
            return self._sequences[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._sequences

    def sequence_ids(self) -> Iterator[Hashable]:
        return iter(list(self._sequences))

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self.sequence(seq_id).block_ids)

    def free(self, seq_id: Hashable) -> list[int]:
        """Forget the sequence and return all its blocks to the pool."""
        state = self.sequence(seq_id)
        released = list(state.block_ids)
        self.pool.free(released)
        del self._sequences[seq_id]
        return released

    # ---- slots ----------------------------------------------------------

    def slot_mapping(self, seq_id: Hashable, physical_positions: torch.Tensor) -> torch.Tensor:
        """Flat slot index (block_id * block_size + offset) of each physical
        position, as vLLM's slot_mapping wants it."""
        blocks, offsets = self._block_and_offset(self.sequence(seq_id), physical_positions)
        return blocks * self.block_size + offsets

    def _block_and_offset(self, state: SequenceState, physical_positions: torch.Tensor):
        table = torch.tensor(state.block_ids, dtype=torch.int64, device=self.device)
        physical_positions = physical_positions.to(device=self.device, dtype=torch.int64)
        return table[physical_positions // self.block_size], physical_positions % self.block_size

    def _kv_index(self, state: SequenceState, heads: torch.Tensor, physical_positions: torch.Tensor):
        """Index tuple into a layer tensor for (head, physical position) pairs
        (broadcast against each other); yields [..., 2 * head_dim]."""
        blocks, offsets = self._block_and_offset(state, physical_positions)
        return blocks, heads.to(self.device), offsets

    def read_slots(self, seq_id: Hashable, layer: int, heads: torch.Tensor, physical_positions: torch.Tensor) -> torch.Tensor:
        """Raw [..., 2 * head_dim] K|V rows at (head, physical position) pairs."""
        state = self.sequence(seq_id)
        return self.kv_caches[layer][self._kv_index(state, heads, physical_positions)]

    def move_slots(
        self,
        seq_id: Hashable,
        layer: int,
        heads: torch.Tensor,
        source_positions: torch.Tensor,
        target_positions: torch.Tensor,
    ) -> None:
        """Copy K/V of (heads[i], source[i]) to (heads[i], target[i]) for all i
        at once: every source is read before any target is written, so moves
        may overlap (slot a -> b while b -> c). Metadata is the caller's job."""
        state = self.sequence(seq_id)
        cache = self.kv_caches[layer]
        rows = cache[self._kv_index(state, heads, source_positions)]  # advanced indexing copies
        cache[self._kv_index(state, heads, target_positions)] = rows

    # ---- growing and shrinking -----------------------------------------

    def _reserve(self, state: SequenceState, physical_length: int) -> None:
        """Hold enough blocks for `physical_length` slots; all or nothing."""
        needed = _ceil_div(physical_length, self.block_size) - len(state.block_ids)
        if needed <= 0:
            return
        try:
            new_blocks = self.pool.allocate(needed)
        except PoolExhausted as exc:
            raise PoolExhausted(f"{exc} (sequence of physical length {state.physical_length} growing to {physical_length})") from None
        state.block_ids.extend(new_blocks)
        extra = (self.num_layers, self.num_kv_heads, needed * self.block_size)
        state.positions = torch.cat(
            [state.positions, torch.full(extra, INVALID_POSITION, dtype=torch.int64, device=self.device)], dim=-1
        )
        state.valid = torch.cat([state.valid, torch.zeros(extra, dtype=torch.bool, device=self.device)], dim=-1)

    def truncate(self, seq_id: Hashable, physical_length: int) -> list[int]:
        """Shrink the physical length and free whole blocks past it. Slots
        at or beyond the new length must already be invalid: truncation
        never drops a kept token."""
        state = self.sequence(seq_id)
        if not 0 <= physical_length <= state.physical_length:
            raise ValueError(f"cannot truncate physical length {state.physical_length} to {physical_length}")
        if state.valid[..., physical_length:].any():
            raise RuntimeCoreError("truncate would drop valid slots")
        keep_blocks = _ceil_div(physical_length, self.block_size)
        released = state.block_ids[keep_blocks:]
        self.pool.free(released)
        del state.block_ids[keep_blocks:]
        capacity = keep_blocks * self.block_size
        state.positions = state.positions[..., :capacity].clone()
        state.valid = state.valid[..., :capacity].clone()
        state.physical_length = physical_length
        return released

    # ---- appending ------------------------------------------------------

    def append(
        self,
        seq_id: Hashable,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write n new tokens for every layer and head at physical slots
        [physical_length, physical_length + n). keys/values are
        [layers, kv_heads, n, head_dim] in the store's dtype (no silent cast:
        kept KV must stay bit-identical). positions: their logical positions,
        default logical_length + arange(n); if given, strictly increasing and
        not below logical_length. Returns the physical positions written."""
        state = self.sequence(seq_id)
        expected = (self.num_layers, self.num_kv_heads)
        if keys.dim() != 4 or tuple(keys.shape[:2]) != expected or keys.shape[3] != self.head_dim:
            raise ValueError(f"keys must be [{self.num_layers}, {self.num_kv_heads}, n, {self.head_dim}], got {list(keys.shape)}")
        if values.shape != keys.shape:
            raise ValueError(f"values shape {list(values.shape)} differs from keys shape {list(keys.shape)}")
        if keys.dtype != self.dtype or values.dtype != self.dtype:
            raise ValueError(f"keys/values must be {self.dtype}, got {keys.dtype}/{values.dtype}")
        count = keys.shape[2]
        if positions is None:
            positions = torch.arange(state.logical_length, state.logical_length + count, device=self.device)
        else:
            positions = positions.to(device=self.device, dtype=torch.int64)
            if positions.shape != (count,):
                raise ValueError(f"positions must be [{count}], got {list(positions.shape)}")
            if count and (positions[0] < state.logical_length or (positions[1:] <= positions[:-1]).any()):
                raise ValueError(
                    f"positions must be strictly increasing and >= logical length {state.logical_length}"
                )
        if count == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)

        start = state.physical_length
        self._reserve(state, start + count)
        physical = torch.arange(start, start + count, device=self.device)
        heads = torch.arange(self.num_kv_heads, device=self.device)[:, None]
        index = self._kv_index(state, heads, physical[None, :])  # -> [kv_heads, n, 2 * head_dim]
        for layer in range(self.num_layers):
            self.kv_caches[layer][index] = torch.cat([keys[layer], values[layer]], dim=-1).to(self.device)
        state.positions[..., start : start + count] = positions
        state.valid[..., start : start + count] = True
        state.physical_length = start + count
        state.logical_length = int(positions[-1]) + 1
        return physical

    # ---- reading --------------------------------------------------------

    def read_layer(self, seq_id: Hashable, layer: int) -> LayerView:
        """All heads of one layer padded to the physical length (for masked
        attention, e.g. an HF cache adapter)."""
        state = self.sequence(seq_id)
        length = state.physical_length
        heads = torch.arange(self.num_kv_heads, device=self.device)[:, None]
        rows = self.kv_caches[layer][self._kv_index(state, heads, torch.arange(length, device=self.device)[None, :])]
        return LayerView(
            keys=rows[..., : self.head_dim],
            values=rows[..., self.head_dim :],
            positions=state.positions[layer, :, :length].clone(),
            valid=state.valid[layer, :, :length].clone(),
        )

    def gather(self, seq_id: Hashable, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One head's valid tokens in physical order: keys [n, head_dim],
        values [n, head_dim], logical positions [n]."""
        state = self.sequence(seq_id)
        physical = state.valid[layer, head].nonzero().flatten()
        heads = torch.full_like(physical, head)
        rows = self.kv_caches[layer][self._kv_index(state, heads, physical)]
        return rows[:, : self.head_dim], rows[:, self.head_dim :], state.positions[layer, head, physical].clone()

    # ---- invariants -----------------------------------------------------

    def check_consistency(self) -> None:
        """Raise if any block is lost, shared, or held while free, or if a
        sequence's metadata disagrees with its blocks. Cheap enough for tests
        and debug builds; engines need not call it."""
        self.pool.check()
        owner: dict[int, Hashable] = {}
        for seq_id, state in self._sequences.items():
            for block_id in state.block_ids:
                if block_id in owner:
                    raise BlockLeak(f"block {block_id} is held by sequences {owner[block_id]!r} and {seq_id!r}")
                owner[block_id] = seq_id
        held = set(owner)
        allocated = set(self.pool.allocated_ids())
        if held - allocated:
            raise BlockLeak(f"blocks {sorted(held - allocated)} are held by a sequence but free in the pool")
        if allocated - held:
            raise BlockLeak(f"blocks {sorted(allocated - held)} are allocated but held by no sequence")
        for seq_id, state in self._sequences.items():
            self._check_sequence(seq_id, state)

    def _check_sequence(self, seq_id: Hashable, state: SequenceState) -> None:
        def fail(what: str):
            raise RuntimeCoreError(f"sequence {seq_id!r}: {what}")

        if state.capacity != len(state.block_ids) * self.block_size:
            fail("metadata capacity differs from the blocks held")
        if len(state.block_ids) != _ceil_div(state.physical_length, self.block_size):
            fail(f"holds {len(state.block_ids)} blocks for physical length {state.physical_length}")
        if state.valid[..., state.physical_length :].any():
            fail("a slot beyond the physical length is valid")
        if state.physical_length and not state.valid[..., state.physical_length - 1].any():
            fail("the last physical slot is invalid for every head (should have been trimmed)")
        if ((state.positions == INVALID_POSITION) != ~state.valid).any():
            fail("positions and validity mask disagree")
        if (state.positions >= state.logical_length).any():
            fail("a slot holds a position at or beyond the logical length")
