"""What a policy holds after its first compression of one prompt, per
(layer, kv_head), read from the HF engine's cache (for `kvpolicy explain
--prompt`).

The prompt is prefilled once with the full cache (prefill.py) and every
policy that can fork from it compresses a copy; a policy that accumulates
state during the prefill runs its own. What is reported is what the cache
holds: a slot counts when it is valid and holds a logical position, and its
tier is the one the cache records.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy import ir
from kvpolicy.program import selection_leaves

from . import attention
from .cache import PolicyCache
from .decoding import prepare
from .prefill import prefill


@dataclass
class Held:
    """One policy's cache right after the prefill compression."""

    name: str
    content_hash: str
    positions: list[list[list[int]]]  # [layer][kv_head] held logical positions, ascending
    tiers: list[list[list[int]]] | None  # same shape: the tier index of each held position (cascades only)
    tier_names: list[str]
    protected_first: int  # the `keep ... = first n` span (0: none)
    protected_last: int  # the `keep ... = last n` span (0: none)
    kv_bytes: int
    kv_bytes_full: int
    compressions: int  # layer compressions the prefill ran (0: none fired, e.g. a prompt below a `when` guard)
    compresses: bool  # whether the policy compresses at all (`full` does not)

    @property
    def counts(self) -> list[list[int]]:
        return [[len(head) for head in layer] for layer in self.positions]

    def to_json(self) -> dict:
        return {
            "policy": self.name,
            "hash": self.content_hash,
            "compresses": self.compresses,
            "compressed": self.compressions > 0,
            "layers": len(self.positions),
            "kv_heads": len(self.positions[0]) if self.positions else 0,
            "kv_bytes": self.kv_bytes,
            "kv_bytes_full": self.kv_bytes_full,
            "protected": {"first": self.protected_first, "last": self.protected_last},
            "tiers": self.tier_names,
            "kept": self.counts,
            "positions": self.positions,
            "position_tiers": self.tiers,
        }


def protected_spans(policy: ir.Policy) -> tuple[int, int]:
    """(first n, last n) that the policy's positional keeps protect."""
    leaves = [leaf for keep in policy.keeps for leaf in selection_leaves(keep.select)]
    first = max((leaf.count for leaf in leaves if isinstance(leaf, ir.First)), default=0)
    last = max((leaf.count for leaf in leaves if isinstance(leaf, ir.Last)), default=0)
    return first, last


def read_held(cache: PolicyCache, policy: ir.Policy) -> Held:
    """The held positions (and tiers) of every (layer, kv_head) of `cache`."""
    cache.settle()
    positions, tiers = [], [] if policy.cascade else None
    for layer in cache.layers:
        held = layer.valid & (layer.positions >= 0)
        layer_positions, layer_tiers = [], []
        for h in range(layer.num_kv_heads):
            pos = layer.positions[h][held[h]]
            order = torch.argsort(pos)  # physical order need not be logical (cascade parts)
            layer_positions.append(pos[order].tolist())
            if tiers is not None:
                layer_tiers.append(layer.tiers[h][held[h]][order].tolist())
        positions.append(layer_positions)
        if tiers is not None:
            tiers.append(layer_tiers)
    first, last = protected_spans(policy)
    return Held(
        name=policy.name,
        content_hash=policy.content_hash,
        positions=positions,
        tiers=tiers,
        tier_names=[tier.name for tier in policy.cascade],
        protected_first=first,
        protected_last=last,
        kv_bytes=cache.kv_bytes(),
        kv_bytes_full=cache.kv_bytes_full(),
        compressions=cache.compressions,
        compresses=policy.compresses,
    )


@torch.inference_mode()
def held_after_prefill(model, prompt_ids: torch.Tensor, policies: list) -> list[Held]:
    """Prefill `prompt_ids` [1, n] under each policy (kvpolicy.Policy or IR) and read what it holds."""
    engines = [prepare(model, policy) for policy in policies]
    window = max((engine.plan.observe_window for engine in engines), default=0)
    shared = prefill(model, prompt_ids, window=max(window, 1)) if len(engines) > 1 else None
    out = []
    for engine in engines:
        if shared is not None and shared.can_fork(engine):
            cache = shared.compressed(engine)
        else:
            cache = PolicyCache(engine)
            with attention.active(cache):
                model(input_ids=prompt_ids, past_key_values=cache, use_cache=True)
            cache.compress("prefill")
        out.append(read_held(cache, engine.ir))
    return out


@dataclass
class Prompt:
    ids: torch.Tensor  # [1, n] what the model reads (chat template applied when asked)
    text: str  # the text those ids encode
    offsets: list[tuple[int, int]] | None  # per token, its character span in `text` (None: unknown)

    def token_spans(self, needle: str) -> list[tuple[int, int]]:
        """[start, end) token ranges covering each occurrence of `needle` in the text."""
        if self.offsets is None or not needle:
            return []
        spans, at = [], self.text.find(needle)
        while at >= 0:
            end = at + len(needle)
            tokens = [i for i, (s, e) in enumerate(self.offsets) if s < end and e > at]
            if tokens:
                spans.append((tokens[0], tokens[-1] + 1))
            at = self.text.find(needle, end)
        return spans


def encode_prompt(tok, text: str, chat: bool) -> Prompt:
    """The prompt's ids, as kvpolicy.hf.generate would encode it, with each
    token's character span (to place a needle) when the tokenizer gives one."""
    from .decoding import encode

    ids = encode(tok, text, chat)
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False) if chat else text
    offsets = None
    if getattr(tok, "is_fast", False):
        enc = tok(rendered, add_special_tokens=not chat, return_offsets_mapping=True)
        if enc["input_ids"] == ids[0].tolist():  # the spans are only meaningful for the same tokens
            offsets = [tuple(span) for span in enc["offset_mapping"]]
    return Prompt(ids=ids, text=rendered, offsets=offsets)
