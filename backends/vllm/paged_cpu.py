"""Token slots of vLLM's CPU paged KV cache, read and written in place.

A layer's cache is a tensor [num_blocks, kv_heads, block_size, 2 * head_dim],
but its interior is not token-major: on the `vec`/`vec16` paths each
(block, kv_head) page holds K transposed, [head_dim, block_size], then V,
[block_size, head_dim]. `PageLayout` reads and writes through that layout;
`self_test` checks it against the engine's own write op at startup, so a
different layout (another ISA or version) refuses to start instead of
corrupting the cache. Pure torch.
"""
from __future__ import annotations

import torch

from kvpolicy.errors import KvpolicyError


class PageLayout:
    def __init__(self, block_size: int, head_dim: int):
        self.block_size = block_size
        self.head_dim = head_dim

    def _views(self, cache: torch.Tensor):
        blocks, heads = cache.shape[:2]
        keys = cache.view(blocks, heads, 2, self.head_dim, self.block_size)[:, :, 0]  # [nb, H, D, bs]
        values = cache.view(blocks, heads, 2, self.block_size, self.head_dim)[:, :, 1]  # [nb, H, bs, D]
        return keys, values

    def read(self, cache: torch.Tensor, block: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [H, T, D] of slots (block, offset), each [H, T] or [T]."""
        keys, values = self._views(cache)
        heads = torch.arange(cache.shape[1])[:, None]
        block, offset = block.expand(cache.shape[1], -1), offset.expand(cache.shape[1], -1)
        return keys[block, heads, :, offset], values[block, heads, offset]

    def write(self, cache: torch.Tensor, block: torch.Tensor, offset: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K and V [H, T, D] into slots (block, offset), each [H, T] or [T]."""
        keys, values = self._views(cache)
        heads = torch.arange(cache.shape[1])[:, None]
        block, offset = block.expand(cache.shape[1], -1), offset.expand(cache.shape[1], -1)
        keys[block, heads, :, offset] = k.to(cache.dtype)
        values[block, heads, offset] = v.to(cache.dtype)


def self_test(layout: PageLayout, num_kv_heads: int, dtype: torch.dtype, write_op) -> None:
    """Write random K/V through the engine's op (`write_op(key, value, cache,
    slot_mapping)`, key/value [n, H, D]) into a scratch cache and read them
    back through `layout`; any mismatch refuses to start."""
    bs, dim = layout.block_size, layout.head_dim
    generator = torch.Generator().manual_seed(0)
    n = 2 * bs
    key = torch.randn(n, num_kv_heads, dim, generator=generator).to(dtype)
    value = torch.randn(n, num_kv_heads, dim, generator=generator).to(dtype)
    cache = torch.zeros(3, num_kv_heads, bs, 2 * dim, dtype=dtype)
    slots = torch.randperm(3 * bs, generator=generator)[:n]
    write_op(key, value, cache, slots)
    k, v = layout.read(cache, slots // bs, slots % bs)
    if not (torch.equal(k, key.transpose(0, 1)) and torch.equal(v, value.transpose(0, 1))):
        raise KvpolicyError("kvpolicy: vLLM's CPU KV page layout is not the one this plugin was written for "
                            f"(block_size {bs}, head_dim {dim}, {dtype}); refusing to start rather than corrupt the cache")
    # and our writes must be what the engine's op would have written
    other = torch.zeros_like(cache)
    layout.write(other, slots // bs, slots % bs, key.transpose(0, 1), value.transpose(0, 1))
    if not torch.equal(other, cache):
        raise KvpolicyError("kvpolicy: writing through the probed CPU KV page layout does not match vLLM's own write; refusing to start")
