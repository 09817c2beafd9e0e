"""Selections: which held tokens each kv head of one layer keeps.

Rules (docs/language.md says the same):
- `first n` / `last n` keep the n valid tokens with the smallest / largest
  logical positions; they are *protected*.
- scored selections choose among the other valid tokens (the candidates);
  scores are averaged over observed queries first.
- top_k: the k best candidates; ties go to the earlier token.
- top_p: candidates in descending score order until the kept mass (protected
  tokens included; mass normalised over all valid tokens) reaches p; at most
  `limit` of them.
- threshold: every candidate whose score passes.
- a union keeps what any part keeps.
"""
from __future__ import annotations

import torch

from kvpolicy import ir

from .evaluate import NEG_INF, Evaluator


def positional(sel, valid: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """[Hkv, T] mask of first/last n valid tokens by logical position."""
    n = sel.count
    if n == 0:
        return torch.zeros_like(valid)
    far = torch.iinfo(torch.long).max
    if isinstance(sel, ir.First):
        order_key = key_pos.masked_fill(~valid, far)
        ranks = order_key.argsort(dim=-1, stable=True).argsort(dim=-1)
    else:
        order_key = (-key_pos).masked_fill(~valid, far)
        ranks = order_key.argsort(dim=-1, stable=True).argsort(dim=-1)
    return (ranks < n) & valid


def _ranked(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Slot indices per head, best candidate first (stable: earlier slot wins ties);
    non-candidates come last."""
    keyed = scores.masked_fill(~candidates, NEG_INF)
    # -inf scores of real candidates must still outrank non-candidates.
    keyed = torch.where(candidates & torch.isneginf(keyed), torch.full_like(keyed, -torch.finfo(torch.float32).max), keyed)
    return torch.sort(keyed, dim=-1, descending=True, stable=True).indices


def top_k(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    order = _ranked(scores, candidates)
    take = torch.zeros_like(candidates)
    counts = candidates.sum(dim=-1).clamp(max=k)
    for head in range(scores.shape[0]):
        take[head, order[head, : int(counts[head])]] = True
    return take


def top_p(scores: torch.Tensor, candidates: torch.Tensor, protected: torch.Tensor, valid: torch.Tensor, p: float, limit: int | None) -> torch.Tensor:
    mass = torch.where(valid & torch.isfinite(scores), scores, torch.zeros_like(scores)).clamp(min=0)
    mass = mass / mass.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    kept_mass = (mass * protected).sum(dim=-1)
    order = _ranked(scores, candidates)
    ordered = torch.gather(mass * candidates, 1, order)
    before = ordered.cumsum(dim=-1) - ordered  # mass kept before adding each candidate
    # A candidate is needed while the mass kept without it is still short of p.
    needed = (kept_mass[:, None] + before) < p - 1e-6
    counts = torch.minimum(needed.sum(dim=-1), candidates.sum(dim=-1))
    if limit is not None:
        counts = counts.clamp(max=limit)
    take = torch.zeros_like(candidates)
    for head in range(scores.shape[0]):
        take[head, order[head, : int(counts[head])]] = True
    return take


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


def select(sel, evaluator: Evaluator, candidates: torch.Tensor, protected: torch.Tensor, count_for) -> torch.Tensor:
    """[Hkv, T] mask of what one scored selection keeps. `count_for(n)` maps a
    written count to this layer's count (by-layer shapes)."""
    valid = evaluator.inputs.valid
    if isinstance(sel, (ir.First, ir.Last)):
        return torch.zeros_like(valid)  # already in `protected`
    if isinstance(sel, ir.SelectUnion):
        out = torch.zeros_like(valid)
        for part in sel.parts:
            out |= select(part, evaluator, candidates, protected, count_for)
        return out
    scores = evaluator.token_scores(sel.score)
    if isinstance(sel, ir.TopK):
        return top_k(scores, candidates, count_for(sel.count))
    if isinstance(sel, ir.TopP):
        limit = count_for(sel.limit) if sel.limit is not None else None
        return top_p(scores, candidates, protected, valid, sel.p, limit)
    return threshold(scores, candidates, sel.operator, sel.value)


def positional_parts(sel) -> list:
    if isinstance(sel, (ir.First, ir.Last)):
        return [sel]
    if isinstance(sel, ir.SelectUnion):
        return [p for part in sel.parts for p in positional_parts(part)]
    return []
