"""Signals: the quantities a policy reads from one layer's cache and queries.

All functions take one layer of one sequence in physical slot order:
    keys, values   [Hkv, T, D]   (keys after RoPE, as cached)
    valid          [Hkv, T] bool (holes and dropped slots are False)
    key_pos        [Hkv, T] long logical position of each slot
    queries        [Hq, Q, D]    the observed query window (after RoPE)
    query_pos      [Q] long      logical positions of those queries
and return [Hkv, Q, T] (query-dependent) or [Hkv, 1, T] tensors in float32.
Query heads map onto kv heads in contiguous groups (GQA): q head h reads kv
head h // (Hq / Hkv), as in HF transformers and vLLM.
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def query_logits(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """q.k / sqrt(d) per query head [Hq, Q, T]; a query sees the valid keys at
    or before its own position (causal), the rest are -inf."""
    num_q, num_kv = queries.shape[0], keys.shape[0]
    group = num_q // num_kv
    keys_per_q = keys.float().repeat_interleave(group, dim=0)  # [Hq, T, D]
    logits = torch.matmul(queries.float(), keys_per_q.transpose(1, 2)) / math.sqrt(queries.shape[-1])
    visible = valid[:, None, :] & (key_pos[:, None, :] <= query_pos[None, :, None])  # [Hkv, Q, T]
    visible = visible.repeat_interleave(group, dim=0)
    return logits.masked_fill(~visible, NEG_INF)


def sum_over(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """x.sum(dim) rounded the same way at every token position. torch's sum
    over an outer axis rounds differently at different positions of the inner
    (token) axis, so exactly tied tokens would come out unequal and the
    "ties go to the earlier token" rule would be decided by float noise;
    summing a contiguous innermost axis rounds every token alike."""
    out = x.movedim(dim, -1).contiguous().sum(dim=-1)
    return out.unsqueeze(dim) if keepdim else out


def reduce_group(per_q_head: torch.Tensor, num_kv: int, how: str) -> torch.Tensor:
    """[Hq, Q, T] -> [Hkv, Q, T] over each kv head's group of query heads."""
    num_q, q, t = per_q_head.shape
    grouped = per_q_head.reshape(num_kv, num_q // num_kv, q, t)
    if how == "max":
        return grouped.amax(dim=1)
    # Head by head: a few elementwise adds round every token alike (as
    # sum_over does) without moving the group axis innermost first.
    total = grouped[:, 0]
    for head in range(1, grouped.shape[1]):
        total = total + grouped[:, head]
    return total / grouped.shape[1] if how == "mean" else total


def reduce_queries(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "none":
        return x
    if how == "mean":
        return sum_over(x, 1, keepdim=True) / x.shape[1]
    if how == "sum":
        return sum_over(x, 1, keepdim=True)
    return x.amax(dim=1, keepdim=True)


def attn(logits: torch.Tensor, num_kv: int, group: str, queries: str) -> torch.Tensor:
    """Attention probabilities (softmax per query head and query row)."""
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return reduce_queries(reduce_group(probs, num_kv, group), queries)


def attn_logits(logits: torch.Tensor, num_kv: int, group: str, queries: str) -> torch.Tensor:
    if group == "max":
        reduced = reduce_group(logits, num_kv, "max")
    else:  # mean / sum of logits over the group; masked entries stay -inf
        reduced = reduce_group(logits.masked_fill(logits == NEG_INF, 0.0), num_kv, group)
        reduced = reduced.masked_fill(reduce_group(logits, num_kv, "max") == NEG_INF, NEG_INF)
    return reduce_queries(reduced, queries)


def key_norm(keys: torch.Tensor) -> torch.Tensor:
    return keys.float().norm(dim=-1)[:, None, :]


def value_norm(values: torch.Tensor) -> torch.Tensor:
    return values.float().norm(dim=-1)[:, None, :]


def key_sim(keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each key to the anchor: the mean of the head's valid
    keys after L2 normalisation (KeyDiff, as the paper and kvpress define it)."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    weights = valid.float()[..., None]
    anchor = (unit * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1)
    anchor = torch.nn.functional.normalize(anchor, dim=-1)
    # An innermost-axis dot product rounds every token alike, so equal keys tie exactly.
    return (unit * anchor).sum(dim=-1)[:, None, :]


REDUNDANCY_ROWS = 256  # keys compared with all others at once: blocks that stay in cache (2x faster at 4k than one 4k x 4k)


def redundancy(keys: torch.Tensor, valid: torch.Tensor, key_pos: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV redundancy per token: a softmax over tokens of each key's mean
    cosine similarity to the other keys. Pairs below `threshold` count 0; a
    token with a similar (>= threshold) later token is a duplicate, and the
    most recent of a group (no similar later token) counts 0, so it is spared."""
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    slots = torch.arange(k.shape[1])
    count = valid.float().sum(dim=-1, keepdim=True).clamp(min=1)
    mean_sim = torch.zeros(valid.shape)
    for start in range(0, k.shape[1], REDUNDANCY_ROWS):
        rows = slice(start, start + REDUNDANCY_ROWS)
        sim = torch.matmul(k[:, rows], k.transpose(1, 2))  # [Hkv, rows, T]
        pair_ok = valid[:, rows, None] & valid[:, None, :] & (slots[rows, None] != slots[None, :])[None]
        sim.masked_fill_(~(pair_ok & (sim >= threshold)), 0.0)
        later = key_pos[:, None, :] > key_pos[:, rows, None]  # [h, i, j]: j comes after i
        has_later_duplicate = ((sim > 0) & later).any(dim=-1)
        block = sim.sum(dim=-1) / count
        mean_sim[:, rows] = torch.where(has_later_duplicate, block, torch.zeros_like(block))
    scores = torch.softmax(mean_sim.masked_fill(~valid, NEG_INF), dim=-1).nan_to_num(0.0)
    return scores[:, None, :]
