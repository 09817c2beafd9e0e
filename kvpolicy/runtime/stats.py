"""Memory and occupancy figures of a PagedKV: what a sequence holds and what
an uncompressed cache would hold, for reports such as res.stats."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from .paged import PagedKV


@dataclass(frozen=True)
class SequenceStats:
    blocks_held: int
    kv_bytes: int  # bytes of the blocks actually held (all layers, K and V)
    kv_bytes_full: int  # bytes the same paged store would hold without compression
    physical_length: int
    logical_length: int
    kept: list[list[int]]  # [layer][kv_head] valid tokens


@dataclass(frozen=True)
class StoreStats:
    blocks_total: int
    blocks_free: int
    blocks_held: int
    kv_bytes: int  # bytes of all blocks held by sequences


def sequence_stats(store: PagedKV, seq_id: Hashable) -> SequenceStats:
    state = store.sequence(seq_id)
    blocks_full = -(-state.logical_length // store.block_size)
    return SequenceStats(
        blocks_held=len(state.block_ids),
        kv_bytes=len(state.block_ids) * store.bytes_per_block,
        # Counted in whole blocks like kv_bytes, so the ratio compares like
        # with like (a paged engine rounds up the full cache too).
        kv_bytes_full=blocks_full * store.bytes_per_block,
        physical_length=state.physical_length,
        logical_length=state.logical_length,
        kept=state.head_lengths().tolist(),
    )


def store_stats(store: PagedKV) -> StoreStats:
    held = sum(len(store.sequence(s).block_ids) for s in store.sequence_ids())
    return StoreStats(
        blocks_total=store.num_blocks,
        blocks_free=store.pool.num_free,
        blocks_held=held,
        kv_bytes=held * store.bytes_per_block,
    )
