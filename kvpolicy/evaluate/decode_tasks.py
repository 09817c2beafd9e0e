"""Tasks of the decode regime: a short prompt, then a long continuation.

    sample = make("prose", tok, context=128, seed=0, index=0, continuation=1024)
    sample.prompt_ids      # exactly 128 token ids
    sample.answer_ids      # the 1024 continuation tokens, teacher-forced

- prose: real English prose (the licence texts, as `text` has); the prompt
  is its first `context` tokens, the continuation the next ones.
- reasoning: arithmetic word problems, generated locally from the seed,
  asked step by step in the chat template. The continuation is the model's
  OWN greedy generation from the full cache (the closest this machine gets
  to a reasoning model's long trace): `make` returns the prompt only
  (`answer_ids` empty, `needs_generation`), and the harness fills the
  continuation by `generate(..., banned=END_TOKENS)` before any policy runs,
  so the trace does not end its turn and is `continuation` tokens long.

The prompt of `reasoning` has whatever length its problems take (about 150
tokens); `context` only applies to prose.
"""
from __future__ import annotations

import dataclasses
import random

from .tasks import Sample, _chat_parts, _document_start, _encode, corpus, sample_rng

TASKS = ("prose", "reasoning")
DESCRIPTIONS = {
    "prose": "a short prose prompt and a long prose continuation, teacher-forced",
    "reasoning": "arithmetic word problems; the continuation is the model's own greedy step-by-step answer from the full cache",
}
PROBLEMS = 4
MIN_CONTEXT = 16  # a prose prompt's least length
INSTRUCTION = "Solve each problem step by step. Explain every calculation, then check the answer a second way."

_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Femi", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena")
_THINGS = ("apples", "books", "marbles", "stamps", "shells", "cards", "pencils", "coins")


def _problem(rng: random.Random) -> str:
    """One word problem of two or three steps, numbers drawn from rng."""
    name, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    kind = rng.randrange(4)
    a, b, c = rng.randrange(3, 13), rng.randrange(12, 60), rng.randrange(5, 40)
    if kind == 0:
        return f"{name} has {a} boxes with {b} {thing} in each box. {name} gives {c} {thing} to {other}. How many {thing} does {name} have left?"
    if kind == 1:
        return f"A shop sells {thing} for {a} dollars each. {name} buys {b} of them and pays with {a * b + c} dollars. How much change does {name} get?"
    if kind == 2:
        return f"{name} reads {b} pages a day for {a} days, then {c} pages on the last day. How many pages does {name} read in total?"
    return f"A train travels {b} km per hour for {a} hours, then {c} km more. {other} says it went {a * b} km. How far did it really go, and by how much was {other} wrong?"


def reasoning_prompt(tok, seed: int, index: int) -> tuple[list[int], list[str]]:
    rng = sample_rng("reasoning", seed, index)
    problems = [_problem(rng) for _ in range(PROBLEMS)]
    content = INSTRUCTION + "\n" + "\n".join(f"{i + 1}. {p}" for i, p in enumerate(problems))
    head, tail = _chat_parts(tok, "")
    return head + _encode(tok, content + tail), problems


def end_tokens(tok) -> tuple[int, ...]:
    """Tokens that would end the assistant's turn (banned while generating the trace)."""
    ids = {tok.eos_token_id}
    for name in ("<|im_end|>", "<|im_start|>", "<|endoftext|>"):
        token = tok.convert_tokens_to_ids(name)
        if isinstance(token, int) and token != tok.unk_token_id:
            ids.add(token)
    return tuple(sorted(i for i in ids if i is not None))


def prose(tok, context: int, seed: int, index: int, continuation: int) -> Sample:
    rng = sample_rng("prose", seed, index)
    c = corpus(tok)
    start = _document_start(c, rng, context + continuation)
    ids = c.ids[start : start + context + continuation]
    return Sample("prose", index, seed, tuple(ids[:context]), tuple(ids[context:]), None, None, None, (0, context), None,
                  details={"corpus_token": start})


def reasoning(tok, seed: int, index: int) -> Sample:
    ids, problems = reasoning_prompt(tok, seed, index)
    return Sample("reasoning", index, seed, tuple(ids), (), None, None, None, (0, len(ids)), None,
                  question=problems[0], details={"problems": problems})


def needs_generation(sample: Sample) -> bool:
    return sample.task == "reasoning" and not sample.answer_ids


def with_continuation(sample: Sample, tokens: list[int]) -> Sample:
    return dataclasses.replace(sample, answer_ids=tuple(tokens))


def make(task: str, tok, context: int, seed: int, index: int, continuation: int) -> Sample:
    if task == "prose":
        return prose(tok, context, seed, index, continuation)
    if task == "reasoning":
        return reasoning(tok, seed, index)
    raise ValueError(f"unknown decode task {task!r}")
