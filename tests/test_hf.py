"""The HF engine on the real SmolLM2: exact with `full`, real savings otherwise."""
import pytest
import torch

import kvpolicy
from kvpolicy.backends.hf import encode, prepare

pytestmark = pytest.mark.model

LICENSE = open("/usr/share/common-licenses/Apache-2.0", encoding="utf-8").read()


def prose(chars: int) -> str:
    return LICENSE[:chars] + "\n\nIn one sentence, what does this text grant?"


@pytest.fixture(scope="module")
def model_tok(smollm2):
    return smollm2


def test_full_policy_matches_plain_generate(model_tok):
    model, tok = model_tok
    for prompt, chat in [(prose(1500), False), ("Name three colours.", True)]:
        ids = encode(tok, prompt, chat)
        with torch.inference_mode():
            plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        expected = plain[0, ids.shape[1]:].tolist()
        res = kvpolicy.hf.generate(model, tok, prompt, policy="full", max_new_tokens=24, chat=chat)
        assert res.tokens == expected[: len(res.tokens)] and len(res.tokens) == len(expected)
        assert res.stats.kv_bytes == res.stats.kv_bytes_full and res.stats.compressions == 0


def test_bytes_held_follow_the_budget(model_tok):
    model, tok = model_tok
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_slot = 2 * config.num_key_value_heads * head_dim * 4  # K and V, float32, per layer
    held = {}
    for budget in (96, 192):
        res = kvpolicy.hf.generate(model, tok, prose(2000), policy=kvpolicy.load("snapkv", budget=budget, window=32), max_new_tokens=8, stop_at_eos=False)
        s = res.stats
        new = s.new_tokens - 1  # the last token is sampled, never fed back
        assert all(count == budget + new for layer in s.kept for count in layer)
        assert s.kv_bytes == config.num_hidden_layers * (budget + new) * per_slot
        assert s.kv_bytes_full == config.num_hidden_layers * (s.prompt_tokens + new) * per_slot
        held[budget] = s.kv_bytes
    assert held[96] < held[192]


def test_decode_time_policy_stays_within_budget(model_tok):
    model, tok = model_tok
    res = kvpolicy.hf.generate(model, tok, prose(1200), policy=kvpolicy.load("h2o", budget=128), max_new_tokens=12, stop_at_eos=False)
    assert all(count <= 128 for layer in res.stats.kept for count in layer)
    assert res.stats.compressions >= 30 * 11  # every layer at prefill and every step after
    assert res.stats.compress_seconds < res.stats.prefill_seconds + res.stats.decode_seconds


def test_head_adaptive_policy_keeps_different_counts_per_head(model_tok):
    model, tok = model_tok
    res = kvpolicy.hf.generate(model, tok, prose(2000), policy=kvpolicy.load("topp", p=0.9), max_new_tokens=4)
    counts = {count for layer in res.stats.kept for count in layer}
    assert len(counts) > 3  # top-p: each head keeps what its attention needs
    assert res.stats.kv_bytes < res.stats.kv_bytes_full


def test_calibrated_temperatures_move(model_tok):
    model, tok = model_tok
    res = kvpolicy.hf.generate(model, tok, prose(1500), policy=kvpolicy.load("hardkv", budget=128), max_new_tokens=2)
    temperatures = torch.stack([t for (name, layer), t in sorted(res.stats.temperatures.items())])
    assert temperatures.shape == (30, 3)
    assert (temperatures - 0.5).abs().max() > 0.01  # fitted, not stuck at init
    assert len({round(float(t), 4) for t in temperatures.flatten()}) > 10  # one T per (layer, head)


def test_policy_that_does_not_fit_the_model(model_tok, tmp_path):
    model, _ = model_tok
    path = tmp_path / "deep.kvp"
    path.write_text('policy deep "x" {\n  observe queries last 8\n  score s = attn()\n  keep k = top_k(s, 64) in layers 0..40\n  compress at prefill\n}\n')
    pol = kvpolicy.load(str(path))
    with pytest.raises(kvpolicy.PolicyError) as info:
        prepare(model, pol)
    text = info.value.render()
    assert f"{path}:4:3: error: keep 'k' names layer 30, but" in text and "has 30 layers (0..29)" in text


def test_teacher_forced_scores_match_one_full_forward(model_tok):
    model, tok = model_tok
    ids = tok(prose(800), return_tensors="pt").input_ids
    prompt, continuation = ids[:, :-12], ids[0, -12:].tolist()
    scored = kvpolicy.hf.score(model, prompt, continuation, policy="full")
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        reference = torch.log_softmax(model(ids).logits[0, -13:-1].float(), dim=-1)
    assert scored.logprobs.shape == reference.shape
    assert torch.allclose(scored.logprobs, reference, atol=1e-3)
    compressed = kvpolicy.hf.score(model, prompt, continuation, policy=kvpolicy.load("snapkv", budget=64, window=16))
    kl = (reference.exp() * (reference - compressed.logprobs)).sum(-1)
    assert (kl >= -1e-5).all() and kl.mean() > 1e-4  # compression changes the distribution, measurably
