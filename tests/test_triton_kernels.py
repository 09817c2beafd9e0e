"""Generated Triton kernels against the torch backend, under TRITON_INTERPRET=1.

Selection, compaction, merge-on-evict, quantized tiers and decode attention,
on hypothesis-drawn small shapes (lengths off the block size, GQA 1 and >1,
empty selections, everything kept, one token). The oracle is the torch
backend's own function in each case. Exact where the issue asks for exact
(kept sets, copies, codes); 1e-5 relative elsewhere. Few, large program
instances: the interpreter pays per executed op per program.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy.backends.hf import quantized
from kvpolicy.backends.torch import merge as torch_merge
from kvpolicy.backends.torch import select as torch_select
from kvpolicy.backends.triton import launch, render
from kvpolicy.program import Select

FEW = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def mod():
    """One module holding every template (fixed kernels of any policy)."""
    return render.load(render.render(kvpolicy.load("snapkv"), every_kernel=True))


@pytest.fixture(autouse=True)
def small_blocks():
    """Blocks of 16/32 tokens, so drawn lengths span several blocks and end mid-block."""
    before = (launch.BLOCKS.cap, launch.BLOCKS.pairs)
    launch.BLOCKS.cap, launch.BLOCKS.pairs = 32, 16
    yield
    launch.BLOCKS.cap, launch.BLOCKS.pairs = before


@st.composite
def rows(draw, max_heads=3, max_t=70):
    """(scores, valid, candidates, protected) for a few heads; scores on a
    coarse grid half the time, so exact ties (and their tie rule) occur."""
    h = draw(st.integers(1, max_heads))
    t = draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(h, t, generator=g)
    if draw(st.booleans()):
        scores = torch.floor(scores * 8) / 8
    valid = torch.rand(h, t, generator=g) > draw(st.sampled_from([0.0, 0.2]))
    protected = (torch.rand(h, t, generator=g) < draw(st.sampled_from([0.0, 0.1]))) & valid
    candidates = valid & ~protected
    return scores, valid, candidates, protected


@FEW
@given(rows(), st.integers(0, 80))
def test_top_k_equals_torch(mod, data, k):
    scores, valid, candidates, _ = data
    got = launch.top_k(mod, scores, candidates, k)
    assert torch.equal(got, torch_select.top_k(scores, candidates, k))


@FEW
@given(rows(), st.sampled_from([0.05, 0.3, 0.5, 0.9, 0.99, 1.0]), st.sampled_from([None, 0, 3, 20]))
def test_top_p_equals_torch(mod, data, p, limit):
    scores, valid, candidates, protected = data
    # fp32 sums in another order may legitimately flip a candidate whose
    # cumulative mass lies at p: such draws are left out (float64 check).
    mass = torch.where(valid, scores, torch.zeros_like(scores)).double()
    mass = mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)
    kept = (mass * protected).sum(-1, keepdim=True)
    ordered = torch.sort(torch.where(candidates, mass, torch.full_like(mass, -1.0)), dim=-1, descending=True, stable=True).values.clamp(min=0)
    assume(bool(((kept + ordered.cumsum(-1) - (p - 1e-6)).abs() > 1e-5).all()))
    assume(bool(((kept - (p - 1e-6)).abs() > 1e-5).all()))
    got = launch.top_p(mod, scores, candidates, protected, valid, p, limit)
    assert torch.equal(got, torch_select.top_p(scores, candidates, protected, valid, p, limit))


@FEW
@given(rows(), st.sampled_from([">", ">=", "<", "<="]), st.sampled_from([0.0, 0.25, 0.5, 1.0]))
def test_threshold_equals_torch(mod, data, op, value):
    scores, _, candidates, _ = data
    assert torch.equal(launch.threshold(mod, scores, candidates, op, value), torch_select.threshold(scores, candidates, op, value))


@FEW
@given(rows(), st.integers(0, 40), st.booleans())
def test_first_and_last_equal_torch(mod, data, n, first):
    scores, valid, _, _ = data
    h, t = valid.shape
    key_pos = torch.stack([torch.randperm(t, generator=torch.Generator().manual_seed(i)) for i in range(h)])  # slots out of logical order
    sel = Select("first" if first else "last", counts=(n,))  # one layer
    assert torch.equal(launch.positional(mod, first, n, valid, key_pos), torch_select.positional(sel, valid, key_pos, 0))


@FEW
@given(rows(max_heads=4), st.integers(1, 30), st.sampled_from([None, 0.2, 0.5]))
def test_per_layer_top_k_equals_torch(mod, data, k, floor):
    scores, _, candidates, _ = data
    got = launch.per_layer_top_k(mod, scores, candidates, k, floor)
    assert torch.equal(got, torch_select.per_layer_top_k(scores, candidates, k, floor))


def test_selection_edge_rows(mod):
    """Nothing to select, everything kept, one token, all tied."""
    one = torch.ones(1, 1, dtype=torch.bool)
    assert torch.equal(launch.top_k(mod, torch.rand(1, 1), one, 5), one)
    none = torch.zeros(2, 40, dtype=torch.bool)
    assert not launch.top_k(mod, torch.rand(2, 40), none, 5).any()
    tied = torch.full((2, 45), 0.5)
    cand = torch.ones(2, 45, dtype=torch.bool)
    assert torch.equal(launch.top_k(mod, tied, cand, 7), torch_select.top_k(tied, cand, 7))
    assert launch.top_k(mod, tied, cand, 45).all()
    assert not launch.top_k(mod, tied, cand, 0).any()
    neg = torch.tensor([[float("-inf"), -1.0, float("-inf"), 2.0]])
    c = torch.tensor([[True, False, True, True]])
    assert torch.equal(launch.top_k(mod, neg, c, 2), torch_select.top_k(neg, c, 2))


@FEW
@given(rows(), st.sampled_from(["flatten_max", "flatten_sum"]), st.sampled_from([torch.float32, torch.float16]))
def test_compaction_copies_kept_rows_bit_exact(mod, data, layout, dtype):
    _, valid, _, _ = data
    h, t = valid.shape
    x = torch.randn(h, t, 24).to(dtype)
    idx, count = launch.compact(mod, valid)
    assert torch.equal(count, valid.sum(-1))
    for head in range(h):
        want = valid[head].nonzero().squeeze(-1)
        assert torch.equal(idx[head, : len(want)], want) and bool((idx[head, len(want):] == -1).all())
    out = launch.gather_kept(mod, x, idx, count, layout)
    if layout == "flatten_max":
        for head in range(h):
            n = int(count[head])
            assert torch.equal(out[head, :n], x[head][valid[head]]) and not out[head, n:].any()
    else:
        assert torch.equal(out, torch.cat([x[head][valid[head]] for head in range(h)]))


@FEW
@given(rows(), st.sampled_from(["nearest", "top"]), st.booleans())
def test_merge_on_evict_equals_torch(mod, data, into, weighted):
    scores, valid, _, _ = data
    h, t = valid.shape
    g = torch.Generator().manual_seed(t)
    keys, values = torch.randn(h, t, 8, generator=g), torch.randn(h, t, 8, generator=g)
    kept = valid & (torch.rand(h, t, generator=g) < 0.5)
    weights = scores.masked_fill(~valid, float("-inf")) if weighted else None
    want = torch_merge.merge_evicted(keys, values, valid, kept, weights, into)
    got = launch.merge_evicted(mod, keys, values, valid, kept, weights, into)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.integers(1, 2), st.integers(1, 75), st.sampled_from([16, 24, 40]), st.sampled_from([8, 4]), st.booleans(), st.integers(0, 10**6))
def test_quantized_codes_equal_torch(mod, h, t, d, bits, with_holes, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(h, t, d, generator=g) * 3
    x[..., 0] = torch.round(x[..., 0] * 2) / 2  # exact halves: the rounding rule decides their codes
    held = torch.rand(h, t, generator=g) > 0.3 if with_holes else None
    for dim in (1, 2):
        want = quantized.quantize(x, bits, dim=dim, held=None if (held is None or dim == 2) else held[:, :, None])
        got = launch.quantize(mod, x, bits, dim, quantized.GROUP_SIZE, held=held if dim == 1 else None)
        assert torch.equal(got.codes, want.codes)
        assert torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)


def test_rounding_rule_is_half_to_even(mod):
    """The shared rule: torch.round's half-to-even, reproduced bit for bit."""
    x = torch.tensor([[[0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 13.0, 15.0]]]).repeat(1, 1, 4)
    # one group per token row: zero 0, scale 1 at 15 levels (int4), so codes are round(x) exactly
    for bits in (4, 8):
        got = launch.quantize(mod, x / 2, bits, 2, 32)
        want = quantized.quantize(x / 2, bits, dim=2)
        assert torch.equal(got.codes, want.codes)


@FEW
@given(st.integers(1, 2), st.sampled_from([(1, 1), (4, 2), (6, 3), (8, 1)]), st.integers(0, 50), st.integers(0, 40), st.integers(0, 10**6))
def test_decode_over_tiers_equals_dense_attention(mod, batch, heads, dense_len, quant_len, seed):
    hq, hkv = heads
    d = 32
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, d, generator=g)
    dense_k, dense_v = torch.randn(batch, hkv, 50, d, generator=g), torch.randn(batch, hkv, 50, d, generator=g)
    lens_a = torch.randint(0, dense_len + 1, (batch, hkv), generator=g)
    lens_a[0, 0] = 0  # an empty head in this tier
    qk, qv = torch.randn(batch, hkv, 40, d, generator=g), torch.randn(batch, hkv, 40, d, generator=g)
    lens_b = torch.randint(0, quant_len + 1, (batch, hkv), generator=g)
    kq = [quantized.quantize_keys(qk[b], 4) for b in range(batch)]
    vq = [quantized.quantize_values(qv[b], 4) for b in range(batch)]
    tier_b = launch.Tier(
        keys=torch.stack([k.codes for k in kq]), values=torch.stack([v.codes for v in vq]), lens=lens_b, bits=4,
        key_scale=torch.stack([k.scale for k in kq]), key_zero=torch.stack([k.zero for k in kq]),
        value_scale=torch.stack([v.scale for v in vq]), value_zero=torch.stack([v.zero for v in vq]),
    )
    out, lse = launch.decode(mod, q, [launch.Tier(dense_k, dense_v, lens_a), tier_b], d)
    deq_k = torch.stack([quantized.dequantize(k, torch.float32) for k in kq])
    deq_v = torch.stack([quantized.dequantize(v, torch.float32) for v in vq])
    for b in range(batch):
        for h in range(hq):
            kv = h // (hq // hkv)
            k = torch.cat([dense_k[b, kv, : lens_a[b, kv]], deq_k[b, kv, : lens_b[b, kv]]])
            v = torch.cat([dense_v[b, kv, : lens_a[b, kv]], deq_v[b, kv, : lens_b[b, kv]]])
            if len(k) == 0:
                assert not out[b, h].any() and lse[b, h] == float("-inf")
                continue
            s = (k @ q[b, h]) / math.sqrt(d)
            torch.testing.assert_close(out[b, h], torch.softmax(s, 0) @ v, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[b, h], torch.logsumexp(s, 0), rtol=1e-5, atol=1e-5)
