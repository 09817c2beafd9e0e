"""Every method family of DESIGN.md's table is expressed by a shipped policy,
with the defaults of its paper (or of the kvpress press of the same name)."""
import pytest

import kvpolicy
from kvpolicy import ir, library
from kvpolicy.budgets import layer_counts


def load(name: str, **params) -> ir.Policy:
    return kvpolicy.load(name, **params).ir


def walk(node):
    """Every IR node reachable from node (expressions and selections)."""
    yield node
    if isinstance(node, ir.Node):
        for value in node.__dict__.values():
            yield from walk(value)
    elif isinstance(node, (tuple, list)):
        for item in node:
            yield from walk(item)
    elif isinstance(node, dict):
        for item in node.values():
            yield from walk(item)


def signals(policy: ir.Policy) -> set[str]:
    return {n.name for n in walk(policy) if isinstance(n, ir.Signal)}


def selections(policy: ir.Policy, kind) -> list:
    return [n for n in walk(policy) if isinstance(n, kind)]


def test_every_shipped_policy_checks():
    names = library.shipped_names()
    required = {"full", "streaming_llm", "snapkv", "pyramidkv", "adakv", "h2o", "tova", "knorm", "rkv", "topp", "hardkv", "hardkv_rkv"}
    assert required <= set(names)
    for name in names:
        assert load(name).name == name


def test_full_never_compresses():
    policy = load("full")
    assert not policy.compresses and not policy.keeps and not policy.cascade


def test_positional_streaming_llm():
    policy = load("streaming_llm")
    first, last = (k.select for k in policy.keeps)
    assert isinstance(first, ir.First) and first.count == 4  # kvpress n_sink
    assert isinstance(last, ir.Last) and first.count + last.count == policy.cap == 1024
    assert not signals(policy)
    assert load("streaming_llm", budget=100).keeps[1].select.count == 96


def test_positional_sliding_window():
    policy = load("sliding_window", budget=300)
    assert [type(k.select) for k in policy.keeps] == [ir.Last] and policy.keeps[0].select.count == 300


def test_one_shot_scored_snapkv():
    policy = load("snapkv")
    assert policy.observe == 64 and [t.kind for t in policy.triggers] == ["prefill"]
    pool = policy.scores["s"]
    assert isinstance(pool, ir.Apply) and pool.fn == "pool" and pool.options == {"op": "mean", "kernel": 5}
    assert pool.args[0] == ir.Signal(name="attn", options={"group": "mean", "queries": "none"})
    top = selections(policy, ir.TopK)[0]
    assert top.count == 1024 - 64


def test_one_shot_scored_tova_knorm_keydiff():
    tova = load("tova")
    assert tova.observe == 1 and tova.scores["s"].fn == "head_mean"
    knorm = load("knorm")
    assert knorm.scores["s"] == ir.Negate(operand=ir.Signal(name="key_norm"))
    assert knorm.observe is None  # key norms need no queries
    assert load("keydiff").scores["s"] == ir.Negate(operand=ir.Signal(name="key_sim"))


def test_accumulated_h2o():
    policy = load("h2o")
    (state,) = policy.states
    assert state.update == ir.Signal(name="attn", options={"group": "sum", "queries": "none"}) and state.decay == 1.0
    heavy = selections(policy, ir.TopK)[0]
    assert heavy.score == ir.Ref(name="acc", kind="state") and heavy.count == 512
    step = [t for t in policy.triggers if t.kind == "every"][0]
    assert step.every == 1 and step.min_length == 1025


def test_accumulated_rkv_importance_minus_redundancy():
    policy = load("rkv")
    assert "redundancy" in signals(policy) and "attn" in signals(policy)
    score = policy.scores["s"]
    assert score.fn == "normalize" and score.args[0].operator == "-"
    when = [t for t in policy.triggers if t.kind == "when"][0]
    assert when.min_length == 1024 + 128


def test_layer_budgets_pyramidkv():
    policy = load("pyramidkv")
    keep = policy.keeps[1]
    assert keep.by_layer == ir.LayerShape(kind="pyramid", beta=20.0)
    count, layers, beta = keep.select.count, 30, 20.0
    counts = layer_counts(count, keep.by_layer, layers)
    # PyramidKV, written directly: min = C / beta, max = 2C - min, linear in between.
    low = count / beta
    high = 2 * count - low
    expected = [int(high - (high - low) * i / (layers - 1) + 0.5) for i in range(layers)]
    assert counts == expected
    assert abs(sum(counts) / layers - count) <= 1


def test_head_adaptive_adakv():
    keep = load("adakv").keeps[1]
    assert keep.per == "layer" and keep.floor == 0.2  # kvpress alpha_safeguard


def test_top_p_uncalibrated_and_calibrated():
    topp = load("topp")
    assert not topp.calibrations
    (nucleus,) = selections(topp, ir.TopP)
    assert nucleus.p == 0.9 and nucleus.score.fn == "softmax"
    hard = load("hardkv")
    (cal,) = hard.calibrations
    assert cal.scope == ("layer", "kv_head") and cal.init == 0.5 and cal.clamp == (0.001, 10)
    assert cal.solver == ir.Solver(kind="adam", lr=0.01, steps=50, tol=0.01)
    assert cal.target.fn == "top_p_count" and cal.target.options["p"] == 0.9
    # the sparse tier's selection, and the condensed tier's re-selection at each rewrite
    sparse, condensed = selections(hard, ir.TopP)
    assert ir.Ref(name="T", kind="calibration") in list(walk(hard.scores["s"]))
    assert sparse.limit == condensed.limit == 2 * 1024 - 1 and sparse.p == condensed.p == 0.9


def test_threshold_selection():
    text = 'policy t "" {\n observe queries last 4\n score s = attn()\n keep hot = s > 0.01\n compress at prefill\n}'
    (keep,) = kvpolicy.compile_text(text).keeps
    assert keep.select == ir.Threshold(score=ir.Ref(name="s", kind="score"), operator=">", value=0.01)


def test_tiers_hardkv_cascade_and_kivi():
    hard = load("hardkv")
    dense, sparse, condensed = hard.cascade
    assert dense.source == "new" and dense.layout == "contiguous"
    assert sparse.source == "dense" and sparse.layout == "mask" and sparse.select is not None
    assert condensed.source == "sparse" and condensed.every == 2 and condensed.layout == "flatten_sum"
    assert condensed.cap == 2 * 1024 + 32
    kivi = load("kivi")
    assert [t.store for t in kivi.cascade] == ["native", "int4"]


def test_merge_cam():
    merge = load("cam").merge
    assert merge.into == "nearest" and merge.weight == ir.Ref(name="s", kind="score")


@pytest.mark.parametrize("name", library.shipped_names())
def test_shipped_policy_is_one_screen(name):
    assert len(library.shipped_text(name).splitlines()) <= 40
