"""The HF engine with backend="triton" (generated kernels, Triton's
interpreter here) generates the same tokens as with the torch backend, on
SmolLM2 and a short prompt, for snapkv, hardkv and kivi; and it really
compresses (the comparison would be empty otherwise)."""
import pytest

import kvpolicy
from kvpolicy.backends import hf

PROMPT = (
    "The lighthouse keeper wrote in his log every evening. On the first night the sea was calm and the lamp burned "
    "steadily. On the second night a storm came from the west and the keeper climbed the stairs twice to trim the wick. "
    "On the third night a ship passed close to the rocks, and he rang the bell until it turned away. What did the keeper "
    "do on the second night?"
)
POLICIES = {
    "snapkv": {"budget": 48, "window": 8},
    "hardkv": {"budget": 24, "window": 8},  # compresses after the prefill (interval 128)
    "kivi": {"residual": 4},
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_triton_engine_generates_the_torch_tokens(smollm2, name):
    model, tok = smollm2
    policy = kvpolicy.load(name, **POLICIES[name])
    torch_run = hf.generate(model, tok, PROMPT, policy=policy, max_new_tokens=10, chat=True, stop_at_eos=False)
    triton_run = hf.generate(model, tok, PROMPT, policy=policy, max_new_tokens=10, chat=True, stop_at_eos=False, backend="triton")
    assert triton_run.tokens == torch_run.tokens
    assert triton_run.stats.kept == torch_run.stats.kept
    assert torch_run.stats.compressions > 0
    if name != "kivi":  # kivi saves memory by representation, not by evicting
        assert sum(map(sum, torch_run.stats.kept)) < torch_run.stats.prompt_tokens * len(torch_run.stats.kept[0]) * len(torch_run.stats.kept)
