"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct: float32, eval mode.

    Uses the default cache (KVPOLICY_CACHE or ~/.cache/kvpolicy), so only the
    first run on a machine pays the ~30 s GGUF conversion."""
    from kvpolicy import models

    return models.load("smollm2-135m")
