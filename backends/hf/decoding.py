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
    peak_kv_bytes: int  # most bytes held at any point after prefill compression (a decode step's token counts before its compression)
    prefill_seconds: float
    decode_seconds: float
    compress_seconds: float  # all compression, prefill included
    decode_compress_seconds: float  # compression during decoding (inside decode_seconds)
    compressions: int
    temperatures: dict = field(default_factory=dict)  # (name, layer) -> [Hkv] fitted values
    mean_kv_bytes: float = 0.0  # bytes held, averaged over the decode steps (each after its compression)
    mean_kv_bytes_full: float = 0.0  # what a full cache holds, averaged over the same steps
    compression_steps: list = field(default_factory=list)  # decode steps at which some layer compressed

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


def prepare(model, policy, backend: str = "torch") -> TorchPolicy:
    """The policy's engine for this model on `backend` (torch; triton:
    generated kernels, the interpreter without CUDA; auto: triton where CUDA
    is present); installs the attention function."""
    attention.install(model)
    from kvpolicy import backends

    return backends.compile(resolve_policy(policy), ModelShape.from_config(model.config), backend)


def encode(tok, prompt, chat: bool) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        return prompt if prompt.dim() == 2 else prompt[None]
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    return tok(prompt, return_tensors="pt").input_ids


@dataclass
class Scored:
    """Teacher-forced continuation: log-probabilities the model gave each
    continuation token's position (row i predicts continuation[i])."""

    logprobs: torch.Tensor  # [n, vocab] float32
    stats: Stats


@torch.inference_mode()
def generate(model, tok, prompt, policy=None, max_new_tokens: int = 32, chat: bool = False, stop_at_eos: bool = True,
             prefilled=None, block_size: int | None = None, backend: str = "torch") -> Result:
    """Greedy decoding of one prompt under a policy (from a shared full-cache
    prefill of the same prompt when `prefilled`, one or a list, has one the
    policy can fork: see prefill.py). `block_size`: hold one physical length
    for all layers and heads, as vLLM does (kvpolicy/runtime/blocks.py)."""
    eos = tok.eos_token_id

    def choose(step: int, logits: torch.Tensor) -> tuple[int, bool]:
        token = int(logits.argmax())
        return token, step == max_new_tokens or (stop_at_eos and token == eos)

    generated, _, stats = _decode(model, prepare(model, policy, backend), encode(tok, prompt, chat), choose, False, prefilled, block_size)
    return Result(text=tok.decode(generated, skip_special_tokens=True), tokens=generated, stats=stats)


@torch.inference_mode()
def score(model, prompt_ids: torch.Tensor, continuation: list[int], policy=None, prefilled=None, backend: str = "torch",
          stepwise: bool = False) -> Scored:
    """Feed `continuation` after the prompt (teacher forcing) under a policy,
    compressing on its schedule, and return the model's log-probabilities.
    The tokens between two compressions go in one forward (the schedule is
    known ahead: cache.steps_until_due), which computes what one forward per
    token does, to float rounding; `stepwise` feeds them one at a time."""
    if not continuation:
        raise ValueError("score needs at least one continuation token")
    engine, ids = prepare(model, policy, backend), encode(None, prompt_ids, False)
    if stepwise:
        def choose(step: int, logits: torch.Tensor) -> tuple[int, bool]:
            return continuation[step - 1], step == len(continuation)

        _, logits, stats = _decode(model, engine, ids, choose, True, prefilled)
    else:
        logits, stats = _teacher_forced(model, engine, ids, list(continuation), prefilled)
    return Scored(logprobs=torch.log_softmax(torch.stack(logits).float(), dim=-1), stats=stats)


@torch.inference_mode()
def trace(model, prompt_ids: torch.Tensor, length: int, policy=None, prefilled=None, banned: tuple[int, ...] = ()) -> tuple[list[int], Scored]:
    """Greedy decoding of exactly `length` tokens (never one of `banned`),
    with the log-probabilities of each step: the model's own trace and its
    teacher-forced scores in one pass (score() over the trace gives the same)."""
    ban = torch.tensor(list(banned), dtype=torch.long)

    def choose(step: int, logits: torch.Tensor) -> tuple[int, bool]:
        if ban.numel():
            logits = logits.index_fill(0, ban, float("-inf"))
        return int(logits.argmax()), step == length

    tokens, logits, stats = _decode(model, prepare(model, policy), encode(None, prompt_ids, False), choose, True, prefilled)
    return tokens, Scored(logprobs=torch.log_softmax(torch.stack(logits).float(), dim=-1), stats=stats)


CHUNK = 256  # teacher-forced tokens in one forward at most: bounds its [n, vocab] logits


@dataclass
class _Tally:
    """Bytes held over the decode steps: the peak, and the sums for the means."""

    peak: int
    held_sum: int = 0
    full_sum: int = 0
    steps: int = 0
    compression_steps: list = field(default_factory=list)

    def step(self, held: int, full: int) -> None:
        self.peak = max(self.peak, held)
        self.held_sum, self.full_sum, self.steps = self.held_sum + held, self.full_sum + full, self.steps + 1

    def compress(self, cache, step: int) -> None:
        """Compress what is due after decode step `step`, then count the step."""
        events = cache.compressions
        cache.compress("decode")
        if cache.compressions > events:
            self.compression_steps.append(step)
        self.step(cache.kv_bytes(), cache.kv_bytes_full())  # flatten_max frees dropped slots only at the next append


def _start(model, engine: TorchPolicy, input_ids: torch.Tensor, prefilled, block_size):
    """Prefill (or fork a shared one) and compress: (cache, last logits, seconds)."""
    options = [] if prefilled is None else list(prefilled) if isinstance(prefilled, (list, tuple)) else [prefilled]
    if any(not torch.equal(option.prompt_ids, input_ids) for option in options):
        raise ValueError("the shared prefill is of another prompt")
    prefilled = None if block_size else next((option for option in options if option.can_fork(engine)), None)
    start = time.perf_counter()
    if prefilled is not None:  # already compressed for this policy (prefill.py)
        cache, last_logits = prefilled.compressed(engine), prefilled.logits
    else:
        cache = PolicyCache(engine, block_size) if block_size else PolicyCache(engine)
        with attention.active(cache):
            last_logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits[0, -1]
        cache.compress("prefill")
    return cache, last_logits, time.perf_counter() - start + (prefilled.seconds if prefilled is not None else 0.0)


def _teacher_forced(model, engine: TorchPolicy, input_ids: torch.Tensor, continuation: list[int], prefilled=None):
    """score()'s loop: decode steps step..step+n-1 in one forward whenever
    no layer is due to compress before the last of them. Between two
    compressions each step adds the same bytes (one token in every head), so
    the steps inside a chunk are counted from the bytes at its end."""
    cache, last_logits, prefill_seconds = _start(model, engine, input_ids, prefilled, None)
    logits = [last_logits]
    with attention.active(cache):
        tally = _Tally(peak=cache.kv_bytes())
        decode_start, compress_before = time.perf_counter(), cache.compress_seconds
        step, last = 1, len(continuation)  # step s feeds continuation[s - 1]; the last token is only predicted
        while step < last:
            n = cache.steps_until_due(step, min(CHUNK, last - step))
            cache.run.decode_step = step + n - 1
            out = model(input_ids=torch.tensor([continuation[step - 1 : step - 1 + n]]), past_key_values=cache, use_cache=True)
            logits.extend(out.logits[0])
            held, full, per_token = cache.kv_bytes(), cache.kv_bytes_full(), cache.bytes_per_token()
            for behind in range(n - 1, 0, -1):  # the chunk's earlier steps, none of which compressed
                tally.step(held - behind * per_token, full - behind * per_token)
            tally.peak = max(tally.peak, held)  # the new tokens are held before any compression frees memory
            tally.compress(cache, step + n - 1)
            step += n
        cache.settle()  # a compaction deferred to the next append that never came
        decode_seconds = time.perf_counter() - decode_start
    return logits, _stats(cache, input_ids, len(continuation), tally, prefill_seconds, decode_seconds, compress_before)


def _decode(model, engine: TorchPolicy, input_ids: torch.Tensor, choose, keep_logits: bool, prefilled=None, block_size=None):
    """Prefill (or fork a shared one), compress, then one token at a time:
    `choose(step, logits)` gives (token, last?) for step 1, 2, ..."""
    cache, last_logits, prefill_seconds = _start(model, engine, input_ids, prefilled, block_size)
    tokens: list[int] = []
    kept_logits: list[torch.Tensor] = []
    with attention.active(cache):
        tally = _Tally(peak=cache.kv_bytes())
        decode_start, compress_before = time.perf_counter(), cache.compress_seconds
        step = 1
        while True:
            logits = last_logits
            if keep_logits:
                kept_logits.append(logits.clone())
            token, last = choose(step, logits)
            tokens.append(token)
            if last:
                break
            cache.run.decode_step = step
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            last_logits = out.logits[0, -1]
            tally.peak = max(tally.peak, cache.kv_bytes())  # the new token is held before any compression frees memory
            tally.compress(cache, step)
            step += 1
        cache.settle()  # a compaction deferred to the next append that never came
        decode_seconds = time.perf_counter() - decode_start
    return tokens, kept_logits, _stats(cache, input_ids, len(tokens), tally, prefill_seconds, decode_seconds, compress_before)


def _stats(cache, input_ids, new_tokens: int, tally: _Tally, prefill_seconds: float, decode_seconds: float, compress_before: float) -> Stats:
    return Stats(
        prompt_tokens=int(input_ids.shape[1]),
        new_tokens=new_tokens,
        kept=cache.kept_counts(),
        kv_bytes=cache.kv_bytes(),
        kv_bytes_full=cache.kv_bytes_full(),
        peak_kv_bytes=tally.peak,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        compress_seconds=cache.compress_seconds,
        decode_compress_seconds=cache.compress_seconds - compress_before,
        compressions=cache.compressions,
        temperatures=dict(cache.run.temperatures),
        mean_kv_bytes=tally.held_sum / tally.steps if tally.steps else float(cache.kv_bytes()),
        mean_kv_bytes_full=tally.full_sum / tally.steps if tally.steps else float(cache.kv_bytes_full()),
        compression_steps=tally.compression_steps,
    )
