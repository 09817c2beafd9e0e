"""The attention function the HF engine installs ("kvpolicy").

It does three things per layer and forward, then attends:
- records the new queries (after RoPE) in the policy's observation window;
- accumulates per-token states (e.g. H2O) from the new queries' attention;
- masks what the cache's layout requires: holes of shorter heads, and
  causality by logical position (physical order is not logical order after
  compaction). Under flatten_sum, heads holding different counts are
  attended one at a time, each over its own segment.
While a layer is still uncompacted (every slot valid, slot i holding position
i) it calls transformers' own SDPA attention unchanged, so a policy that never
compresses produces exactly the tokens of plain `model.generate`.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "kvpolicy"
_active_cache: contextvars.ContextVar = contextvars.ContextVar("kvpolicy_cache", default=None)


@contextlib.contextmanager
def active(cache):
    token = _active_cache.set(cache)
    try:
        yield cache
    finally:
        _active_cache.reset(token)


def policy_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    cache = _active_cache.get()
    if cache is None:  # the model used outside kvpolicy.hf.generate
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer_index = module.layer_idx
    layer = cache.layers[layer_index]
    engine, run = cache.engine, cache.run
    n = query.shape[2]
    query_pos = torch.arange(layer.logical - n, layer.logical)
    engine.observe(run, layer_index, query[0], query_pos)

    groups = layer.attention_groups()
    pristine = bool(layer.valid.all()) and layer.physical == layer.logical
    needs_probs = bool(engine.ir.states)
    if pristine and not needs_probs:  # every head holds every token: one group
        (_, keys, values), = groups
        return sdpa_attention_forward(module, query, keys, values, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    group = query.shape[1] // layer.num_kv_heads
    visible = layer.valid[:, None, :] & (layer.positions[:, None, :] <= query_pos[None, :, None])  # [Hkv, n, P]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if needs_probs:
        output = _attend_accumulating(query, groups, visible, group, scale, layer, engine)
    else:
        outputs = []
        for heads, keys, values in groups:  # keys [1, h, L, D]: slots 0..L-1 of these heads
            q = query[:, heads.start * group : heads.stop * group]
            seen = visible[heads, :, : keys.shape[2]].repeat_interleave(group, dim=0)[None]  # [1, h*G, n, L]
            # enable_gqa reads each kv head once (no repeated copies), with the same result.
            outputs.append(F.scaled_dot_product_attention(q, keys, values, attn_mask=seen, scale=scale, enable_gqa=True))
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return output.transpose(1, 2).contiguous(), None


QUERY_CHUNK = 256  # query rows attended at once when states need the probabilities


def _attend_accumulating(query, groups, visible, group: int, scale: float, layer, engine) -> torch.Tensor:
    """Attention that materialises the probabilities, to accumulate the
    policy's states from them. Query rows go in chunks: a 4k-token prefill
    would otherwise hold [heads, 4k, 4k] probabilities at once. States
    accumulate row by row in order, so chunking does not change them."""
    chunks = []
    for start in range(0, query.shape[2], QUERY_CHUNK):
        rows = slice(start, start + QUERY_CHUNK)
        outputs, all_probs = [], []
        for heads, keys, values in groups:  # keys [1, h, L, D]: slots 0..L-1 of these heads
            seen = visible[heads, rows, : keys.shape[2]]
            # Slots past the last one these rows may see (the prompt's future,
            # in a prefill) are left out: half the work of a causal prefill.
            length = int(seen.any(dim=1).any(dim=0).nonzero().max()) + 1 if bool(seen.any()) else 1
            seen = seen[:, :, :length].repeat_interleave(group, dim=0)[None]  # [1, h*G, rows, L]
            q = query[:, heads.start * group : heads.stop * group, rows]
            # One matmul per query head, as always: a grouped matmul rounds
            # differently, which could change what a state-based policy keeps.
            keys = keys[:, :, :length].repeat_interleave(group, dim=1)
            values = values[:, :, :length].repeat_interleave(group, dim=1)
            logits = torch.matmul(q, keys.transpose(2, 3)) * scale
            probs = torch.softmax(logits.masked_fill(~seen, float("-inf")).float(), dim=-1).nan_to_num(0.0)
            all_probs.append(probs)
            outputs.append(torch.matmul(probs.to(values.dtype), values))
        if len(all_probs) > 1:  # heads of different lengths: onto the slots any of them sees
            width = max(probs.shape[-1] for probs in all_probs)
            all_probs = [torch.cat([F.pad(probs, (0, width - probs.shape[-1])) for probs in all_probs], dim=1)]
        layer.states = engine.accumulate(all_probs[0][0], layer.states, layer.valid)
        chunks.append(outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)


def register() -> None:
    """Make "kvpolicy" an attention implementation transformers can select."""
    AttentionInterface.register(NAME, policy_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def install(model) -> None:
    """Register "kvpolicy" and make `model` attend through it."""
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
