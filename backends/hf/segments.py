"""Keys and values of one layer in the flatten_sum layout.

Kv head h's tokens are rows offsets[h] .. offsets[h] + lengths[h] of one
[S, D] buffer (one for K, one for V), heads back to back, so the bytes held
are the sum of the heads' lengths: a head that keeps fewer tokens costs
fewer bytes (flatten_max pads every head to the fullest one instead).
Row i of head h is slot (column) i of that head in the layer's per-slot
metadata (cache.py), which is padded to the longest head.
"""
from __future__ import annotations

import torch


class HeadSegments:
    def __init__(self, num_kv_heads: int):
        self.lengths = [0] * num_kv_heads
        self.keys: torch.Tensor | None = None  # [S, D], S = sum(lengths)
        self.values: torch.Tensor | None = None

    @property
    def num_kv_heads(self) -> int:
        return len(self.lengths)

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths)) == 1

    def offsets(self) -> list[int]:
        out, total = [], 0
        for length in self.lengths:
            out.append(total)
            total += length
        return out

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    # ------------------------------------------------------------- reading

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head h's keys and values, [lengths[h], D] views (no copy)."""
        start = self.offsets()[h]
        end = start + self.lengths[h]
        return self.keys[start:end], self.values[start:end]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[Hkv, L, D] views; only when every head holds the same count."""
        assert self.uniform
        shape = (self.num_kv_heads, self.lengths[0], self.keys.shape[-1])
        return self.keys.view(shape), self.values.view(shape)

    def padded(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[Hkv, width, D], zeros past each head's length: what the policy
        engine reads (one padded slot axis per layer). A copy, made only at
        compression events; views when every head fills `width`."""
        if self.uniform and self.lengths[0] == width:
            return self.stacked()
        dim = self.keys.shape[-1]
        keys = self.keys.new_zeros(self.num_kv_heads, width, dim)
        values = self.values.new_zeros(self.num_kv_heads, width, dim)
        for h, start in enumerate(self.offsets()):
            length = self.lengths[h]
            keys[h, :length] = self.keys[start : start + length]
            values[h, :length] = self.values[start : start + length]
        return keys, values

    # ------------------------------------------------------------- writing

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add n tokens [Hkv, n, D] at the end of every head's segment."""
        heads, n, dim = keys.shape
        if self.keys is None:
            self.keys, self.values = keys.reshape(-1, dim).contiguous(), values.reshape(-1, dim).contiguous()
        elif self.uniform:  # one concatenation along the token axis
            old_k, old_v = self.stacked()
            self.keys = torch.cat([old_k, keys], dim=1).reshape(-1, dim)
            self.values = torch.cat([old_v, values], dim=1).reshape(-1, dim)
        else:
            key_parts, value_parts = [], []
            for h, start in enumerate(self.offsets()):
                end = start + self.lengths[h]
                key_parts += [self.keys[start:end], keys[h]]
                value_parts += [self.values[start:end], values[h]]
            self.keys, self.values = torch.cat(key_parts), torch.cat(value_parts)
        self.lengths = [length + n for length in self.lengths]

    def keep(self, rows: list[torch.Tensor]) -> None:
        """Keep rows[h] (indices into head h's segment, in that order) of each
        head; everything else is freed (new, smaller buffers)."""
        index = torch.cat([start + r for start, r in zip(self.offsets(), rows)])
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self.lengths = [int(r.numel()) for r in rows]

    def set_values(self, padded: torch.Tensor) -> None:
        """Replace every head's values from a padded [Hkv, width, D] tensor
        (merging rewrites the values of kept tokens)."""
        self.values = torch.cat([padded[h, :length] for h, length in enumerate(self.lengths)]).to(self.values.dtype)
