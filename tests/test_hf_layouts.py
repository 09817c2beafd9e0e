"""flatten_sum against flatten_max in the HF cache: the same tokens kept in
the same order, the same generations, and bytes that follow the sum of the
heads' counts instead of heads x the fullest head."""
import re

import pytest
import torch

import kvpolicy
from kvpolicy.backends.hf import decoding
from kvpolicy.backends.hf.cache import PolicyCache
from kvpolicy.backends.hf.layer import PolicyLayer
from kvpolicy.policy import read_source

LAYOUTS = ("flatten_max", "flatten_sum")
LICENSE = open("/usr/share/common-licenses/Apache-2.0", encoding="utf-8").read()


def head_contents(layer: PolicyLayer) -> list[list[tuple]]:
    """Per kv head, its valid slots in slot order as (position, key row, value row, state)."""
    keys, values = layer.padded_kv()
    out = []
    for h in range(layer.num_kv_heads):
        slots = layer.valid[h].nonzero().flatten().tolist()
        out.append([(int(layer.positions[h, s]), keys[h, s].tolist(), values[h, s].tolist(), float(layer.states["acc"][h, s])) for s in slots])
    return out


def random_kv(generator, heads: int, n: int, dim: int = 4):
    return torch.randn(1, heads, n, dim, generator=generator), torch.randn(1, heads, n, dim, generator=generator)


def test_layer_layouts_hold_the_same_tokens_and_flatten_sum_holds_fewer_bytes():
    generator = torch.Generator().manual_seed(0)
    heads, dim = 3, 4
    bytes_per_slot = 2 * dim * 4  # K and V of one token in one head, float32
    layers = {layout: PolicyLayer(heads, ["acc"], cascade=False, layout=layout) for layout in LAYOUTS}
    differed = False
    for step in range(8):
        keys, values = random_kv(generator, heads, 6 if step == 0 else 1 + step % 2, dim)
        drop_draw = torch.rand(heads, 64, generator=generator)  # one draw per logical position, shared by both layouts
        for layer in layers.values():
            layer.update(keys, values)  # flatten_max: also carries out the previous compaction
            layer.states["acc"] = layer.positions.float().masked_fill(~layer.valid, 0.0)  # a state naming its token
        assert head_contents(layers["flatten_max"]) == head_contents(layers["flatten_sum"])
        for layer in layers.values():
            dropped = (drop_draw.gather(1, layer.positions.clamp(min=0)) < 0.3) & layer.valid
            # Odd steps only mask (holes inside a head's slots), even steps compact.
            layer.apply(layer.valid & ~dropped, physical=step % 2 == 0, values=None, tiers=None)
        wide, packed = layers["flatten_max"], layers["flatten_sum"]
        stored = packed.stored_slots()
        assert (stored >= packed.valid.sum(dim=1)).all() and int(stored.max()) == packed.physical
        assert packed.nbytes() == int(stored.sum()) * bytes_per_slot
        # flatten_max keeps the old tensors until the next append (or settle) compacts them.
        assert wide.nbytes() == heads * int(wide.stored_slots()[0]) * bytes_per_slot
        if step % 2 == 0:  # right after compaction each head stores exactly what it keeps
            assert stored.tolist() == packed.valid.sum(dim=1).tolist()
            differed |= len(set(stored.tolist())) > 1
        if not packed.segments.uniform:  # attention reads each head's own segment
            for h, (group, group_keys, _) in enumerate(packed.attention_groups()):
                assert group == slice(h, h + 1) and group_keys.shape[2] == int(stored[h])
    assert differed  # the heads really held different counts at some point
    wide.settle()
    assert wide.nbytes() == heads * wide.physical * bytes_per_slot
    assert head_contents(wide) == head_contents(packed)


def test_deferred_compaction_appends_exactly_what_settling_first_does():
    generator = torch.Generator().manual_seed(1)
    keys, values = random_kv(generator, 3, 9)
    layers = [PolicyLayer(3, [], cascade=False) for _ in range(2)]
    kept = torch.rand(3, 9, generator=generator) < 0.6
    new_keys, new_values = random_kv(generator, 3, 2)
    for settle_first, layer in zip((True, False), layers):
        layer.update(keys, values)
        layer.apply(kept, physical=True, values=None, tiers=None)
        if settle_first:
            layer.settle()
        layer.update(new_keys, new_values)
    (first_keys, first_values), (fused_keys, fused_values) = (layer.padded_kv() for layer in layers)
    assert torch.equal(first_keys, fused_keys) and torch.equal(first_values, fused_values)
    assert torch.equal(layers[0].positions, layers[1].positions) and torch.equal(layers[0].valid, layers[1].valid)
    width = int(kept.sum(dim=1).max())
    assert first_keys.shape == (3, width + 2, 4)
    for h in range(3):  # each head: its kept slots in order, holes up to the fullest head, then the new tokens
        count = int(kept[h].sum())
        assert torch.equal(first_keys[h, :count], keys[0, h, kept[h]])
        assert torch.equal(first_keys[h, width:], new_keys[0, h])


# ----------------------------------------------------------------- on SmolLM2


def variants(name: str) -> dict[str, str]:
    """The shipped policy's source in both layouts (one of them is the shipped text)."""
    text = read_source(name)[0]
    if re.search(r"layout flatten_(max|sum)", text):  # a policy's or a tier's layout
        make = lambda layout: re.sub(r"layout flatten_(max|sum)", f"layout {layout}", text)  # noqa: E731
    else:
        make = lambda layout: text.replace("\n  compress", f"\n  layout {layout}\n  compress")  # noqa: E731
    out = {layout: make(layout) for layout in LAYOUTS}
    assert len(set(out.values())) == 2
    return out


@pytest.fixture
def caches(monkeypatch):
    """Every PolicyCache kvpolicy.hf builds, in order."""
    made = []

    class Recording(PolicyCache):
        def __init__(self, engine):
            super().__init__(engine)
            made.append(self)

    monkeypatch.setattr(decoding, "PolicyCache", Recording)
    return made


def kept_sets(cache) -> list[list[set[int]]]:
    return [[set(layer.positions[h][layer.valid[h]].tolist()) for h in range(layer.num_kv_heads)] for layer in cache.layers]


def test_head_adaptive_policies_ship_flatten_sum():
    for name in ("adakv", "topp"):
        assert kvpolicy.load(name).ir.layout == "flatten_sum"


CASES = [
    ("adakv", {"budget": 96, "window": 16}, 10),  # per-layer budget, prefill only
    ("topp", {"interval": 3}, 10),  # top-p, compacting again while decoding
    ("hardkv", {"budget": 64, "interval": 2, "condense": 2}, 7),  # cascade (ships flatten_sum), its condensed tier re-selects
    ("h2o", {"budget": 96}, 6),  # equal counts, per-step eviction, accumulated attention
]


@pytest.mark.model
@pytest.mark.parametrize("name,params,new", CASES, ids=[c[0] for c in CASES])
def test_flatten_sum_generates_exactly_what_flatten_max_does(smollm2, caches, tmp_path, name, params, new):
    model, tok = smollm2
    ids = tok(LICENSE[:2400], return_tensors="pt").input_ids
    bytes_per_slot = 2 * (model.config.hidden_size // model.config.num_attention_heads) * next(model.parameters()).element_size()
    if name != "h2o":
        assert read_source(name)[0] in variants(name).values()  # one of the two is what ships
    runs = {}
    for layout, text in variants(name).items():
        path = tmp_path / f"{name}_{layout}.kvp"
        path.write_text(text)
        res = kvpolicy.hf.generate(model, tok, ids, policy=kvpolicy.load(str(path), **params), max_new_tokens=new, stop_at_eos=False)
        runs[layout] = (res, caches[-1])
    (wide, wide_cache), (packed, packed_cache) = runs["flatten_max"], runs["flatten_sum"]
    assert packed.tokens == wide.tokens
    assert kept_sets(packed_cache) == kept_sets(wide_cache)
    assert packed.stats.kept == wide.stats.kept
    stored = [layer.stored_slots().tolist() for layer in packed_cache.layers]
    assert packed.stats.kv_bytes == sum(map(sum, stored)) * bytes_per_slot
    assert wide.stats.kv_bytes == sum(layer.num_kv_heads * layer.physical for layer in wide_cache.layers) * bytes_per_slot
    if name != "hardkv":  # no mask tier: every stored slot is a kept token
        assert stored == packed.stats.kept
    if name == "h2o":
        assert packed.stats.kv_bytes == wide.stats.kv_bytes
    else:
        assert any(len(set(counts)) > 1 for counts in packed.stats.kept)
        assert packed.stats.kv_bytes < wide.stats.kv_bytes


@pytest.mark.model
def test_flatten_sum_teacher_forced_logits_match_flatten_max(smollm2, tmp_path):
    model, tok = smollm2
    ids = tok(LICENSE[:2000], return_tensors="pt").input_ids
    prompt, continuation = ids[:, :-12], ids[0, -12:].tolist()
    logprobs = {}
    for layout, text in variants("topp").items():
        path = tmp_path / f"topp_{layout}.kvp"
        path.write_text(text)
        logprobs[layout] = kvpolicy.hf.score(model, prompt, continuation, policy=kvpolicy.load(str(path), interval=4)).logprobs
    assert torch.allclose(logprobs["flatten_sum"], logprobs["flatten_max"], atol=1e-4)
