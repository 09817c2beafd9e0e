"""`kvpolicy eval --regime decode`: compression events fire during the
teacher-forced continuation on each policy's schedule, and sizing by PEAK
bytes holds every policy's peak within tolerance of the target."""
from __future__ import annotations

import json
import math

import pytest
import torch

import kvpolicy
from kvpolicy import cli
from kvpolicy.evaluate import decode, decode_tasks
from kvpolicy.evaluate import memory as mem

PROMPT, CONTINUATION = 40, 120  # short: every run here is a real model run on 160 tokens


@pytest.fixture(scope="module")
def prose(smollm2):
    _, tok = smollm2
    return decode_tasks.make("prose", tok, PROMPT, seed=0, index=0, continuation=CONTINUATION)


def run(smollm2, sample, policy):
    model, _ = smollm2
    return kvpolicy.hf.score(model, torch.tensor([sample.prompt_ids]), list(sample.answer_ids), policy=policy).stats


def rkv_schedule(prompt: int, steps: int, budget: int, buffer: int) -> tuple[list[int], int]:
    """R-KV's schedule, directly: after the prefill compression the cache
    holds min(prompt, budget) tokens; decode step s appends one; when it holds
    budget + buffer it is cut back to budget. (event steps, peak tokens)."""
    held, events, peak = min(prompt, budget), [], 0
    for step in range(1, steps + 1):
        held += 1
        peak = max(peak, held)
        if held >= budget + buffer:
            events.append(step)
            held = budget
    return events, peak


@pytest.mark.model
@pytest.mark.parametrize("name", ["rkv", "snapkv_decode"])
def test_events_fire_at_r_kv_schedule_and_peak_is_budget_plus_buffer(smollm2, prose, name):
    budget, buffer = 24, 16
    stats = run(smollm2, prose, kvpolicy.load(name, budget=budget, buffer=buffer, window=8))
    steps = len(prose.answer_ids) - 1  # the last continuation token is scored, never appended
    events, peak = rkv_schedule(PROMPT, steps, budget, buffer)
    assert len(events) >= 5
    assert stats.compression_steps == events
    per_token = stats.kv_bytes_full // (PROMPT + steps)
    assert stats.peak_kv_bytes == peak * per_token
    assert stats.kv_bytes == (budget + (steps - events[-1])) * per_token


@pytest.mark.model
@pytest.mark.parametrize("name, params", [
    ("snapkv_decode", {"budget": 24, "buffer": 16, "window": 8}),  # `when length >=`, flatten_max
    ("adakv_decode", {"budget": 24, "buffer": 20, "window": 8}),  # `every N steps`, flatten_sum, a per-layer total
    ("hardkv_decode", {"budget": 16, "buffer": 20, "window": 8}),  # calibrated top-p above a floor
    ("hardkv", {"budget": 16, "interval": 20, "window": 8}),  # a cascade: masks, then rewrites
    ("kivi", {}),  # int4 tiers
])
def test_chunked_teacher_forcing_is_one_forward_per_token(smollm2, prose, name, params):
    """score() feeds the tokens between two compressions in one forward; it
    must compress at the same steps, hold the same bytes at every step and
    score like one forward per token. Not bit for bit: a chunk's matmuls
    round differently, and a calibrated top-p can then swap a token at the
    edge of its set, so the scores are compared by KL."""
    model, _ = smollm2
    policy = kvpolicy.load(name, **params)
    prompt, continuation = torch.tensor([prose.prompt_ids]), list(prose.answer_ids)
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        chunked = kvpolicy.hf.score(model, prompt, continuation, policy=policy)
    finally:
        hook.remove()
    stepwise = kvpolicy.hf.score(model, prompt, continuation, policy=policy, stepwise=True)
    a, b = chunked.stats, stepwise.stats
    assert b.compressions > 1 and a.compression_steps == b.compression_steps
    assert len(forwards) <= 2 + len(b.compression_steps) + len(continuation) // 256  # the prefill, then a forward per chunk
    for field in ("kept", "kv_bytes", "peak_kv_bytes", "mean_kv_bytes", "mean_kv_bytes_full"):
        assert getattr(a, field) == getattr(b, field), field
    full = kvpolicy.hf.score(model, prompt, continuation, policy="full").logprobs

    def kl(ref, out):
        return float((ref.exp() * (ref - out)).sum(-1).mean())

    assert kl(stepwise.logprobs, chunked.logprobs) < 1e-3
    assert kl(full, chunked.logprobs) == pytest.approx(kl(full, stepwise.logprobs), rel=0.01)


@pytest.mark.model
def test_every_n_steps_events_fire_at_multiples_of_n(smollm2, prose):
    stats = run(smollm2, prose, kvpolicy.load("adakv_decode", budget=24, buffer=20, window=8))
    steps = len(prose.answer_ids) - 1
    assert stats.compression_steps == list(range(20, steps + 1, 20))


@pytest.mark.model
def test_prefill_guard_keeps_a_short_prompt_and_compresses_a_long_one(smollm2, prose, tmp_path):
    path = tmp_path / "guarded.kvp"
    path.write_text('policy guarded "" {\n  param budget: tokens = 16\n  keep recent = last budget\n'
                    '  compress at prefill when length > 24\n}\n')
    policy = kvpolicy.load(str(path))
    model, _ = smollm2
    answer = list(prose.answer_ids[:2])
    for prompt, held, events in [(24, 24, 0), (25, 16, 1), (PROMPT, 16, 1)]:  # `> 24`: 24 tokens fit, 25 do not
        stats = kvpolicy.hf.score(model, torch.tensor([prose.prompt_ids[:prompt]]), answer, policy=policy).stats
        assert {c for layer in stats.kept for c in layer} == {held + 1}, prompt  # + the one answer token appended
        assert (stats.compressions > 0) == bool(events), prompt


@pytest.mark.model
@pytest.mark.parametrize("name, fraction", [("rkv", 0.4), ("adakv_decode", 0.3), ("hardkv_decode", 0.45)])
def test_peak_sizing_holds_the_peak_within_tolerance(smollm2, prose, name, fraction):
    policy = kvpolicy.load(name, buffer=32)
    total = PROMPT + CONTINUATION - 1
    setting, sized = mem.plan_peak(name, policy, fraction, total, lambda p: (lambda s: s.peak_kv_bytes / s.kv_bytes_full)(run(smollm2, prose, p)))
    stats = run(smollm2, prose, sized)  # measured again, independently of the search's own probes
    peak = stats.peak_kv_bytes / stats.kv_bytes_full
    assert abs(peak - fraction) <= mem.tolerance(fraction), (setting.how, peak)
    assert "within tolerance" in setting.how and stats.compression_steps  # it compresses while decoding


@pytest.mark.parametrize("floor, target", [(0.30, 0.25), (0.10, 0.25)])
def test_peak_sizing_moves_p_both_ways_when_the_budget_cannot_reach_the_target(floor, target):
    """A top-p policy whose peak the budget cannot bring to the target: with
    a peak that grows with -ln(1 - p) (a top-p set's size on a power-law
    ranking), `floor` at p = 0.9, plus a little per budget token, the budget
    search plateaus at `floor` (above or below the target), and p is then
    lowered or raised until the peak is within tolerance."""
    policy = kvpolicy.load("hardkv_decode")  # p = 0.9 by default

    def peak(sized):
        values = sized.params()
        return floor * math.log(1 - values["p"]) / math.log(0.1) + 1e-5 * values["budget"]

    setting, sized = mem.plan_peak("hardkv_decode", policy, target, 1000, peak)
    assert abs(peak(sized) - target) <= mem.tolerance(target), setting.how
    assert (sized.params()["p"] < 0.9) == (floor > target)
    assert ("p lowered" if floor > target else "p raised") in setting.how


def test_decode_schedule_slack_is_the_first_guess():
    assert mem.decode_slack(kvpolicy.load("rkv", budget=100, buffer=30)) == 30
    assert mem.decode_slack(kvpolicy.load("hardkv", budget=100)) == 128 * 2  # rewrites every 2nd compression
    assert mem.decode_slack(kvpolicy.load("hardkv_decode", budget=100)) == 128
    assert mem.prefill_only(kvpolicy.load("snapkv")) and not mem.prefill_only(kvpolicy.load("snapkv_decode"))


def test_segments_cover_the_continuation():
    assert decode.segment_bounds(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert decode.segment_bounds(3, 4) == [(0, 1), (1, 2), (2, 3)]


def test_reasoning_prompts_are_deterministic_and_differ_by_index(smollm2):
    _, tok = smollm2
    a, b = decode_tasks.make("reasoning", tok, 0, 0, 0, 64), decode_tasks.make("reasoning", tok, 0, 0, 1, 64)
    assert a.prompt_ids == decode_tasks.make("reasoning", tok, 0, 0, 0, 64).prompt_ids != b.prompt_ids
    assert decode_tasks.needs_generation(a) and "<|im_start|>assistant" in tok.decode(list(a.prompt_ids))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--policy", "snapkv"], "snapkv compresses only at prefill: in the decode regime it holds every generated token, "
                                 "so it is not comparable at equal peak memory; its decode-time form is snapkv_decode"),
        (["--task", "passkey"], "task 'passkey' belongs to the prefill regime"),
        (["--continuation", "10"], "--continuation must be between 64 and 4096 tokens"),
        (["--policy", "kivi"], "kivi has no size param"),
    ],
)
def test_decode_bad_input_is_one_line(monkeypatch, capsys, tmp_path, flags, message):
    monkeypatch.setattr(kvpolicy.models, "load", lambda *a, **k: pytest.fail("the model was loaded before the input was validated"))
    assert cli.main(["eval", "--regime", "decode", "--json", str(tmp_path / "o.json"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.model
def test_decode_run_end_to_end(smollm2, tmp_path):
    out = tmp_path / "d.json"
    args = ["eval", "--regime", "decode", "--policy", "full,rkv", "--task", "reasoning", "--continuation", "160",
            "--memory", "0.5", "--json", str(out), "--threads", "1"]
    assert cli.main(args) == 0
    data = json.loads(out.read_text())
    sample = data["samples"][0]
    full, rkv = sample["runs"]
    assert len(sample["continuation_ids"]) == 160 and full["kl"] == 0 and full["top1"] == 1.0
    assert not set(sample["continuation_ids"]) & set(decode_tasks.end_tokens(smollm2[1]))  # the trace never ends its turn
    assert abs(rkv["peak"] - 0.5) <= mem.tolerance(0.5) and rkv["compression_steps"] and len(rkv["segments"]) == decode.SEGMENTS
    assert rkv["mean"] <= rkv["peak"]


@pytest.mark.model
def test_hardkv_cascade_keeps_its_cap_while_decoding(smollm2, prose, monkeypatch):
    """The shipped cascade's condensed tier re-selects what it holds at each
    rewrite (the checker refuses a capped tier without a select in a policy
    that compresses while decoding), so after every compression each head's
    condensed tier holds at most its cap. Observed in the HF engine's cache."""
    from kvpolicy.backends.hf.cache import PolicyLayer

    budget, window = 8, 4
    policy = kvpolicy.load("hardkv", budget=budget, window=window, interval=16, p=0.99)
    condensed = [t.name for t in policy.ir.cascade].index("condensed")
    held: list[int] = []
    apply = PolicyLayer.apply

    def observed(layer, *args, **kwargs):
        apply(layer, *args, **kwargs)
        held.append(int(((layer.tiers == condensed) & layer.valid).sum(dim=-1).max()))

    monkeypatch.setattr(PolicyLayer, "apply", observed)
    stats = run(smollm2, prose, policy)
    assert len(stats.compression_steps) >= 4 and held
    assert max(held) <= 2 * budget + window
    assert max(held) > budget  # the tier is in use (p = 0.99 fills it towards the cap), so the bound is not vacuous
