"""A cache layer whose slots are held in the element type of their tier (`store`).

The slot axis of a StoredLayer is cut into parts, one per store the cascade
uses: the int8/int4/fp16/bf16 parts first (stores of later tiers, which hold
older tokens, leading), the native part last, where update() appends new
tokens. Valid/positions/states/tiers stay aligned with that whole axis, as in
PolicyLayer, so the policy engine and the attention function see one
[Hkv, P] layout and never know how a slot is stored.

Attention reads K/V dequantized for the current forward (attention_groups)
and dropped after it: keeping the float copy would hold the bytes quantization saved. A
compression moves slots between parts. Tokens arriving in an integer store
are quantized as a new chunk; the chunks already there stay as they are (no
re-quantization error), unless the event dropped or rewrote some of their
tokens, in which case that store is re-quantized from its dequantized values.
"""
from __future__ import annotations

import torch

from .layer import PolicyLayer
from .quantized import BITS, Quantized, dequantize, quantize_keys, quantize_values

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


class QuantizedStore:
    """The slots of an int8/int4 store: chunks quantized when their tokens arrived
    (keys per channel, values per token, see quantized.py)."""

    def __init__(self, bits: int):
        self.bits = bits
        self.chunks: list[tuple[Quantized, Quantized]] = []

    @property
    def length(self) -> int:
        return sum(keys.shape[1] for keys, _ in self.chunks)

    def append(self, keys: torch.Tensor, values: torch.Tensor, held: torch.Tensor) -> None:
        """Add slots: keys/values [Hkv, L, D]; held [Hkv, L] marks the slots with data."""
        self.chunks.append((quantize_keys(keys, self.bits, held), quantize_values(values, self.bits)))

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat([dequantize(k, dtype) for k, _ in self.chunks], dim=1)
        values = torch.cat([dequantize(v, dtype) for _, v in self.chunks], dim=1)
        return keys, values

    def clear(self) -> None:
        self.chunks = []

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.chunks)


class HalfStore:
    """The slots of an fp16/bf16 store: held in that dtype, upcast on read."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.keys: torch.Tensor | None = None  # [Hkv, L, D]
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    def append(self, keys: torch.Tensor, values: torch.Tensor, held: torch.Tensor) -> None:
        keys, values = keys.to(self.dtype), values.to(self.dtype)
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], dim=1), torch.cat([self.values, values], dim=1)
        self.keys, self.values = keys, values

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.to(dtype), self.values.to(dtype)

    def clear(self) -> None:
        self.keys = self.values = None

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def new_store(store: str):
    return QuantizedStore(BITS[store]) if store in BITS else HalfStore(HALF[store])


class StoredLayer(PolicyLayer):
    """A PolicyLayer for cascades with tiers stored other than natively.
    self.keys/self.values [1, Hkv, L, D] hold the native part (the last one)."""

    def __init__(self, num_kv_heads: int, state_names: list[str], tier_stores: list[str]):
        super().__init__(num_kv_heads, state_names, cascade=True)
        order: list[str] = []
        for store in reversed(tier_stores):  # later tiers hold older tokens: first on the axis
            if store != "native" and store not in order:
                order.append(store)
        self.stores = [new_store(store) for store in order]
        native = len(order)  # part index of self.keys / self.values
        self.part_of_tier = torch.tensor([native if s == "native" else order.index(s) for s in tier_stores])

    # ------------------------------------------------------------- reading

    def native_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0

    def held_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [1, Hkv, P, D] of every slot, dequantized for this forward only."""
        parts = [store.read(self.dtype) for store in self.stores if store.length]
        if not parts:
            return self.keys, self.values
        keys = torch.cat([k for k, _ in parts] + [self.keys[0]], dim=1)
        values = torch.cat([v for _, v in parts] + [self.values[0]], dim=1)
        return keys[None], values[None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        super().update(key_states, value_states)  # new tokens join the native part
        return key_states, value_states  # attention reads attention_groups(), not this

    def padded_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.held_kv()
        return keys[0], values[0]

    def attention_groups(self):
        """Every slot, dequantized once per forward (see PolicyLayer.attention_groups)."""
        keys, values = self.held_kv()
        return [(slice(0, self.num_kv_heads), keys, values)]

    def nbytes(self) -> int:
        native = self.keys.nbytes + self.values.nbytes if self.native_length() else 0
        return native + sum(store.nbytes() for store in self.stores)

    # ------------------------------------------------------------- compression

    def apply(self, kept: torch.Tensor, physical: bool, values: torch.Tensor | None, tiers: torch.Tensor | None) -> None:
        """Keep `kept` [Hkv, P] and move every slot to the part of its (new)
        tier. Compaction (physical) drops what is not kept; a mask layout keeps
        dropped tokens as holes, and only padding (position -1) goes."""
        all_keys, all_values = self.padded_kv()
        if values is not None:
            all_values = values.to(all_values.dtype)
        tiers = self.tiers if tiers is None else tiers
        kept = kept & self.valid
        stays = kept if physical else self.positions >= 0
        target = self.part_of_tier[tiers]
        lengths = [store.length for store in self.stores] + [self.native_length()]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]

        orders, helds = [], []  # per part: slots gathered into it [Hkv, L], which of them hold data
        for index, (start, length) in enumerate(zip(starts, lengths)):
            chosen = stays & (target == index)
            arriving = chosen.clone()
            arriving[:, start : start + length] = False
            # Slots already in this part first, then arrivals in slot order:
            # the chunks quantized earlier stay a prefix of the part.
            rank = (~chosen).to(torch.int8) * 2 + arriving.to(torch.int8)
            counts = chosen.sum(dim=1)
            size = int(counts.max()) if counts.numel() else 0
            order = torch.sort(rank, dim=1, stable=True).indices[:, :size]
            held = torch.arange(size)[None, :] < counts[:, None]
            orders.append(order)
            helds.append(held)
            if index < len(self.stores):
                unchanged = values is None and bool(chosen[:, start : start + length].all())
                _refill(self.stores[index], all_keys, all_values, order, held, reuse=length if unchanged else 0)

        self.keys = _gather_slots(all_keys, orders[-1])[None]
        self.values = _gather_slots(all_values, orders[-1])[None]
        order, held = torch.cat(orders, dim=1), torch.cat(helds, dim=1)
        self.valid = torch.gather(kept, 1, order) & held
        self.positions = torch.gather(self.positions, 1, order).masked_fill(~held, -1)
        self.states = {name: torch.gather(s, 1, order).masked_fill(~held, 0.0) for name, s in self.states.items()}
        self.tiers = torch.gather(tiers, 1, order)


def _refill(store, keys: torch.Tensor, values: torch.Tensor, order: torch.Tensor, held: torch.Tensor, reuse: int) -> None:
    """Make `store` hold the slots `order` [Hkv, L] of keys/values [Hkv, P, D];
    its first `reuse` slots are already there unchanged, so only the rest are encoded."""
    if not reuse:
        store.clear()
    arrivals = order[:, reuse:]
    if arrivals.shape[1]:
        store.append(_gather_slots(keys, arrivals), _gather_slots(values, arrivals), held[:, reuse:])


def _gather_slots(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x [Hkv, P, D] at slots order [Hkv, L] -> [Hkv, L, D]."""
    return torch.gather(x, 1, order[:, :, None].expand(-1, -1, x.shape[-1])).contiguous()
