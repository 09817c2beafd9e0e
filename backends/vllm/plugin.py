"""The `vllm.general_plugins` entry point: vLLM calls `register()` once in
each of its processes. It only wraps engine creation (so that
`additional_config={"kvpolicy": ...}` takes effect) and, in processes started
by an engine that has a policy, overrides the CPU attention backend before
the model is built. With no policy configured nothing else changes.

A refusal at startup that nobody catches (e.g. the OpenAI server started
with a bad policy) prints its message alone (the checker's FILE:LINE:COL
report for a policy that fails to check) and exits 1, not a traceback; one
raised in vLLM's engine-core process reaches process 0 first (vllm032.py)."""
from __future__ import annotations

import os
import sys


def register() -> None:
    from . import vllm032

    vllm032.install_engine_hook()
    if os.environ.get(vllm032.ACTIVE_ENV) == "1":
        vllm032.register_attention()
    _install_excepthook()


def _install_excepthook() -> None:
    from kvpolicy.errors import KvpolicyError

    from .vllm032 import one_line

    previous = sys.excepthook
    if getattr(previous, "_kvpolicy", False):
        return

    def hook(kind, error, trace):
        if isinstance(error, KvpolicyError):
            print(one_line(error), file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)  # the server's other threads would keep the process alive
        previous(kind, error, trace)

    hook._kvpolicy = True
    sys.excepthook = hook
