"""The attention function the HF engine installs ("kvpolicy").

It does three things per layer and forward, then attends:
- records the new queries (after RoPE) in the policy's observation window;
- accumulates per-token states (e.g. H2O) from the new queries' attention;
- masks what the cache's layout requires: holes of shorter heads, and
  causality by logical position (physical order is not logical order after
  compaction).
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

    pristine = bool(layer.valid.all()) and layer.physical == layer.logical
    needs_probs = bool(engine.ir.states)
    if pristine and not needs_probs:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    group = query.shape[1] // key.shape[1]
    visible = layer.valid[:, None, :] & (layer.positions[:, None, :] <= query_pos[None, :, None])  # [Hkv, n, P]
    visible = visible.repeat_interleave(group, dim=0)[None]  # [1, Hq, n, P]
    keys = key.repeat_interleave(group, dim=1)
    values = value.repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if needs_probs:
        logits = torch.matmul(query, keys.transpose(2, 3)) * scale
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")).float(), dim=-1).nan_to_num(0.0)
        layer.states = engine.accumulate(probs[0], layer.states, layer.valid)
        output = torch.matmul(probs.to(values.dtype), values)
    else:
        output = F.scaled_dot_product_attention(query, keys, values, attn_mask=visible, scale=scale)
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make "kvpolicy" an attention implementation transformers can select."""
    AttentionInterface.register(NAME, policy_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
