"""Peer parity: our snapkv, streaming_llm, knorm and tova keep the same prompt
tokens at prefill as kvpress's presses (issue 4).

kvpress 0.5.5 needs transformers<5.3, so it runs in .venv-peer (`make peer`)
through bench/peer_kvpress.py; without that venv these tests are skipped.

Same model (SmolLM2-135M, float32), same 400-token prompt (Apache-2.0 text),
same kept count K per kv head (our budget = K; kvpress compression_ratio =
1 - K/400, so its int(400 x (1 - ratio)) = K), same windows (SnapKV: 64
queries, mean pool of 5; StreamingLLM: 4 sinks). Where the two definitions
coincide the kept sets must be equal; the two places where they do not are
asserted for exactly what they are:

- knorm: in layer 0 a key's norm does not depend on its position (RoPE is a
  rotation), so repeats of a token tie exactly. We give ties to the earlier
  token; kvpress's torch.topk leaves the order of ties unspecified. Asserted:
  both keep every token scoring above the K-th score, none below it, and the
  same number of tied ones.
- snapkv: kvpress pools (avg, kernel 5, zero padding) the window's attention
  over the tokens *before* the window only; ours pools over every token, so
  the 2 tokens just before the window (B = {L-w-2, L-w-1}) also average in
  attention paid to window tokens, so their scores can only be higher than
  kvpress's. Every other token's score is the same on both sides. Asserted:
  we keep every B token kvpress keeps, and outside B we keep a subset of
  what kvpress keeps.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import peer  # noqa: E402

if not peer.peer_available():
    pytest.skip(f"peer venv {peer.PEER_PYTHON} is absent (`make peer` builds it)", allow_module_level=True)

import kvpolicy  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.slow]

TOKENS = 400
WINDOW = 64
CASES = {  # our policy -> (our params besides budget, kvpress press, its params)
    "snapkv": ({"window": WINDOW}, "snapkv", {"window_size": WINDOW, "kernel_size": 5}),
    "streaming_llm": ({"sinks": 4}, "streaming_llm", {"n_sink": 4}),
    "knorm": ({}, "knorm", {}),
    "tova": ({}, "tova", {}),
}
FRACTIONS = (0.25, 0.5)


@pytest.fixture(scope="module")
def setup(smollm2):
    model, tok = smollm2
    ids = peer.prompt_ids(tok, TOKENS)
    runs = [{"press": press, "compression_ratio": 1 - f, "params": params} for f in FRACTIONS for _, press, params in CASES.values()]
    answer = peer.run_peer(str(kvpolicy.models.path("smollm2-135m")), ids, runs)
    theirs = {(r["press"], round(1 - r["compression_ratio"], 6)): r for r in answer["runs"]}
    return model, ids, theirs


def ours_and_theirs(setup, policy: str, fraction: float):
    model, ids, theirs = setup
    extra, press, _ = CASES[policy]
    budget = int(TOKENS * fraction)
    ours = peer.ours_prefill(model, ids, kvpolicy.load(policy).with_params(budget=budget, **extra))
    peer_run = theirs[(press, round(fraction, 6))]
    assert all(len(h) == budget for layer in peer_run["kept"] for h in layer), "kvpress kept a different count"
    assert all(len(h) == budget for layer in ours["kept"] for h in layer), "we kept a different count"
    return ours, peer_run, budget


def pairs(ours, peer_run):
    for layer, (ours_layer, theirs_layer) in enumerate(zip(ours["kept"], peer_run["kept"], strict=True)):
        for head, (a, b) in enumerate(zip(ours_layer, theirs_layer, strict=True)):
            yield layer, head, set(a), set(b)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("policy", ["streaming_llm", "tova"])
def test_same_kept_tokens(setup, policy, fraction):
    ours, peer_run, _ = ours_and_theirs(setup, policy, fraction)
    differ = [(layer, head, sorted(a - b), sorted(b - a)) for layer, head, a, b in pairs(ours, peer_run) if a != b]
    assert not differ, f"{policy}: (layer, head, only ours, only kvpress): {differ[:5]}"
    # kvpress's ScorerPress evicts for real, as we do: both hold K of L tokens.
    assert ours["kv_bytes"] * TOKENS == ours["kv_bytes_full"] * int(TOKENS * fraction)
    assert peer_run["kv_bytes"] == ours["kv_bytes"]


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_knorm_same_kept_tokens_up_to_exact_ties(setup, fraction):
    from kvpolicy.backends.hf import PolicyCache, attention, prepare

    ours, peer_run, budget = ours_and_theirs(setup, "knorm", fraction)
    model, ids, _ = setup
    cache = PolicyCache(prepare(model, "full"))  # every key, to score ties by the shared definition
    with torch.inference_mode(), attention.active(cache):
        model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    exact = 0
    for layer, head, a, b in pairs(ours, peer_run):
        if a == b:
            exact += 1
            continue
        score = -cache.layers[layer].keys[0, head].float().norm(dim=-1)  # both sides: keep the smallest norms
        kth = torch.sort(score, descending=True).values[budget - 1]
        tied = set(torch.nonzero(torch.isclose(score, kth, rtol=1e-6, atol=0)).flatten().tolist())
        above = set(torch.nonzero(score > kth).flatten().tolist()) - tied
        assert above <= a and above <= b, f"layer {layer} head {head}: a token scoring above the K-th is dropped"
        assert (a - b) | (b - a) <= tied, f"layer {layer} head {head}: kept sets differ beyond tied scores: {sorted(a - b)} vs {sorted(b - a)}"
    assert exact >= 0.9 * 30 * 3  # ties are rare (layer 0, repeated tokens)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_snapkv_same_kept_tokens_outside_the_window_edge(setup, fraction):
    ours, peer_run, budget = ours_and_theirs(setup, "snapkv", fraction)
    edge = {TOKENS - WINDOW - 2, TOKENS - WINDOW - 1}  # where the pooling definitions differ
    window = set(range(TOKENS - WINDOW, TOKENS))
    exact = 0
    for layer, head, a, b in pairs(ours, peer_run):
        assert window <= a and window <= b
        if a == b:
            exact += 1
            continue
        assert (a ^ b) & edge, f"layer {layer} head {head}: sets differ without an edge token: {sorted(a - b)} vs {sorted(b - a)}"
        # Our edge scores add attention paid to window tokens (>= 0) where kvpress pads
        # zeros, and every other score is the same: we keep at least kvpress's edge
        # tokens, and what we keep outside the edge is a subset of what it keeps there.
        assert b & edge <= a & edge, f"layer {layer} head {head}: kvpress keeps an edge token we drop"
        assert a - edge <= b - edge, f"layer {layer} head {head}: rankings outside the edge disagree: {sorted(a - b - edge)} vs {sorted(b - a - edge)}"
    assert exact >= 0.5 * 30 * 3
