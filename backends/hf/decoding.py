"""`kvpolicy.hf.generate`: greedy decoding of one prompt under a policy.

    res = kvpolicy.hf.generate(model, tok, prompt, policy=pol, max_new_tokens=32)
    res.text, res.stats.kv_bytes, res.stats.kv_bytes_full, res.stats.kept

Prefill runs in one forward pass; the policy compresses after it and during
decoding on its schedule (cache.py); timings separate compression from the
model's own work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import kvpolicy
from kvpolicy.backends.torch import ModelShape, TorchPolicy

from . import attention
from .cache import PolicyCache


@dataclass
class Stats:
    prompt_tokens: int
    new_tokens: int
    kept: list[list[int]]  # [layer][kv_head] tokens held at the end
    kv_bytes: int  # bytes of K/V held at the end (holes included)
    kv_bytes_full: int  # bytes a full cache would hold for the same tokens
    peak_kv_bytes: int  # most bytes held at any point after prefill compression
    prefill_seconds: float
    decode_seconds: float
    compress_seconds: float  # all compression, prefill included
    decode_compress_seconds: float  # compression during decoding (inside decode_seconds)
    compressions: int
    temperatures: dict = field(default_factory=dict)  # (name, layer) -> [Hkv] fitted values

    @property
    def kv_fraction(self) -> float:
        return self.kv_bytes / self.kv_bytes_full if self.kv_bytes_full else 1.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Result:
    text: str
    tokens: list[int]
    stats: Stats


def resolve_policy(policy):
    if policy is None:
        return kvpolicy.load("full")
    if isinstance(policy, str):
        return kvpolicy.load(policy)
    return policy


def prepare(model, policy) -> TorchPolicy:
    """The torch engine for this model; installs the attention function."""
    attention.register()
    if model.config._attn_implementation != attention.NAME:
        model.set_attn_implementation(attention.NAME)
    return TorchPolicy(resolve_policy(policy), ModelShape.from_config(model.config))


def encode(tok, prompt, chat: bool) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        return prompt if prompt.dim() == 2 else prompt[None]
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    return tok(prompt, return_tensors="pt").input_ids


@torch.inference_mode()
def generate(model, tok, prompt, policy=None, max_new_tokens: int = 32, chat: bool = False, stop_at_eos: bool = True) -> Result:
    engine = prepare(model, policy)
    input_ids = encode(tok, prompt, chat)
    cache = PolicyCache(engine)
    eos = tok.eos_token_id
    generated: list[int] = []
    peak = 0
    with attention.active(cache):
        start = time.perf_counter()
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        cache.compress("prefill")
        prefill_seconds = time.perf_counter() - start
        peak = cache.kv_bytes()
        next_token = int(out.logits[0, -1].argmax())
        decode_start = time.perf_counter()
        compress_before = cache.compress_seconds
        for step in range(1, max_new_tokens + 1):
            generated.append(next_token)
            if step == max_new_tokens or (stop_at_eos and next_token == eos):
                break
            cache.run.decode_step = step
            out = model(input_ids=torch.tensor([[next_token]]), past_key_values=cache, use_cache=True)
            cache.compress("decode")
            peak = max(peak, cache.kv_bytes())
            next_token = int(out.logits[0, -1].argmax())
        decode_seconds = time.perf_counter() - decode_start
    stats = Stats(
        prompt_tokens=int(input_ids.shape[1]),
        new_tokens=len(generated),
        kept=cache.kept_counts(),
        kv_bytes=cache.kv_bytes(),
        kv_bytes_full=cache.kv_bytes_full(),
        peak_kv_bytes=peak,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        compress_seconds=cache.compress_seconds,
        decode_compress_seconds=cache.compress_seconds - compress_before,
        compressions=cache.compressions,
        temperatures=dict(cache.run.temperatures),
    )
    return Result(text=tok.decode(generated, skip_special_tokens=True), tokens=generated, stats=stats)
