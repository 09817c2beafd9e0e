"""Merge-on-evict: fold the values of evicted tokens into kept ones.

Each evicted token j of a head picks a kept target t: `nearest` is the kept
key most cosine-similar to k_j, `top` is the kept token with the highest
weight. The target's value becomes the weighted mean
    v_t <- (w_t v_t + sum_j w_j v_j) / (w_t + sum_j w_j)
with w the policy's `weighted by` score (averaged over observed queries; 1
when absent). Keys are left as they are.
"""
from __future__ import annotations

import torch


def merge_evicted(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor | None, into: str) -> torch.Tensor:
    """New values [Hkv, T, D] (kept slots updated; others untouched)."""
    evicted = valid & ~kept
    if not bool(evicted.any()) or not bool(kept.any()):
        return values
    w = torch.ones(valid.shape) if weights is None else torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights)).clamp(min=0)
    out = values.float().clone()
    for head in range(keys.shape[0]):
        kept_idx = kept[head].nonzero().squeeze(-1)
        gone_idx = evicted[head].nonzero().squeeze(-1)
        if kept_idx.numel() == 0 or gone_idx.numel() == 0:
            continue
        if into == "nearest":
            k_kept = torch.nn.functional.normalize(keys[head, kept_idx].float(), dim=-1)
            k_gone = torch.nn.functional.normalize(keys[head, gone_idx].float(), dim=-1)
            target = kept_idx[(k_gone @ k_kept.T).argmax(dim=-1)]
        else:
            best = kept_idx[w[head, kept_idx].argmax()]
            target = best.expand(gone_idx.numel())
        numerator = out[head] * w[head, :, None]
        denominator = w[head].clone()
        numerator.index_add_(0, target, out[head, gone_idx] * w[head, gone_idx, None])
        denominator.index_add_(0, target, w[head, gone_idx])
        touched = torch.zeros(keys.shape[1], dtype=torch.bool)
        touched[target] = True
        safe = touched & (denominator > 0)
        out[head, safe] = numerator[safe] / denominator[safe, None]
    return out.to(values.dtype)
