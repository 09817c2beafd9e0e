"""A fixed-size pool of KV blocks: which block ids are free, which are taken.

The pool knows nothing about sequences or tensors; it only hands out and takes
back integer block ids, and refuses to free a block twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import BlockLeak, DoubleFree, PoolExhausted


class BlockPool:
    """Block ids 0..num_blocks-1, each either free or allocated."""

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        # Reversed so that pop() hands out low ids first: layouts in tests and
        # debug dumps are then easy to read.
        self._free_ids: list[int] = list(range(num_blocks - 1, -1, -1))
        self._allocated_ids: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free_ids)

    @property
    def num_allocated(self) -> int:
        return len(self._allocated_ids)

    def free_ids(self) -> frozenset[int]:
        return frozenset(self._free_ids)

    def allocated_ids(self) -> frozenset[int]:
        return frozenset(self._allocated_ids)

    def allocate(self, count: int) -> list[int]:
        """Take `count` blocks, all or none."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free_ids):
            raise PoolExhausted(
                f"need {count} KV block(s) but only {len(self._free_ids)} of "
                f"{self.num_blocks} are free"
            )
        taken = [self._free_ids.pop() for _ in range(count)]
        self._allocated_ids.update(taken)
        return taken

    def free(self, block_ids: Iterable[int]) -> None:
        """Return blocks to the pool, all or none."""
        block_ids = list(block_ids)
        seen: set[int] = set()
        for block_id in block_ids:
            if block_id in seen:
                raise DoubleFree(f"block {block_id} appears twice in one free() call")
            if block_id not in self._allocated_ids:
                raise DoubleFree(f"block {block_id} is freed but is not allocated")
            seen.add(block_id)
        self._allocated_ids.difference_update(block_ids)
        # Freed blocks are reused first (LIFO): their memory is warm.
        self._free_ids.extend(reversed(block_ids))

    def check(self) -> None:
        """Raise BlockLeak if the free list and the allocated set disagree."""
        free = set(self._free_ids)
        if len(free) != len(self._free_ids):
            raise BlockLeak("a block id appears twice in the free list")
        both = free & self._allocated_ids
        if both:
            raise BlockLeak(f"blocks {sorted(both)} are both free and allocated")
        if free | self._allocated_ids != set(range(self.num_blocks)):
            missing = set(range(self.num_blocks)) - free - self._allocated_ids
            raise BlockLeak(f"blocks {sorted(missing)} are neither free nor allocated")
