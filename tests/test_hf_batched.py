"""Compressing all layers in one engine call (backends/hf/batched.py) keeps
exactly what compressing them one by one keeps."""
import pytest
import torch

import kvpolicy
from kvpolicy.backends.hf.batched import rows_decide_alone
from kvpolicy.backends.hf.cache import PolicyCache
from kvpolicy.backends.torch import ModelShape, TorchPolicy

SHAPE = ModelShape(num_layers=4, num_q_heads=6, num_kv_heads=2, head_dim=8)


def test_which_policies_qualify():
    for name in ("h2o", "streaming_llm", "sliding_window"):
        assert rows_decide_alone(kvpolicy.load(name).ir), name
    # observed queries, head_mean, per-layer budgets, by-layer counts, calibration + cascade, K/V signals
    for name in ("snapkv", "tova", "adakv", "pyramidkv", "hardkv", "knorm"):
        assert not rows_decide_alone(kvpolicy.load(name).ir), name


def snapshot(cache: PolicyCache) -> list:
    out = []
    for layer in cache.layers:
        keys, values = layer.padded_kv()
        out.append((layer.valid.clone(), layer.positions.clone(), {k: v.clone() for k, v in layer.states.items()}, keys.clone(), values.clone()))
    return out


def assert_same(a: list, b: list) -> None:
    for (valid, positions, states, keys, values), (valid2, positions2, states2, keys2, values2) in zip(a, b):
        assert torch.equal(valid, valid2) and torch.equal(positions, positions2)
        assert states.keys() == states2.keys() and all(torch.equal(states[k], states2[k]) for k in states)
        assert torch.equal(keys, keys2) and torch.equal(values, values2)


def recording(monkeypatch, batch) -> list:
    """What each batch.compress call returned (True: it did the event)."""
    results, original = [], batch.compress
    monkeypatch.setattr(batch, "compress", lambda cache, phase: results.append(original(cache, phase)) or results[-1])
    return results


@pytest.mark.parametrize("name", ["h2o", "streaming_llm", "sliding_window"])
def test_one_call_keeps_what_layer_by_layer_keeps(name, monkeypatch):
    engine = TorchPolicy(kvpolicy.load(name, budget=24), SHAPE)
    caches = {batched: PolicyCache(engine) for batched in (True, False)}
    batched_events = recording(monkeypatch, caches[True].batch)
    caches[False].batch = None  # the per-layer path
    generator = torch.Generator().manual_seed(0)
    calls = {True: 0, False: 0}
    for step in range(12):
        n = 40 if step == 0 else 1
        phase = "prefill" if step == 0 else "decode"
        layers = [(torch.randn(1, 2, n, 8, generator=generator), torch.randn(1, 2, n, 8, generator=generator)) for _ in range(SHAPE.num_layers)]
        # States with many exact ties (a few distinct values), so tie-breaking is exercised.
        increments = [torch.randint(0, 3, (2, 64), generator=generator).float() for _ in range(SHAPE.num_layers)]
        for batched, cache in caches.items():
            cache.run.decode_step = step
            for layer, (keys, values), extra in zip(cache.layers, layers, increments):
                layer.update(keys, values)
                layer.states = {k: v + extra[:, : v.shape[1]] for k, v in layer.states.items()}
            before = cache.compressions
            cache.compress(phase)
            calls[batched] += cache.compressions - before
        assert_same(snapshot(caches[True]), snapshot(caches[False]))
    assert calls[True] == calls[False] > 0
    assert batched_events and all(batched_events)  # every event went through the one call
    assert all(count <= 24 for layer in caches[True].kept_counts() for count in layer)


def test_layers_of_different_lengths_fall_back_to_one_by_one(monkeypatch):
    engine = TorchPolicy(kvpolicy.load("streaming_llm", budget=16), SHAPE)
    cache = PolicyCache(engine)
    for index, layer in enumerate(cache.layers):
        size = 20 if index else 12  # layer 0 is not due: it holds fewer than the budget
        layer.update(torch.randn(1, 2, size, 8), torch.randn(1, 2, size, 8))
    used = recording(monkeypatch, cache.batch)
    cache.compress("prefill")
    assert used == [False]  # not batched ...
    assert [max(counts) for counts in cache.kept_counts()] == [12, 16, 16, 16]  # ... and still compressed
