"""The `vllm.general_plugins` entry point: vLLM calls `register()` once in
each of its processes. It only wraps engine creation (so that
`additional_config={"kvpolicy": ...}` takes effect) and, in processes started
by an engine that has a policy, overrides the CPU attention backend before
the model is built. With no policy configured nothing else changes."""
from __future__ import annotations

import os


def register() -> None:
    from . import vllm032

    vllm032.install_engine_hook()
    if os.environ.get(vllm032.ACTIVE_ENV) == "1":
        vllm032.register_attention()
