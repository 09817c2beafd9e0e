"""Integer KV codes: asymmetric min/max quantization in groups (KIVI-style).

A tensor is cut into groups of GROUP_SIZE consecutive entries along one
dimension; each group stores its minimum (zero point) and step (scale) and
every entry one code in [0, 2^bits - 1]:

    scale = (max - min) / (2^bits - 1)
    code  = round((x - min) / scale)          x' = code * scale + min

so |x - x'| <= scale / 2. KIVI quantizes keys per channel (groups run along
the token axis: outlier channels get their own range) and values per token
(groups run along the channel axis). int4 codes are packed two per byte, so
the bytes held really halve against int8. Scales and zero points are kept in
float32 so the bound above holds as written; at GROUP_SIZE 32 they cost
2 * 4 / 32 = 0.25 bytes per entry (float16 would halve that, at the price of
rounding the zero point).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_SIZE = 32  # KIVI's group size; a head_dim of 64 or 128 splits into whole value groups
SCALE_DTYPE = torch.float32
BITS = {"int8": 8, "int4": 4}


@dataclass
class Quantized:
    """Codes of one tensor, grouped along `dim`. scale/zero have the tensor's
    shape with `dim` moved last and cut into groups: [..., ceil(n / group)]."""

    codes: torch.Tensor  # uint8, the tensor's shape; int4: last dim packed to ceil(d / 2)
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    dim: int
    group: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes


def quantize(x: torch.Tensor, bits: int, dim: int, group: int = GROUP_SIZE, held: torch.Tensor | None = None) -> Quantized:
    """Quantize x in groups of `group` consecutive entries along `dim`.
    `held` (broadcastable to x) marks the entries that carry data: holes are
    left out of the min/max so padding does not widen a group's range."""
    dim = dim % x.dim()
    levels = 2**bits - 1
    moved = x.movedim(dim, -1).to(SCALE_DTYPE)  # [..., n]
    n = moved.shape[-1]
    mask = torch.ones_like(moved, dtype=torch.bool) if held is None else held.expand_as(x).movedim(dim, -1)
    pad = (-n) % group
    grouped = F.pad(moved, (0, pad)).unflatten(-1, (-1, group))  # [..., groups, group]
    in_group = F.pad(mask, (0, pad), value=False).unflatten(-1, (-1, group))
    lo = grouped.masked_fill(~in_group, float("inf")).amin(dim=-1)
    hi = grouped.masked_fill(~in_group, float("-inf")).amax(dim=-1)
    empty = ~in_group.any(dim=-1)
    lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    scale = (hi - lo) / levels
    steps = (grouped - lo[..., None]) / torch.where(scale > 0, scale, 1.0)[..., None]
    codes = steps.round().clamp(0, levels).to(torch.uint8)
    codes = codes.flatten(-2)[..., :n].movedim(-1, dim).contiguous()
    if bits == 4:
        codes = pack_int4(codes)
    return Quantized(codes=codes, scale=scale, zero=lo, bits=bits, dim=dim, group=group, shape=tuple(x.shape))


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """The tensor q encodes, in `dtype`. Codes are cut into [groups, group]
    along q.dim and scaled by broadcasting (no scale tensor the size of x)."""
    codes = unpack_int4(q.codes, q.shape[-1]) if q.bits == 4 else q.codes
    n, groups = q.shape[q.dim], q.scale.shape[-1]
    x = codes.to(SCALE_DTYPE)
    pad = groups * q.group - n  # the last group of a chunk may be partial
    if pad:
        x = F.pad(x, [0, 0] * (x.dim() - 1 - q.dim) + [0, pad])
    x = x.unflatten(q.dim, (groups, q.group))
    scale = q.scale.movedim(-1, q.dim).unsqueeze(q.dim + 1)
    zero = q.zero.movedim(-1, q.dim).unsqueeze(q.dim + 1)
    return (x * scale + zero).flatten(q.dim, q.dim + 1).narrow(q.dim, 0, n).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim: even index in the low nibble."""
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of pack_int4: the first `size` codes of the last dim."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
    return codes[..., :size]


def quantize_keys(keys: torch.Tensor, bits: int, held: torch.Tensor | None = None) -> Quantized:
    """Keys [Hkv, T, D] per channel: groups of GROUP_SIZE tokens; held [Hkv, T]."""
    return quantize(keys, bits, dim=1, held=None if held is None else held[:, :, None])


def quantize_values(values: torch.Tensor, bits: int) -> Quantized:
    """Values [Hkv, T, D] per token: groups of GROUP_SIZE channels."""
    return quantize(values, bits, dim=2)
