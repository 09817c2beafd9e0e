"""Every checker rule fires, with the right message at the right position."""
import pytest

import kvpolicy
from tests.helpers import assert_error_at, edited, errors_of, policy_text, where

SNAP = """
param budget: tokens = 1024
param window: tokens = 32
param p: prob = 0.9
observe queries last window
score s = pool(max, 7, attn(group = mean))
keep recent = last window
keep selected = top_k(s, budget - window) per kv_head
cap budget
compress at prefill
"""


def test_baseline_is_valid():
    ir = kvpolicy.compile_text(policy_text(SNAP))
    assert ir.keeps[1].select.count == 1024 - 32


# ----------------------------------------------------------------- names


def test_unknown_signal_suggests_the_close_one():
    text = edited(SNAP, "attn(group = mean)", "atn(group = mean)")
    d = assert_error_at(text, "atn", "unknown signal 'atn'")
    assert "did you mean 'attn'?" in d.message


def test_unknown_name_suggests_a_defined_one():
    text = edited(SNAP, "top_k(s, budget - window)", "top_k(s, budget - windw)")
    d = assert_error_at(text, "windw", "unknown name 'windw'")
    assert "did you mean 'window'?" in d.message


def test_unknown_enum_value():
    text = edited(SNAP, "group = mean", "group = mx")
    d = assert_error_at(text, "mx", "unknown group 'mx'")
    assert "did you mean 'max'?" in d.message


def test_unknown_keyword_argument():
    text = edited(SNAP, "group = mean", "grp = mean")
    d = assert_error_at(text, "grp", "attn has no argument 'grp'")
    assert "did you mean 'group'?" in d.message


def test_unknown_unit():
    text = edited(SNAP, "param window: tokens = 32", "param window: tokns = 32")
    d = assert_error_at(text, "tokns", "unknown unit 'tokns'")
    assert "did you mean 'tokens'?" in d.message


def test_duplicate_definition_names_the_first():
    text = edited(SNAP, "param p: prob = 0.9", "param p: prob = 0.9\nparam window: tokens = 8")
    d = assert_error_at(text, "window", "'window' is already defined on line 3", occurrence=2)
    assert "param" in d.message


def test_duplicate_keep_name():
    text = edited(SNAP, "keep selected =", "keep recent =")
    assert_error_at(text, "recent", "keep 'recent' is already defined on line", occurrence=2)


def test_builtin_name_cannot_be_redefined():
    text = edited(SNAP, "score s = pool", "score softmax = pool")
    assert_error_at(text, "softmax", "'softmax' is a built-in function")


def test_cycle_between_scores():
    text = policy_text("""
    param budget: tokens = 64
    score a = b + 1
    score b = a * 2
    keep k = top_k(a, budget)
    compress at prefill
    """)
    diagnostics = errors_of(text)
    assert any("depends on itself" in d.message for d in diagnostics)
    line, col = where(text, "a * 2")
    assert any((d.span.line, d.span.col) == (line, col) for d in diagnostics if "depends on itself" in d.message)


def test_signal_named_without_call():
    text = edited(SNAP, "pool(max, 7, attn(group = mean))", "attn")
    assert_error_at(text, "attn\n", "is a built-in function; call it")


# ----------------------------------------------------------------- units and ranges


def test_top_k_count_must_be_tokens_not_prob():
    text = edited(SNAP, "top_k(s, budget - window)", "top_k(s, p)")
    assert_error_at(text, "p)", "top_k expects a count in tokens, got a prob (p)")


def test_top_p_rejects_a_token_count():
    text = edited(SNAP, "top_k(s, budget - window) per kv_head", "top_p(s, 1024, limit = 8) per kv_head")
    assert_error_at(text, "1024, limit", "is a probability in (0, 1], got 1024")


def test_adding_a_prob_to_tokens_is_a_unit_error():
    text = edited(SNAP, "budget - window)", "budget - p)")
    assert_error_at(text, "budget - p", "cannot subtract prob from tokens")


def test_multiplying_tokens_by_tokens():
    text = edited(SNAP, "cap budget", "cap budget * window")
    assert_error_at(text, "budget * window", "cannot multiply tokens by tokens")


@pytest.mark.parametrize("value", ["1.5", "0", "-0.1"])
def test_prob_param_range(value):
    text = edited(SNAP, "param p: prob = 0.9", f"param p: prob = {value}")
    assert_error_at(text, value + "\n", "is a probability in (0, 1]")


def test_negative_budget():
    text = edited(SNAP, "param budget: tokens = 1024", "param budget: tokens = -5")
    assert_error_at(text, "-5", "must be a non-negative number of tokens, got -5")


def test_fractional_tokens_param():
    text = edited(SNAP, "param budget: tokens = 1024", "param budget: tokens = 10.5")
    assert_error_at(text, "10.5", "whole number of tokens")


def test_computed_negative_count():
    # 16 - 32 tokens left for top_k: the budget cannot hold the window.
    text = edited(SNAP, "param budget: tokens = 1024", "param budget: tokens = 16")
    d = assert_error_at(text, "budget - window", "must be a non-negative number of tokens, got -16")
    assert "top_k" in d.message


def test_steps_at_least_one():
    text = edited(SNAP, "compress at prefill", "compress every 0 steps")
    assert_error_at(text, "0 steps", "must be at least 1 step")


def test_huge_number():
    text = edited(SNAP, "param budget: tokens = 1024", "param budget: tokens = 1e400")
    assert_error_at(text, "1e400", "too large")


def test_division_by_zero():
    text = edited(SNAP, "cap budget", "cap budget / 0")
    assert_error_at(text, "0\n", "division by zero")


def test_pool_kernel_must_be_odd():
    text = edited(SNAP, "pool(max, 7,", "pool(max, 6,")
    assert_error_at(text, "6,", "must be odd")


def test_threshold_needs_a_plain_number():
    text = edited(SNAP, "top_k(s, budget - window) per kv_head", "s > budget")
    assert_error_at(text, "s > budget", "a threshold must be a plain number")


def test_top_p_needs_nonnegative_scores():
    text = policy_text("""
    param p: prob = 0.9
    observe queries last 8
    score z = attn_logits()
    keep k = top_p(z, p)
    compress at prefill
    """)
    assert_error_at(text, "z, p", "top_p needs non-negative scores")


# ----------------------------------------------------------------- caps and budgets


def test_keep_set_exceeding_cap():
    text = edited(SNAP, "top_k(s, budget - window)", "top_k(s, budget)")
    d = assert_error_at(text, "cap budget", "can hold 1056 tokens per kv head")
    assert "more than cap 1024" in d.message


def test_unbounded_top_p_under_a_cap():
    text = edited(SNAP, "top_k(s, budget - window) per kv_head", "top_p(s, p) per kv_head")
    assert_error_at(text, "cap budget", "has no upper bound; give top_p a limit")


def test_top_p_floor_is_tokens_and_at_most_the_limit():
    text = edited(SNAP, "top_k(s, budget - window) per kv_head", "top_p(s, 0.9, limit = 10, floor = 20) per kv_head")
    assert_error_at(text, "floor = 20", "top_p's floor (20) is more than its limit (10)")
    text = edited(SNAP, "top_k(s, budget - window) per kv_head", "top_p(s, 0.9, limit = 10, floor = 0.5) per kv_head")
    errors_of(text)  # not a whole number of tokens
    text = edited(SNAP, "top_k(s, budget - window) per kv_head", "top_p(s, 0.9, limit = budget - window, floor = window) per kv_head")
    sel = kvpolicy.compile_text(text, "t.kvp").keeps[-1].select
    assert (sel.limit, sel.floor) == (1024 - 32, 32)


def test_top_p_with_a_limit_fits():
    text = edited(SNAP, "top_k(s, budget - window) per kv_head", "top_p(s, p, limit = budget - window) per kv_head")
    ir = kvpolicy.compile_text(text)
    assert ir.keeps[1].select.limit == 992


def test_window_filling_the_cap():
    text = edited(SNAP, "param window: tokens = 32", "param window: tokens = 1024")
    diagnostics = errors_of(text)
    messages = [d.message for d in diagnostics]
    assert any("nothing is left" in m for m in messages), messages


def test_pyramid_peak_counts_against_the_cap():
    # (2 - 1/20) x 992 = 1934.4 at layer 0, plus the window, exceeds cap 1024.
    text = edited(SNAP, "per kv_head", "per kv_head by layer pyramid(beta = 20)")
    assert_error_at(text, "cap budget", "can hold 1966.4 tokens per kv head")


def test_per_layer_keep_under_a_per_head_cap():
    text = edited(SNAP, "per kv_head", "per layer")
    assert_error_at(text, "cap budget", "'per layer' keep lets one head take")


def test_floor_needs_per_layer():
    text = edited(SNAP, "per kv_head", "per kv_head floor 0.2")
    assert_error_at(text, "floor 0.2", "floor applies to a budget shared per layer")


# ----------------------------------------------------------------- statements


def test_selection_without_compress():
    text = edited(SNAP, "compress at prefill", "")
    assert_error_at(text, "keep recent", "never compresses")


def test_compress_without_selection():
    text = policy_text("compress at prefill")
    assert_error_at(text, "compress", "nothing to do")


def test_attention_needs_observed_queries():
    text = edited(SNAP, "observe queries last window", "")
    assert_error_at(text, "attn(group", "reads observed queries; add 'observe queries last N'")


def test_accumulated_state_needs_no_observe():
    text = policy_text("""
    param budget: tokens = 64
    state acc += attn(group = sum) decay 0.9
    keep heavy = top_k(acc, budget)
    compress every 1 steps when length > budget
    """)
    ir = kvpolicy.compile_text(text)
    assert ir.states[0].decay == 0.9 and ir.triggers[0].min_length == 65


def test_prefill_trigger_takes_a_length_guard():
    ir = kvpolicy.compile_text(edited(SNAP, "compress at prefill", "compress at prefill when length > budget + window"))
    assert [(t.kind, t.min_length) for t in ir.triggers] == [("prefill", 1024 + 32 + 1)]
    ir = kvpolicy.compile_text(edited(SNAP, "compress at prefill", "compress at prefill when length >= budget, every 8 steps"))
    assert [(t.kind, t.every, t.min_length) for t in ir.triggers] == [("prefill", None, 1024), ("every", 8, None)]


def test_prefill_guard_must_be_a_lower_bound():
    text = edited(SNAP, "compress at prefill", "compress at prefill when length < budget")
    assert_error_at(text, "at prefill when", "compress when length > N (or >= N): compression is for long sequences")


def test_prefill_guard_is_in_tokens():
    text = edited(SNAP, "compress at prefill", "compress at prefill when length > p")
    assert_error_at(text, "p\n", "the length bound expects a count in tokens, got a prob (p)")


def test_second_observe_statement():
    text = edited(SNAP, "observe queries last window", "observe queries last window\nobserve queries last 8")
    assert_error_at(text, "observe queries last 8", "at most one 'observe' statement (the first is on line 5)")


def test_keep_needs_a_selection():
    text = edited(SNAP, "top_k(s, budget - window) per kv_head", "s")
    assert_error_at(text, "s\n", "keep needs a selection")


def test_empty_index_range():
    text = edited(SNAP, "per kv_head", "per kv_head in layers 5..2")
    assert_error_at(text, "5..2", "empty range 5..2")


def test_restriction_word():
    text = edited(SNAP, "per kv_head", "per kv_head in heads 0..1")
    d = assert_error_at(text, "heads", "keep can be restricted 'in layers' or 'in kv_heads'")
    assert "did you mean 'kv_heads'?" in d.message


def test_per_granularity_word():
    text = edited(SNAP, "per kv_head", "per kv_haed")
    d = assert_error_at(text, "kv_haed", "unknown granularity 'kv_haed'")
    assert "did you mean 'kv_head'?" in d.message


def test_merge_target():
    text = edited(SNAP, "compress at prefill", "merge evicted into nerest\ncompress at prefill")
    d = assert_error_at(text, "nerest", "unknown merge target 'nerest'")
    assert "did you mean 'nearest'?" in d.message


def test_overrides_checked_like_source():
    assert kvpolicy.compile_text(policy_text(SNAP), params={"budget": "256"}).params["budget"].value == 256
    text = policy_text(SNAP)
    d = assert_error_at(text, "1024", "must be a non-negative number of tokens, got -5 (set to -5)", budget="-5")
    assert d
    d = assert_error_at(text, "t ", "no param 'budgt' to set; did you mean 'budget'?", budgt="5")
    assert d


def test_every_error_is_reported_at_once():
    text = policy_text("""
    param budget: tokens = -1
    param p: prob = 2
    observe queries last 8
    score s = atn()
    keep k = top_k(s, p)
    compress every 0 steps
    """)
    diagnostics = errors_of(text)
    assert len(diagnostics) >= 4
    lines = [d.span.line for d in diagnostics]
    assert lines == sorted(lines)


# ----------------------------------------------------------------- calibration

CAL = """
param p: prob = 0.9
observe queries last 8
score z = attn_logits(group = max)
calibrate T per (layer, kv_head) {
  target top_p_count(softmax(z), p)
  metric softmax(pool(max, 7, z) / T)
  init 0.5
  clamp [0.001, 10]
}
score s = softmax(pool(max, 7, z) / T)
keep k = top_p(s, p)
compress at prefill
"""


def test_calibration_baseline():
    ir = kvpolicy.compile_text(policy_text(CAL))
    c = ir.calibrations[0]
    assert c.scope == ("layer", "kv_head") and c.init == 0.5 and c.clamp == (0.001, 10)
    assert c.solver.kind == "adam" and c.fit.kind == "once"


def test_calibration_target_must_not_use_the_fitted_value():
    text = edited(CAL, "target top_p_count(softmax(z), p)", "target top_p_count(softmax(z / T), p)")
    assert_error_at(text, "top_p_count", "must not depend on T")


def test_calibration_metric_must_use_the_fitted_value():
    text = edited(CAL, "metric softmax(pool(max, 7, z) / T)", "metric softmax(pool(max, 7, z))")
    assert_error_at(text, "softmax(pool(max, 7, z))", "the metric must use T")


def test_calibration_needs_a_target():
    text = edited(CAL, "  target top_p_count(softmax(z), p)\n", "")
    assert_error_at(text, "T per", "needs a 'target' line")


def test_calibration_clamp_and_init():
    text = edited(CAL, "clamp [0.001, 10]", "clamp [10, 0.1]")
    assert_error_at(text, "clamp", "is empty")
    text = edited(CAL, "init 0.5", "init 50")
    assert_error_at(text, "init 50", "outside the clamp")


def test_calibration_scope():
    text = edited(CAL, "per (layer, kv_head)", "per (layer, head)")
    assert_error_at(text, "head)", "unknown scope 'head'")


# ----------------------------------------------------------------- cascades

CASCADE = """
param budget: tokens = 64
observe queries last 8
score s = attn()
keep sink = first 1
cascade {
  tier dense: new
  tier sparse: from dense, select top_k(s, budget), layout mask
  tier condensed: from sparse every 2 compressions, select top_k(s, budget), layout flatten_max, cap 2 * budget
}
compress every 16 steps
"""


def test_cascade_baseline():
    ir = kvpolicy.compile_text(policy_text(CASCADE))
    assert [t.name for t in ir.cascade] == ["dense", "sparse", "condensed"]
    assert ir.cascade[2].every == 2 and ir.cascade[2].layout == "flatten_max" and ir.cascade[2].cap == 128


def test_first_tier_holds_new_tokens():
    text = edited(CASCADE, "tier dense: new", "tier dense: layout mask")
    assert_error_at(text, "dense:", "the first tier holds the new tokens")


def test_tier_from_unknown():
    text = edited(CASCADE, "from sparse every", "from sprase every")
    d = assert_error_at(text, "sprase", "tier 'sprase' is not an earlier tier")
    assert "did you mean 'sparse'?" in d.message


def test_unknown_layout():
    text = edited(CASCADE, "layout flatten_max", "layout flaten_max")
    d = assert_error_at(text, "flaten_max", "unknown layout 'flaten_max'")
    assert "did you mean 'flatten_max'?" in d.message


def test_duplicate_tier():
    text = edited(CASCADE, "tier condensed:", "tier sparse:")
    assert_error_at(text, "sparse:", "tier 'sparse' is already defined", occurrence=2)


def test_tier_cap_exceeded():
    text = edited(CASCADE, "cap 2 * budget", "cap 2 * budget\n  tier last: from condensed, select top_k(s, 100), cap 50")
    assert_error_at(text, "cap 50", "more than tier cap 50")


def test_tier_without_select_cannot_keep_its_cap_while_decoding():
    unbounded = CASCADE.replace("select top_k(s, budget), layout flatten_max", "layout flatten_max")
    text = policy_text(unbounded)
    assert_error_at(text, "cap 2 * budget", "tier condensed has a cap but no select")
    once = policy_text(unbounded.replace("compress every 16 steps", "compress at prefill"))
    assert kvpolicy.compile_text(once).cascade[2].select is None  # compressed once, it holds what its source selected


def test_scored_keep_outside_the_cascade():
    text = edited(CASCADE, "keep sink = first 1", "keep sink = first 1\nkeep top = top_k(s, 4)")
    assert_error_at(text, "keep top", "belongs in a tier's 'select'")


# ----------------------------------------------------------------- syntax errors


def test_unknown_statement_keyword():
    text = policy_text("param budget: tokens = 8\nkepp x = first 1\ncompress at prefill")
    d = assert_error_at(text, "kepp", "unknown statement 'kepp'")
    assert "did you mean 'keep'?" in d.message


def test_reserved_word_as_name():
    text = policy_text("param keep: tokens = 8")
    assert_error_at(text, "keep:", "reserved word")


def test_unclosed_block():
    text = 'policy t "x" {\n  param budget: tokens = 8\n'
    d = errors_of(text)[0]
    assert "not closed" in d.message and d.span.line == 2


def test_rendered_report_has_caret_under_the_error():
    text = edited(SNAP, "attn(group = mean)", "atn(group = mean)")
    with pytest.raises(kvpolicy.PolicyError) as info:
        kvpolicy.compile_text(text, "mine.kvp")
    line, col = where(text, "atn")
    rendered = info.value.render().split("\n")
    assert rendered[0].startswith(f"mine.kvp:{line}:{col}: error: unknown signal 'atn'")
    caret_line = rendered[2]
    assert caret_line.index("^") - 4 == col - 1 and caret_line.count("^") == 3
    assert rendered[-1] == "1 error in mine.kvp"
