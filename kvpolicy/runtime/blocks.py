"""The per-head block rule: how per-(layer, kv_head) selections become one
physical length per sequence, as a paged engine with one block table per
sequence (vLLM's CPU attention) must store them.

Rule, for a sequence of `logical` tokens that physically holds the last
`physical` of its logical slots (`logical - physical` is a whole number of
blocks already dropped from the front):

1. need = the largest selection over every (layer, kv_head): layers that are
   not compressed at this event need all the slots they hold.
2. Whole leading blocks are dropped while what is left still has room for
   `need`: dropped = max(already dropped, (logical - need) // block_size)
   blocks, and the new physical length is logical - dropped * block_size,
   so need <= physical < need + block_size (never more than it was).
3. Every (layer, kv_head) then holds exactly that many tokens: its own
   selection, and the slack filled with its most recent tokens it did not
   select (recent tokens are the ones already in place at the tail, so the
   fill costs no copy in a tail-aligned engine, and it is a policy-free
   choice both engines can make alike).

Both engines apply this same function, so a policy keeps the same token sets
in vLLM and in the HF engine given the same `block_size`.
"""
from __future__ import annotations

import torch


def physical_length(need: int, logical: int, physical: int, block_size: int) -> int:
    """The physical length after an event whose largest selection is `need`."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not 0 <= need <= physical <= logical:
        raise ValueError(f"need {need} <= physical {physical} <= logical {logical} does not hold")
    dropped = (logical - physical) // block_size
    dropped = max(dropped, (logical - need) // block_size)
    return logical - dropped * block_size


def fill_to(kept: torch.Tensor, key_pos: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """[Hkv, T] bool: `kept` grown to `count` slots per head with the head's
    most recent valid slots it did not keep (a head with fewer valid slots
    keeps all of them)."""
    kept = kept & valid
    order = torch.where(valid & ~kept, key_pos, torch.full_like(key_pos, -1))  # candidates by recency
    missing = (count - kept.sum(dim=1)).clamp(min=0)  # [Hkv]
    if int(missing.max()) == 0:
        return kept
    ranked = torch.argsort(order, dim=1, descending=True, stable=True)  # most recent first
    take = torch.arange(kept.shape[1])[None, :] < missing[:, None]
    take &= torch.gather(order, 1, ranked) >= 0
    grown = kept.clone()
    grown.scatter_(1, ranked, take | torch.gather(kept, 1, ranked))
    return grown


def apply(kept: list[torch.Tensor], key_pos: list[torch.Tensor], valid: list[torch.Tensor],
          logical: int, physical: int, block_size: int) -> tuple[list[torch.Tensor], int]:
    """The rule on every layer of one sequence: (kept [Hkv, T] per layer after
    the fill, new physical length). Layers that are not compressed pass
    kept == valid. When no whole block can go, everything is kept."""
    need = max(int(k.sum(dim=1).max()) for k in kept) if kept else 0
    new_physical = physical_length(need, logical, physical, block_size)
    if new_physical == physical:
        return [v.clone() for v in valid], physical
    return [fill_to(k, p, v, new_physical) for k, p, v in zip(kept, key_pos, valid)], new_physical
