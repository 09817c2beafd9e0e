"""Quality metrics of a policy against the full cache: pure functions.

Inputs are log-probabilities [n, vocab] of a teacher-forced continuation
(row i predicts continuation token i), as kvpolicy.hf.score returns them,
from the full cache (`ref`) and from a policy (`out`) on the same prompt.

    kl_per_position(ref, out)   KL(full || policy) of each next-token distribution, nats
    top1_agreement(ref, out)    share of positions where both pick the same token
    perplexity(out, tokens)     exp of the mean negative log-likelihood of the tokens
    sequence_logprob(out, ts)   log P(tokens | prompt) under teacher forcing, nats
    greedy_follows(out, tokens) greedy decoding would emit exactly these tokens first
    contains_answer(text, gold) the generated text contains the gold answer
"""
from __future__ import annotations

import math
import re

import torch


def _check(ref: torch.Tensor, out: torch.Tensor) -> None:
    if ref.shape != out.shape or ref.dim() != 2:
        raise ValueError(f"expected two [n, vocab] tensors of one shape, got {tuple(ref.shape)} and {tuple(out.shape)}")


def kl_per_position(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_out) at each position: sum_v p_ref(v) (log p_ref(v) - log p_out(v)).
    Tokens the reference gives probability 0 contribute 0."""
    _check(ref, out)
    ref, out = ref.double(), out.double()
    p = ref.exp()
    terms = torch.where(p > 0, p * (ref - out), torch.zeros_like(p))
    return terms.sum(dim=-1)


def mean_kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(kl_per_position(ref, out).mean())


def top1_agreement(ref: torch.Tensor, out: torch.Tensor) -> float:
    _check(ref, out)
    return float((ref.argmax(dim=-1) == out.argmax(dim=-1)).double().mean())


def token_logprobs(logprobs: torch.Tensor, tokens) -> torch.Tensor:
    tokens = torch.as_tensor(list(tokens), dtype=torch.long)
    if logprobs.dim() != 2 or logprobs.shape[0] != tokens.numel():
        raise ValueError(f"{logprobs.shape[0] if logprobs.dim() == 2 else '?'} rows of log-probabilities for {tokens.numel()} tokens")
    return logprobs.double()[torch.arange(tokens.numel()), tokens]


def sequence_logprob(logprobs: torch.Tensor, tokens) -> float:
    return float(token_logprobs(logprobs, tokens).sum())


def perplexity(logprobs: torch.Tensor, tokens) -> float:
    return math.exp(-float(token_logprobs(logprobs, tokens).mean()))


def greedy_follows(logprobs: torch.Tensor, tokens) -> bool:
    """True when every teacher-forced position's argmax is the forced token.
    Greedy decoding runs the same computation one token at a time, so then
    its first len(tokens) tokens are exactly `tokens`."""
    tokens = torch.as_tensor(list(tokens), dtype=torch.long)
    return bool((logprobs.argmax(dim=-1) == tokens).all())


def normalize(text: str) -> str:
    """Lower case, runs of whitespace as one space, no surrounding punctuation."""
    return re.sub(r"\s+", " ", text).strip().strip(".,;:!?\"'").lower()


def contains_answer(text: str, gold: str) -> bool:
    """The gold answer appears in the text (case and spacing ignored); a
    number must not be part of a longer number."""
    text_n, gold_n = re.sub(r"\s+", " ", text).lower(), normalize(gold)
    if not gold_n:
        return False
    if gold_n.isdigit():
        return re.search(rf"(?<!\d){re.escape(gold_n)}(?!\d)", text_n) is not None
    return gold_n in text_n
