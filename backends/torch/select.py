"""Selections: which held tokens each kv head of one layer keeps.

Rules (docs/language.md says the same):
- `first n` / `last n` keep the n valid tokens with the smallest / largest
  logical positions; they are *protected*.
- scored selections choose among the other valid tokens (the candidates);
  scores are averaged over observed queries first.
- top_k: the k best candidates; ties go to the earlier token.
- top_p: candidates in descending score order until the kept mass (protected
  tokens included; mass normalised over all valid tokens) reaches p; at most
  `limit` of them, at least `floor` (of the candidates there are).
- threshold: every candidate whose score passes.
- a union keeps what any part keeps.
"""
from __future__ import annotations

import torch

from .evaluate import NEG_INF, Evaluator


def positional(sel, valid: torch.Tensor, key_pos: torch.Tensor, layer: int) -> torch.Tensor:
    """[Hkv, T] mask of first/last n valid tokens by logical position (`sel`: a program Select)."""
    n = sel.count(layer)
    first = sel.op == "first"
    if n == 0:
        return torch.zeros_like(valid)
    if bool(valid.all()) and bool((key_pos[:, 1:] > key_pos[:, :-1]).all()):
        # Slots already in logical order (the usual case): ranks are slot indices.
        slots = torch.arange(valid.shape[-1])
        ranks = slots if first else valid.shape[-1] - 1 - slots
        return (ranks < n).expand_as(valid).clone()
    far = torch.iinfo(torch.long).max
    if first:
        order_key = key_pos.masked_fill(~valid, far)
        ranks = order_key.argsort(dim=-1, stable=True).argsort(dim=-1)
    else:
        order_key = (-key_pos).masked_fill(~valid, far)
        ranks = order_key.argsort(dim=-1, stable=True).argsort(dim=-1)
    return (ranks < n) & valid


def _keyed(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Scores ready for ranking: non-candidates -inf, below every candidate."""
    keyed = scores.masked_fill(~candidates, NEG_INF)
    # -inf scores of real candidates must still outrank non-candidates.
    return torch.where(candidates & torch.isneginf(keyed), torch.full_like(keyed, -torch.finfo(torch.float32).max), keyed)


def _ranked(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Slot indices per head, best candidate first (stable: earlier slot wins ties);
    non-candidates come last."""
    return torch.sort(_keyed(scores, candidates), dim=-1, descending=True, stable=True).indices


def top_k(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The first min(k, candidates) slots of each head's `_ranked` order,
    found without sorting every score (decode-time eviction runs this at
    every step, over every layer's heads): all candidates above the k-th
    best value, then the earliest of those equal to it."""
    counts = candidates.sum(dim=-1).clamp(max=k)
    top = int(counts.max()) if counts.numel() else 0
    if top == 0:
        return torch.zeros_like(candidates)
    keyed = _keyed(scores, candidates)
    if bool(torch.isnan(keyed).any()):  # NaN has no place in a threshold: rank fully
        return _first_of(torch.sort(keyed, dim=-1, descending=True, stable=True).indices, counts)
    left_out = candidates.sum(dim=-1) - counts
    if int(left_out.max()) < top:  # fewer to leave out than to take: the k-th best from below
        ascending = torch.topk(keyed.masked_fill(~candidates, float("inf")), int(left_out.max()) + 1, dim=-1, largest=False).values
        kth = ascending.gather(1, left_out[:, None])
    else:
        kth = torch.topk(keyed, top, dim=-1).values.gather(1, (counts - 1).clamp(min=0)[:, None])
    above = (keyed > kth) & candidates
    ties = (keyed == kth) & candidates
    room = counts[:, None] - above.sum(dim=-1, keepdim=True)
    return (above | (ties & (ties.cumsum(dim=-1) <= room))) & (counts[:, None] > 0)


def _first_of(order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[Hkv, T] mask of the first counts[h] slots of each head's ranking."""
    taken = torch.arange(order.shape[-1])[None, :] < counts[:, None]
    return torch.zeros(order.shape, dtype=torch.bool).scatter_(1, order, taken)


def top_p(scores: torch.Tensor, candidates: torch.Tensor, protected: torch.Tensor, valid: torch.Tensor, p: float, limit: int | None,
          floor: int | None = None) -> torch.Tensor:
    mass = torch.where(valid & torch.isfinite(scores), scores, torch.zeros_like(scores)).clamp(min=0)
    mass = mass / mass.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    kept_mass = (mass * protected).sum(dim=-1)
    order = _ranked(scores, candidates)
    ordered = torch.gather(mass * candidates, 1, order)
    before = ordered.cumsum(dim=-1) - ordered  # mass kept before adding each candidate
    # A candidate is needed while the mass kept without it is still short of p.
    needed = (kept_mass[:, None] + before) < p - 1e-6
    counts = needed.sum(dim=-1)
    if floor is not None:
        counts = counts.clamp(min=floor)  # Ada-KV's safeguard: a peaked head still keeps `floor`
    counts = torch.minimum(counts, candidates.sum(dim=-1))
    if limit is not None:
        counts = counts.clamp(max=limit)
    return _first_of(order, counts)


def threshold(scores: torch.Tensor, candidates: torch.Tensor, op: str, value: float) -> torch.Tensor:
    passed = {">": scores > value, ">=": scores >= value, "<": scores < value, "<=": scores <= value}[op]
    return passed & candidates


def per_layer_top_k(scores: torch.Tensor, candidates: torch.Tensor, k: int, floor: float | None) -> torch.Tensor:
    """Ada-KV: the layer's heads share k x heads tokens; each first gets its
    best floor x k (kvpress's alpha_safeguard), the rest go to the best scores
    of the whole layer."""
    heads = scores.shape[0]
    total = min(k * heads, int(candidates.sum()))
    safe = int(k * floor) if floor else 0
    keyed = scores.masked_fill(~candidates, NEG_INF).clone()
    if safe > 0:
        forced = top_k(scores, candidates, safe)
        keyed = keyed.masked_fill(forced, float("inf"))
    flat = keyed.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:total]
    take = torch.zeros(flat.shape, dtype=torch.bool)
    take[order] = True
    return take.reshape(scores.shape) & candidates


def union_over(table: dict):
    """A union's implementation over one backend's selection table: each part
    selects from the same candidates, the masks are or-ed."""

    def union(sel, scores, candidates, protected, layer):
        out = torch.zeros_like(scores.inputs.valid)
        for part in sel.parts:
            out |= table[part.op](part, scores, candidates, protected, layer)
        return out

    return union


def _top_p(sel, scores, candidates, protected, layer):
    floors = sel.attrs.get("floors")
    floor = floors[layer] if floors else None
    return top_p(scores.token_scores(sel.score), candidates, protected, scores.inputs.valid, sel.attrs["p"], sel.count(layer), floor)


# One implementation per selection of kvpolicy.ops.OPS: (Select step, scores,
# candidates, protected, layer) -> [Hkv, T] mask, where `scores` is the event's
# Evaluator (token_scores(node), inputs). first/last keep nothing here: their
# tokens are already in `protected`.
SELECTIONS = {
    "first": lambda sel, ev, candidates, protected, layer: torch.zeros_like(ev.inputs.valid),
    "last": lambda sel, ev, candidates, protected, layer: torch.zeros_like(ev.inputs.valid),
    "top_k": lambda sel, ev, candidates, protected, layer: top_k(ev.token_scores(sel.score), candidates, sel.count(layer)),
    "top_p": _top_p,
    "threshold": lambda sel, ev, candidates, protected, layer: threshold(ev.token_scores(sel.score), candidates, sel.attrs["operator"], sel.attrs["value"]),
}
SELECTIONS["union"] = union_over(SELECTIONS)
