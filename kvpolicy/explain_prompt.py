"""`kvpolicy explain POLICY... --prompt FILE [--png OUT] [--json OUT] [--mark TEXT]`:
prefill one prompt on the model under each policy (HF engine, real cache)
and report what each (layer, kv_head) holds after the first compression.

Every input is checked before the model loads where it can be (files,
output paths) and right after tokenizing otherwise (empty, too long, a mark
not in the prompt), each as one line; outputs are written whole or not at
all (temp file + rename).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from .errors import KvpolicyError
from .atomic_output import write_atomically


class PromptError(KvpolicyError):
    """A prompt, mark or output path the command cannot use (exit 2)."""


def read_prompt(path: str) -> str:
    file = Path(path)
    if not file.exists():
        raise PromptError(f"cannot read prompt {path}: no such file")
    if file.is_dir():
        raise PromptError(f"cannot read prompt {path}: it is a directory")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise PromptError(f"cannot read prompt {path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise PromptError(f"cannot read prompt {path}: {err.strerror or err}") from None
    if not text.strip():
        raise PromptError(f"prompt {path} is empty")
    return text


def check_writable(out: Path, flag: str) -> None:
    """Fail before the model runs if `out` cannot be written (nothing is left behind)."""
    if out.is_dir():
        raise PromptError(f"{flag} {out} is a directory; give a file name")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise PromptError(f"cannot write {out}: {blocking} is not a directory")
    parent = out.parent
    if not parent.exists():
        raise PromptError(f"cannot write {out}: directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PromptError(f"cannot write {out}: {err.strerror or err}") from None


def report(model_name: str, prompt, held: list, marks: list[str], chat: bool) -> dict:
    """The data `--json` writes and the picture is drawn from."""
    spans = []
    for text in marks:
        found = prompt.token_spans(text)
        if not found:
            why = "" if prompt.offsets is not None else " (the tokenizer gives no character offsets)"
            raise PromptError(f"--mark {text!r} is not in the prompt{why}")
        spans += [{"text": text, "start": start, "end": end} for start, end in found]
    return {
        "model": model_name,
        "prompt_tokens": int(prompt.ids.shape[1]),
        "chat": chat,
        "marks": spans,
        "policies": [h.to_json() for h in held],
    }


def run(policies: list, args) -> None:
    """The command, once the policies compiled. Prints one line per policy."""
    text = read_prompt(args.prompt)
    outputs = [(Path(p), flag) for p, flag in ((args.png, "--png"), (args.json, "--json")) if p]
    for out, flag in outputs:
        check_writable(out, flag)
    for mark in args.mark:
        if mark not in text:
            raise PromptError(f"--mark {mark!r} is not in the prompt {args.prompt}")

    import torch

    from . import models
    from .backends.hf.explain_prompt import encode_prompt, held_after_prefill
    from .explain_picture import not_compressed

    directory = models.path(args.model)
    model, tok = models.load(directory)
    prompt = encode_prompt(tok, text, args.chat)
    n = int(prompt.ids.shape[1])
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and n > limit:
        raise PromptError(f"prompt {args.prompt} is {n} tokens, more than {args.model} reads ({limit} positions)")
    report(args.model, prompt, [], args.mark, args.chat)  # a mark the tokens cannot place fails before the prefill
    with torch.inference_mode():
        held = held_after_prefill(model, prompt.ids, policies)
    data = report(args.model, prompt, held, args.mark, args.chat)

    for entry in data["policies"]:
        counts = [c for layer in entry["kept"] for c in layer]
        share = entry["kv_bytes"] / entry["kv_bytes_full"] if entry["kv_bytes_full"] else 1.0
        state = "" if entry["compressed"] else f" ({not_compressed(entry)})"
        print(f"{entry['policy']}: {n} prompt tokens; holds {min(counts)}..{max(counts)} per (layer, kv_head), "
              f"mean {sum(counts) / len(counts):.1f}; {entry['kv_bytes']} of {entry['kv_bytes_full']} KV bytes ({share:.1%}){state}")
    if args.json:
        text = json.dumps(data) + "\n"
        write_atomically(Path(args.json), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"wrote {args.json}")
    if args.png:
        from .explain_picture import draw

        draw(data, Path(args.png))
        print(f"wrote {args.png}")
    sys.stdout.flush()
