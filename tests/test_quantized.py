"""Stored tiers (int8/int4/fp16/bf16): the codec against direct formulas, the
layer that holds mixed stores, and `kivi` on SmolLM2 (bytes really held,
output close to full)."""
import math

import pytest
import torch

import kvpolicy
from kvpolicy import library
from kvpolicy.backends.hf.quantized import GROUP_SIZE, dequantize, pack_int4, quantize, quantize_keys, quantize_values, unpack_int4
from kvpolicy.backends.hf.stores import StoredLayer
from kvpolicy.backends.torch import ModelShape, TorchPolicy

G = GROUP_SIZE


def direct(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One group (a 1-D tensor): (reconstruction, scale), asymmetric min/max."""
    lo, hi = x.min(), x.max()
    scale = (hi - lo) / (2**bits - 1)
    codes = torch.zeros_like(x) if scale == 0 else torch.round((x - lo) / scale)
    return codes * scale + lo, scale


def with_outlier_channel(shape) -> torch.Tensor:
    x = torch.randn(shape)
    x[..., 3] *= 50  # keys have outlier channels; per-channel groups keep them from widening the others
    return x


@pytest.mark.parametrize("bits", [4, 8])
def test_keys_per_channel_in_groups_of_tokens(bits):
    torch.manual_seed(0)
    keys = with_outlier_channel((2, 2 * G + 6, 8))  # the last token group is partial
    out = dequantize(quantize_keys(keys, bits), torch.float32)
    for h in range(keys.shape[0]):
        for c in range(keys.shape[2]):
            for start in range(0, keys.shape[1], G):
                expected, scale = direct(keys[h, start : start + G, c], bits)
                got = out[h, start : start + G, c]
                assert torch.allclose(got, expected, atol=1e-5), (h, c, start)
                assert (got - keys[h, start : start + G, c]).abs().max() <= scale / 2 * (1 + 1e-4) + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_values_per_token_in_groups_of_channels(bits):
    torch.manual_seed(1)
    values = torch.randn(2, 5, 2 * G + 6)  # the last channel group is partial
    out = dequantize(quantize_values(values, bits), torch.float32)
    for h in range(values.shape[0]):
        for t in range(values.shape[1]):
            for start in range(0, values.shape[2], G):
                expected, scale = direct(values[h, t, start : start + G], bits)
                got = out[h, t, start : start + G]
                assert torch.allclose(got, expected, atol=1e-5), (h, t, start)
                assert (got - values[h, t, start : start + G]).abs().max() <= scale / 2 * (1 + 1e-4) + 1e-6


def test_int4_packs_two_codes_per_byte_and_round_trips():
    codes = torch.randint(0, 16, (3, 5, 7), dtype=torch.uint8)  # odd length: the last byte is half used
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 4)
    assert torch.equal(unpack_int4(packed, 7), codes)
    assert torch.equal(packed[..., 0] & 0x0F, codes[..., 0]) and torch.equal(packed[..., 0] >> 4, codes[..., 1])


def test_bytes_of_codes_scales_and_zero_points():
    x = torch.randn(3, 100, 64)
    groups_of_tokens, groups_of_channels = math.ceil(100 / G), math.ceil(64 / G)
    for bits, code_bytes in ((8, 3 * 100 * 64), (4, 3 * 100 * 32)):
        keys, values = quantize_keys(x, bits), quantize_values(x, bits)
        assert keys.nbytes == code_bytes + 2 * 4 * 3 * 64 * groups_of_tokens  # float32 scale + zero per (head, channel, group)
        assert values.nbytes == code_bytes + 2 * 4 * 3 * 100 * groups_of_channels  # per (head, token, group)


def test_constant_group_is_exact():
    x = torch.full((1, G, 4), 2.5)
    q = quantize_keys(x, 4)
    assert torch.equal(dequantize(q, torch.float32), x) and bool((q.scale == 0).all())


def test_holes_do_not_widen_a_group():
    torch.manual_seed(2)
    keys = torch.randn(2, G, 4)
    held = torch.ones(2, G, dtype=torch.bool)
    held[0, -5:] = False
    keys[0, -5:] = 1e6  # padding garbage
    out = dequantize(quantize_keys(keys, 4, held), torch.float32)
    for c in range(4):
        expected, _ = direct(keys[0, :-5, c], 4)
        assert torch.allclose(out[0, :-5, c], expected, atol=1e-5)


def test_quantize_groups_along_any_dim():
    torch.manual_seed(3)
    x = torch.randn(4, 10)
    out = dequantize(quantize(x, 8, dim=0, group=3), torch.float32)
    for col in range(10):
        for start in range(0, 4, 3):
            expected, _ = direct(x[start : start + 3, col], 8)
            assert torch.allclose(out[start : start + 3, col], expected, atol=1e-5)


# --------------------------------------------------------------------- the layer


def one_step_bound(x: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Error allowed after up to two (re-)quantizations: each is within half a
    step of its group, and a group's range is at most the range along `dim`."""
    span = x.amax(dim=dim, keepdim=True) - x.amin(dim=dim, keepdim=True)
    return span / (2**bits - 1) * 1.01 + 1e-6


def test_stored_layer_moves_slots_into_int8_and_compacts():
    torch.manual_seed(4)
    H, D, T = 2, 64, 40
    layer = StoredLayer(H, [], ["native", "int8"])
    k0, v0 = torch.randn(1, H, T, D), torch.randn(1, H, T, D)
    layer.update(k0, v0)
    assert torch.equal(layer.padded_kv()[0], k0[0])  # new tokens are native
    assert layer.nbytes() == 2 * H * T * D * 4

    layer.apply(torch.ones(H, T, dtype=torch.bool), True, None, torch.ones(H, T, dtype=torch.long))
    int8_chunk = 2 * H * T * D + 2 * 4 * H * D * math.ceil(T / G) + 2 * 4 * H * T * math.ceil(D / G)
    assert layer.nbytes() == int8_chunk and layer.native_length() == 0

    k1, v1 = torch.randn(1, H, 3, D), torch.randn(1, H, 3, D)
    layer.update(k1, v1)
    ((heads, keys, values),) = layer.attention_groups()  # what attention reads
    assert heads == slice(0, H) and keys.shape == (1, H, T + 3, D) and layer.positions[0].tolist() == list(range(T + 3))
    assert torch.equal(keys[:, :, T:], k1) and torch.equal(values[:, :, T:], v1)
    assert ((keys[:, :, :T] - k0).abs() <= one_step_bound(k0, 2, 8)).all()  # keys: per channel
    assert ((values[:, :, :T] - v0).abs() <= one_step_bound(v0, 3, 8)).all()  # values: per token
    assert layer.nbytes() == int8_chunk + 2 * H * 3 * D * 4

    # Head 0 evicts its 10 oldest tokens; everything left moves to int8.
    kept = torch.ones(H, T + 3, dtype=torch.bool)
    kept[0, :10] = False
    layer.apply(kept, True, None, torch.ones(H, T + 3, dtype=torch.long))
    assert layer.valid.sum(dim=1).tolist() == [T + 3 - 10, T + 3] and layer.physical == T + 3
    assert layer.native_length() == 0
    original_k, original_v = torch.cat([k0, k1], dim=2)[0], torch.cat([v0, v1], dim=2)[0]
    keys, values = layer.padded_kv()
    for h in range(H):
        slots = layer.valid[h]
        positions = layer.positions[h, slots]
        assert sorted(positions.tolist()) == list(range(10 if h == 0 else 0, T + 3))
        assert ((keys[h, slots] - original_k[h, positions]).abs() <= one_step_bound(original_k[h], 0, 8)).all()
        assert ((values[h, slots] - original_v[h, positions]).abs() <= one_step_bound(original_v[h, positions], 1, 8)).all()
    assert bool((layer.positions[0, ~layer.valid[0]] == -1).all())  # head 0's padding


def test_mask_layout_keeps_dropped_tokens_held():
    torch.manual_seed(5)
    H, D, T = 2, 32, 20
    layer = StoredLayer(H, [], ["native", "fp16"])
    layer.update(torch.randn(1, H, T, D), torch.randn(1, H, T, D))
    kept = torch.ones(H, T, dtype=torch.bool)
    kept[1, 5:8] = False
    layer.apply(kept, False, None, torch.ones(H, T, dtype=torch.long))  # a mask layout: nothing compacted
    assert layer.physical == T and layer.valid.sum(dim=1).tolist() == [T, T - 3]
    assert layer.nbytes() == 2 * H * T * D * 2  # fp16, the dropped tokens still held
    keys, _ = layer.padded_kv()
    assert keys.dtype == torch.float32  # upcast on read


def test_fp16_store_rounds_like_a_cast():
    torch.manual_seed(6)
    layer = StoredLayer(1, [], ["native", "bf16"])
    k, v = torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    layer.update(k, v)
    layer.apply(torch.ones(1, 6, dtype=torch.bool), True, None, torch.ones(1, 6, dtype=torch.long))
    keys, values = layer.padded_kv()
    assert torch.equal(keys, k[0].bfloat16().float()) and torch.equal(values, v[0].bfloat16().float())


# --------------------------------------------------------------------- unsupported combinations


CASCADE = """policy t "t" {{
  cascade {{
    tier fresh: new{fresh}
    tier old: from fresh{old}
  }}
  compress every 4 steps
}}
"""


@pytest.mark.parametrize(("fresh", "old", "tier", "message"), [
    (", store int8", "", "fresh", "tier fresh: store int8 is not supported on the tier that receives new tokens"),
    (", layout flatten_sum", ", store int4", "old", "tier old: store int4 cannot be combined with layout flatten_sum (tier fresh)"),
])
def test_unsupported_store_is_reported_at_its_tier(tmp_path, fresh, old, tier, message):
    text = CASCADE.format(fresh=fresh, old=old)
    path = tmp_path / "t.kvp"
    path.write_text(text)
    pol = kvpolicy.load(str(path))
    with pytest.raises(kvpolicy.PolicyError) as info:
        TorchPolicy(pol, ModelShape(2, 4, 2, 8))
    line = next(i for i, row in enumerate(text.splitlines(), 1) if f"tier {tier}:" in row)
    assert f"{path}:{line}:5: error: {message}" in info.value.render()


# --------------------------------------------------------------------- kivi on SmolLM2

LICENSE = open("/usr/share/common-licenses/Apache-2.0", encoding="utf-8").read()


def chunks_moved(new_tokens: int, residual: int) -> tuple[list[int], int]:
    """kivi's schedule for a prompt of T tokens: (chunk sizes after the prompt
    chunk, tokens left native). Decode step k feeds generated token k and
    compresses when k % residual == 0; the last token is never fed."""
    chunks, fresh = [], 0
    for step in range(1, new_tokens):
        fresh += 1
        if step % residual == 0:
            chunks.append(fresh)
            fresh = 0
    return chunks, fresh


@pytest.mark.model
def test_kivi_holds_packed_int4_bytes(smollm2):
    model, tok = smollm2
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    native = 4  # float32
    res = kvpolicy.hf.generate(model, tok, LICENSE[:1200], policy=kvpolicy.load("kivi", residual=4), max_new_tokens=11, stop_at_eos=False)
    s = res.stats
    later, fresh = chunks_moved(s.new_tokens, 4)
    assert later == [4, 4] and fresh == 2

    def int4_chunk(tokens: int) -> int:
        codes = 2 * heads * tokens * math.ceil(dim / 2)  # K and V, two codes per byte
        key_scales = 2 * native * heads * dim * math.ceil(tokens / G)  # scale + zero per channel and token group
        value_scales = 2 * native * heads * tokens * math.ceil(dim / G)  # scale + zero per token and channel group
        return codes + key_scales + value_scales

    tokens = s.prompt_tokens + s.new_tokens - 1
    expected = layers * (sum(int4_chunk(n) for n in [s.prompt_tokens, *later]) + 2 * heads * fresh * dim * native)
    assert s.kv_bytes == expected
    assert s.kv_bytes_full == layers * 2 * heads * dim * native * tokens
    assert all(count == tokens for layer in s.kept for count in layer)  # nothing evicted
    assert s.kv_bytes < 0.25 * s.kv_bytes_full


@pytest.mark.model
def test_kivi_stays_closer_to_full_than_eviction_at_equal_memory(smollm2, tmp_path):
    """Teacher-forced KL to the full cache over the text's own next tokens:
    int8 keys/values lose less than int4, and int4 loses less than keeping
    sinks + a recent window (StreamingLLM) in at least the bytes kivi holds."""
    model, tok = smollm2
    ids = tok(LICENSE[:3000], return_tensors="pt").input_ids
    prompt, continuation = ids[:, :-12], ids[0, -12:].tolist()
    reference = kvpolicy.hf.score(model, prompt, continuation, policy="full").logprobs

    def kl(policy):
        scored = kvpolicy.hf.score(model, prompt, continuation, policy=policy)
        return float((reference.exp() * (reference - scored.logprobs)).sum(-1).mean()), scored.stats

    int4, int4_stats = kl(kvpolicy.load("kivi"))
    int8_path = tmp_path / "kivi8.kvp"
    int8_path.write_text(library.shipped_text("kivi").replace("store int4", "store int8"))
    int8, int8_stats = kl(kvpolicy.load(str(int8_path)))
    tokens = prompt.shape[1] + len(continuation) - 1
    budget = math.ceil(int4_stats.kv_bytes / int4_stats.kv_bytes_full * tokens)
    evicting, evicting_stats = kl(kvpolicy.load("streaming_llm", budget=budget))
    assert evicting_stats.kv_bytes >= int4_stats.kv_bytes > 0
    assert int4_stats.kv_bytes < int8_stats.kv_bytes < int8_stats.kv_bytes_full
    assert 0 < int8 < int4 < evicting
