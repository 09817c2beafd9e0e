"""A shared full-cache prefill forked into a policy is the policy's own run."""
import pytest
import torch

import kvpolicy
from kvpolicy.texts import english_text

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tok = smollm2
    return tok(english_text(4000), return_tensors="pt").input_ids[:, :600]


@pytest.mark.parametrize("name, params", [
    ("snapkv", dict(budget=150, window=32)),
    ("streaming_llm", dict(budget=150)),
    ("topp", dict(p=0.8)),
    ("hardkv", dict(budget=64)),  # calibration and a cascade, fitted on the forked window
    ("rkv", dict(budget=150, buffer=8)),
])
def test_fork_equals_own_prefill(smollm2, prompt, name, params):
    model, _ = smollm2
    policy = kvpolicy.load(name, **params)
    shared = kvpolicy.hf.prefill(model, prompt, window=64)
    continuation = [11, 260, 314, 1217, 30]
    own = kvpolicy.hf.score(model, prompt, continuation, policy=policy)
    forked = kvpolicy.hf.score(model, prompt, continuation, policy=policy, prefilled=shared)
    assert torch.equal(own.logprobs, forked.logprobs)
    assert own.stats.kept == forked.stats.kept and own.stats.kv_bytes == forked.stats.kv_bytes
    assert own.stats.compressions == forked.stats.compressions > 0
    # The fork copied what it was given: a second fork sees the same prompt.
    again = kvpolicy.hf.score(model, prompt, continuation, policy=policy, prefilled=shared)
    assert torch.equal(again.logprobs, forked.logprobs)


def test_policies_accumulating_state_fork_from_a_prefill_with_those_states(smollm2, prompt):
    model, tok = smollm2
    policy = kvpolicy.load("h2o", budget=100)
    h2o = kvpolicy.hf.prepare(model, policy)
    plain = kvpolicy.hf.prefill(model, prompt, window=16)
    stateful = kvpolicy.hf.prefill(model, prompt, window=16, states=policy.ir.states)
    assert not plain.can_fork(h2o)  # accumulated attention needs every prompt query
    assert stateful.can_fork(h2o) and not stateful.can_fork(kvpolicy.hf.prepare(model, kvpolicy.load("tova")))
    assert not plain.can_fork(kvpolicy.hf.prepare(model, kvpolicy.load("snapkv", window=32)))  # 16 recorded
    assert plain.can_fork(kvpolicy.hf.prepare(model, kvpolicy.load("snapkv", window=16)))
    own = kvpolicy.hf.generate(model, tok, prompt, policy=policy, max_new_tokens=4, stop_at_eos=False)
    forked = kvpolicy.hf.generate(model, tok, prompt, policy=policy, max_new_tokens=4, stop_at_eos=False, prefilled=stateful)
    assert own.tokens == forked.tokens and own.stats.kept == forked.stats.kept
    refused = kvpolicy.hf.generate(model, tok, prompt, policy=policy, max_new_tokens=4, stop_at_eos=False, prefilled=plain)
    assert refused.tokens == own.tokens  # ran its own prefill


def test_a_prefill_of_another_prompt_is_refused(smollm2, prompt):
    model, _ = smollm2
    shared = kvpolicy.hf.prefill(model, prompt[:, :100])
    with pytest.raises(ValueError, match="another prompt"):
        kvpolicy.hf.score(model, prompt, [11], policy="snapkv", prefilled=shared)


def test_scoring_then_generating_under_one_policy_compresses_the_prompt_once(smollm2, prompt, monkeypatch):
    from kvpolicy.backends.hf.cache import PolicyCache

    model, tok = smollm2
    policy = kvpolicy.load("snapkv", budget=150, window=32)
    own = kvpolicy.hf.generate(model, tok, prompt, policy=policy, max_new_tokens=4, stop_at_eos=False)
    phases = []
    compress = PolicyCache.compress
    monkeypatch.setattr(PolicyCache, "compress", lambda cache, phase: (phases.append(phase), compress(cache, phase))[1])
    shared = kvpolicy.hf.prefill(model, prompt, window=32)
    kvpolicy.hf.score(model, prompt, [11, 260], policy=policy, prefilled=shared)
    forked = kvpolicy.hf.generate(model, tok, prompt, policy=policy, max_new_tokens=4, stop_at_eos=False, prefilled=shared)
    assert phases.count("prefill") == 1
    assert forked.tokens == own.tokens and forked.stats.kept == own.stats.kept
    kvpolicy.hf.score(model, prompt, [11], policy=kvpolicy.load("snapkv", budget=100, window=32), prefilled=shared)
    assert phases.count("prefill") == 2  # another policy (other params) compresses anew
