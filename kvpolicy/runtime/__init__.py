"""Engine-agnostic runtime core: a paged KV store with per-(layer, kv_head)
validity and logical positions, and the block-table rewriter that compacts
kept tokens and frees whole blocks. Pure torch; engines adapt to it."""

from .errors import BlockLeak, DoubleFree, InvalidKeep, PoolExhausted, RuntimeCoreError
from .paged import INVALID_POSITION, LayerView, PagedKV, SequenceState
from .pool import BlockPool
from .rewrite import CompactResult, Layout, compact, kept_mask
from .stats import SequenceStats, StoreStats, sequence_stats, store_stats

__all__ = [
    "INVALID_POSITION",
    "BlockLeak",
    "BlockPool",
    "CompactResult",
    "DoubleFree",
    "InvalidKeep",
    "LayerView",
    "Layout",
    "PagedKV",
    "PoolExhausted",
    "RuntimeCoreError",
    "SequenceState",
    "SequenceStats",
    "StoreStats",
    "compact",
    "kept_mask",
    "sequence_stats",
    "store_stats",
]
