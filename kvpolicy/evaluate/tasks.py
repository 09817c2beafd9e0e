"""Evaluation tasks, generated locally and deterministically by seed.

Every sample is built in token space with the model's tokenizer, so its
prompt has exactly the requested number of tokens:

    sample = make("passkey", tok, context=2048, seed=0, index=3)
    sample.prompt_ids    # exactly 2048 token ids
    sample.answer        # "48213"       (None for `text`)
    sample.answer_ids    # the tokens teacher-forced after the prompt
    sample.depth         # where the needle starts, as a fraction of the document's tokens

Retrieval tasks use the chat template: the user turn holds the document and
the question, and the assistant turn is opened with an answer prefix ("The
secret pass key is"). SmolLM2-135M only retrieves that way; as a plain text
continuation it rambles (see the environment notes).

The haystack is real English prose: the licence texts already on the machine
(kvpolicy.texts). A document is a slice of the tokenized corpus starting at a
line start; needles are inserted at line starts, so the concatenated ids are
what the tokenizer would produce for the text, and the needle's position is
known to the token. `text` is plain language modelling: the prompt is
`context` tokens of prose and the continuation the next `text_tokens` ones.

Sample i of a task depends only on (task, seed, i): its needle depth comes
from a fixed sequence (0.5, 0, 1, 0.25, 0.75, 0.125, ...), its haystack,
keys and values from a random.Random seeded with that triple. So growing
--samples keeps the earlier samples (which --resume relies on), and the same
seed gives the same keys and values at every context length.
"""
from __future__ import annotations

import bisect
import hashlib
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction

from kvpolicy.texts import english_text

ANSWER_TASKS = ("passkey", "needle", "multikey", "vartrack", "qa")
TASKS = ANSWER_TASKS + ("text",)
DESCRIPTIONS = {
    "passkey": "a 5-digit pass key hidden in prose (chat template)",
    "needle": "one key-value needle in prose; recall the value of the key",
    "multikey": "four key-value needles in prose; recall the value of one key",
    "vartrack": "a chain of variable assignments in prose; the value at its end",
    "qa": "continue a quoted line of the document (answer: the next words, a span of it)",
    "text": "plain prose: KL over the next tokens, no question",
}
MIN_CONTEXT = 256
CORPUS_CHARS = 300_000  # ~100k tokens: room for random offsets at 8k contexts
SNAP_TOKENS = 48  # a needle moves at most this far to reach a line start

_KEYS = (
    "apple", "harbor", "violin", "cactus", "glacier", "lantern", "meadow", "falcon", "copper", "orchid",
    "thunder", "pepper", "island", "marble", "saddle", "compass", "walnut", "ember", "quartz", "willow",
    "canyon", "beacon", "dolphin", "juniper", "kettle", "magnet", "nectar", "pebble", "ribbon", "tundra",
)


@dataclass(frozen=True)
class Sample:
    task: str
    index: int
    seed: int
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # the teacher-forced continuation
    answer: str | None  # gold answer string (None for `text`)
    depth: float | None  # needle start within the document, fraction of its tokens
    requested_depth: float | None
    document: tuple[int, int]  # token span [start, end) of the document in the prompt
    needle: tuple[int, int] | None  # token span of the needle that holds the answer
    question: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.task}#{self.index}"

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(repr((self.prompt_ids, self.answer_ids)).encode()).hexdigest()
        return "sha256:" + digest[:32]


def depth_for(index: int) -> float:
    """0.5, 0, 1, then the van der Corput sequence: 0.25, 0.75, 0.125, 0.625, ..."""
    if index < 3:
        return (0.5, 0.0, 1.0)[index]
    n, denominator, value = index - 1, 1, Fraction(0)
    while n:
        denominator *= 2
        n, bit = divmod(n, 2)
        value += Fraction(bit, denominator)
    return float(value)


def sample_rng(task: str, seed: int, index: int) -> random.Random:
    return random.Random(f"kvpolicy-eval:{task}:{seed}:{index}")  # str seeds are stable across runs


# ----------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """The prose tokenized once: ids, each token's start character, and the
    indices of tokens that begin a line."""

    text: str
    ids: list[int]
    starts: list[int]
    line_starts: list[int]


_CORPORA: dict[int, Corpus] = {}


def corpus(tok) -> Corpus:
    key = id(tok)
    if key not in _CORPORA:
        text = english_text(CORPUS_CHARS)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        starts = [s for s, _ in offsets]
        line_starts = [i for i, (s, e) in enumerate(offsets) if i > 0 and _begins_line(text, s, e)]
        _CORPORA[key] = Corpus(text, list(enc["input_ids"]), starts, line_starts)
    return _CORPORA[key]


def _begins_line(text: str, s: int, e: int) -> bool:
    """The token text[s:e] holds the first word of a line: only indentation
    lies between the previous newline and it (the tokenizer may have put that
    indentation, or one space of it, into this token or the newline's)."""
    word = s + len(text[s:e]) - len(text[s:e].lstrip())
    if word >= e or word == 0:
        return False  # a whitespace-only token, or the very start
    newline = text.rfind("\n", 0, word)
    return newline >= 0 and newline < s and not text[newline + 1 : word].strip()


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _chat_parts(tok, answer_prefix: str) -> tuple[list[int], str]:
    """Token ids of the chat template before the user content, and the
    template text after it (up to and including the opened assistant turn)."""
    mark = "\x00KVPOLICY\x00"
    rendered = tok.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False)
    head, tail = rendered.split(mark)
    return _encode(tok, head), tail + answer_prefix


def _answer_split(tok, answer_prefix: str, answer: str) -> tuple[str, list[int]]:
    """(prefix text to put in the prompt, answer token ids). A space the
    tokenizer splits off on its own (before digits) goes into the prompt, so
    the teacher-forced tokens are the answer itself."""
    whole = _encode(tok, answer_prefix + " " + answer)
    spaced = _encode(tok, answer_prefix + " ")
    if whole[: len(spaced)] == spaced and len(whole) > len(spaced):
        return answer_prefix + " ", whole[len(spaced):]
    bare = _encode(tok, answer_prefix)
    if whole[: len(bare)] != bare:
        raise ValueError(f"the tokenizer merges the answer into its prefix: {answer_prefix!r} + {answer!r}")
    return answer_prefix, whole[len(bare):]


def _line_start_near(c: Corpus, lo: int, hi: int, target: int) -> int:
    """The line-start token index in [lo, hi] nearest to target, else target."""
    i = bisect.bisect_left(c.line_starts, target)
    candidates = [c.line_starts[j] for j in (i - 1, i) if 0 <= j < len(c.line_starts)]
    candidates = [x for x in candidates if lo <= x <= hi and abs(x - target) <= SNAP_TOKENS]
    return min(candidates, key=lambda x: abs(x - target)) if candidates else target


def _document_start(c: Corpus, rng: random.Random, n_tokens: int) -> int:
    last = len(c.ids) - n_tokens - 64
    if last <= 0:
        raise ValueError(f"not enough prose on this machine for a {n_tokens}-token document")
    start = rng.randrange(0, last)
    i = bisect.bisect_left(c.line_starts, start)
    return c.line_starts[i] if i < len(c.line_starts) and c.line_starts[i] < last else start


# ----------------------------------------------------------------- building


@dataclass
class _Needle:
    text: str  # one line, ending in a newline
    depth: float  # requested, as a fraction of the document
    holds_answer: bool = False


def _build_chat(tok, task, index, seed, context, rng, needles, question, answer_prefix, answer, details):
    """A chat-template prompt of exactly `context` tokens: prose with needles
    inserted at line starts near their depths, then the question."""
    c = corpus(tok)
    head, tail_text = _chat_parts(tok, "")
    prefix_text, answer_ids = _answer_split(tok, answer_prefix, answer)
    tail = _encode(tok, "\n\n" + question + tail_text + prefix_text)
    needle_ids = [_encode(tok, n.text) for n in needles]
    n_doc = context - len(head) - len(tail) - sum(map(len, needle_ids))
    if n_doc < 32:
        raise ValueError(f"context {context} is too short for task {task}")
    start = _document_start(c, rng, n_doc)
    base = c.ids[start : start + n_doc]
    # Insertion points in the base document (token offsets), snapped to line starts.
    points = []
    for n in needles:
        target = start + round(n.depth * n_doc)
        points.append(_line_start_near(c, start, start + n_doc, target) - start)
    order = sorted(range(len(needles)), key=lambda k: (points[k], k))
    doc: list[int] = []
    spans: dict[int, tuple[int, int]] = {}
    cursor = 0
    for k in order:
        doc += base[cursor : points[k]]
        cursor = points[k]
        spans[k] = (len(doc), len(doc) + len(needle_ids[k]))
        doc += needle_ids[k]
    doc += base[cursor:]
    prompt = head + doc + tail
    assert len(prompt) == context, (len(prompt), context)
    d0 = len(head)
    k_answer = next(k for k, n in enumerate(needles) if n.holds_answer)
    s, e = spans[k_answer]
    details = dict(details, needle_depths=[round(spans[k][0] / len(doc), 4) for k in range(len(needles))])
    return Sample(
        task=task,
        index=index,
        seed=seed,
        prompt_ids=tuple(prompt),
        answer_ids=tuple(answer_ids),
        answer=answer,
        depth=spans[k_answer][0] / len(doc),
        requested_depth=needles[k_answer].depth,
        document=(d0, d0 + len(doc)),
        needle=(d0 + s, d0 + e),
        question=question,
        details=details,
    )


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def passkey(tok, context: int, seed: int, index: int) -> Sample:
    rng = sample_rng("passkey", seed, index)
    key = _number(rng, 5)
    needle = _Needle(f"The secret pass key is {key}. Remember it. {key} is the secret pass key.\n", depth_for(index), True)
    return _build_chat(
        tok, "passkey", index, seed, context, rng, [needle],
        "What is the secret pass key in the text above?", "The secret pass key is", key, {},
    )


def _key_value_needles(rng: random.Random, count: int, first_depth: float):
    keys = rng.sample(_KEYS, count)
    values = [_number(rng, 7) for _ in keys]
    depths = [first_depth] + [rng.random() for _ in range(count - 1)]
    needles = [_Needle(f"The special magic number for {k} is: {v}.\n", d, i == 0) for i, (k, v, d) in enumerate(zip(keys, values, depths))]
    return keys, values, needles


def needle(tok, context: int, seed: int, index: int, count: int = 1, task: str = "needle") -> Sample:
    rng = sample_rng(task, seed, index)
    keys, values, needles = _key_value_needles(rng, count, depth_for(index))
    return _build_chat(
        tok, task, index, seed, context, rng, needles,
        f"What is the special magic number for {keys[0]} in the text above?",
        f"The special magic number for {keys[0]} is", values[0],
        {"keys": keys, "values": values},
    )


def multikey(tok, context: int, seed: int, index: int) -> Sample:
    return needle(tok, context, seed, index, count=4, task="multikey")


def vartrack(tok, context: int, seed: int, index: int, hops: int = 4) -> Sample:
    """VAR A = 31547, VAR B = VAR A, ... spread over the document; the
    question asks for the last variable's value. The stated depth is the
    first assignment's (the one that holds the value)."""
    rng = sample_rng("vartrack", seed, index)
    names: list[str] = []
    while len(names) < hops:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = _number(rng, 5)
    lines = [f"VAR {names[0]} = {value}.\n"] + [f"VAR {b} = VAR {a}.\n" for a, b in zip(names, names[1:])]
    depths = [depth_for(index)] + [rng.random() for _ in range(hops - 1)]
    needles = [_Needle(text, d, i == 0) for i, (text, d) in enumerate(zip(lines, depths))]
    return _build_chat(
        tok, "vartrack", index, seed, context, rng, needles,
        f"The text above assigns variables in a chain. What is the value of VAR {names[-1]}?",
        f"The value of VAR {names[-1]} is", value,
        {"chain": [line.strip() for line in lines]},
    )


# Measured with the full cache at 1024 tokens (6 samples): this wording 4/6;
# "which words come right after ...?" 0/4; "Quote the line ..." 2/6.
QA_QUESTION = 'Continue this quote from the text above: "{quote} ..."'
QA_PREFIX = 'The text says: "{quote}'
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")


def qa(tok, context: int, seed: int, index: int, quote_words: int = 6, answer_words: int = 3) -> Sample:
    """Long-document QA on real licence text: a line near the requested depth
    is quoted (its first words) and the answer is the words that follow in
    the document (a span of it; the quote is unique in the document)."""
    rng = sample_rng("qa", seed, index)
    c = corpus(tok)
    head, tail_text = _chat_parts(tok, "")
    depth = depth_for(index)
    # The question's length depends on the quote: estimate the document's
    # length with a typical quote, then check the depth with the real one.
    typical = "word " * quote_words
    n_est = context - len(head) - len(_encode(tok, "\n\n" + QA_QUESTION.format(quote=typical) + tail_text + QA_PREFIX.format(quote=typical)))
    if n_est < 64:
        raise ValueError(f"context {context} is too short for task qa")
    for _attempt in range(50):  # a stretch of prose without a quotable line near the depth: draw another
        start = _document_start(c, rng, context)
        target = start + round(depth * n_est)
        near = [i for i in c.line_starts if start <= i < start + n_est and abs(i - target) <= SNAP_TOKENS]
        for line_start in sorted(near, key=lambda i: (abs(i - target), i)):
            char0 = c.starts[line_start]
            line = c.text[char0 : c.text.find("\n", char0)]
            spans = [m.span() for m in _WORD.finditer(line)]
            if len(spans) < quote_words + answer_words or line[: spans[0][0]].strip():
                continue
            quote = line[spans[0][0] : spans[quote_words - 1][1]]  # verbatim, up to the end of its last word
            rest = line[spans[quote_words - 1][1] : spans[quote_words + answer_words - 1][1]]
            if not re.fullmatch(r"[A-Za-z' ,;:-]+", rest) or not rest.startswith(" "):
                continue
            answer = rest.strip()
            question = QA_QUESTION.format(quote=quote)
            prefix_text, answer_ids = _answer_split(tok, QA_PREFIX.format(quote=quote), answer)
            tail = _encode(tok, "\n\n" + question + tail_text + prefix_text)
            n_fit = context - len(head) - len(tail)
            line_end = bisect.bisect_left(c.starts, char0 + len(line))
            doc_text = c.text[c.starts[start] : c.starts[start + n_fit]]
            if line_end > start + n_fit or doc_text.count(quote) != 1:
                continue
            if abs((line_start - start) / n_fit - depth) > SNAP_TOKENS / n_fit:
                continue
            d0 = len(head)
            return Sample(
                task="qa",
                index=index,
                seed=seed,
                prompt_ids=tuple(head + c.ids[start : start + n_fit] + tail),
                answer_ids=tuple(answer_ids),
                answer=answer,
                depth=(line_start - start) / n_fit,
                requested_depth=depth,
                document=(d0, d0 + n_fit),
                needle=(d0 + line_start - start, d0 + line_end - start),
                question=question,
                details={"quote": quote},
            )
    raise ValueError(f"no quotable line for qa sample {index} at context {context}")


def text(tok, context: int, seed: int, index: int, text_tokens: int = 32) -> Sample:
    rng = sample_rng("text", seed, index)
    c = corpus(tok)
    start = _document_start(c, rng, context + text_tokens)
    ids = c.ids[start : start + context + text_tokens]
    return Sample(
        task="text",
        index=index,
        seed=seed,
        prompt_ids=tuple(ids[:context]),
        answer_ids=tuple(ids[context:]),
        answer=None,
        depth=None,
        requested_depth=None,
        document=(0, context),
        needle=None,
        details={"corpus_token": start},
    )


_MAKERS = {"passkey": passkey, "needle": needle, "multikey": multikey, "vartrack": vartrack, "qa": qa, "text": text}


def make(task: str, tok, context: int, seed: int, index: int, text_tokens: int = 32) -> Sample:
    """Sample `index` of `task` with a prompt of exactly `context` tokens."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}")
    if context < MIN_CONTEXT:
        raise ValueError(f"context must be at least {MIN_CONTEXT} tokens")
    if task == "text":
        return text(tok, context, seed, index, text_tokens)
    return _MAKERS[task](tok, context, seed, index)
