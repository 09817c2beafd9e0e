"""Every shipped policy's generated kernels against the torch backend
(TRITON_INTERPRET=1), and what the renderer promises: params are kernel
arguments, modules are cached by their code, user names never reach code
unchecked, a construct no template lowers is a positioned error.

Shapes are drawn by hypothesis: GQA groups of 1 and 3, lengths off the block
size (blocks of 32 here), holes, one token. Scores must agree to 1e-5
relative and decisions exactly; scores are continuous random values, so
exact ties between distinct tokens (which fp32 rounding could order
differently) do not occur in these draws.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy import library
from kvpolicy.backends.torch import LayerInputs, ModelShape, TorchPolicy
from kvpolicy.backends.torch.evaluate import Evaluator
from kvpolicy.backends.triton import launch, lowering, render
from kvpolicy.backends.triton.engine import TritonPolicy, build, rendered_expressions
from kvpolicy.diagnostics import PolicyError
from kvpolicy.errors import KvpolicyError
from kvpolicy.program import Calibrate

SMALL = {"budget": 24, "window": 6, "recent": 8, "sinks": 2, "residual": 16, "buffer": 4}
DRAWS = settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def small(name: str):
    params = kvpolicy.load(name).ir.params
    return kvpolicy.load(name, **{k: v for k, v in SMALL.items() if k in params})


@pytest.fixture(autouse=True)
def small_blocks():
    before = launch.BLOCKS.cap
    launch.BLOCKS.cap = 32
    yield
    launch.BLOCKS.cap = before


@st.composite
def layers(draw):
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 3]))
    t = draw(st.sampled_from([1, 37, 70]))
    seed = draw(st.integers(0, 2**31 - 1))
    holes = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    d = 16
    valid = torch.ones(hkv, t, dtype=torch.bool)
    if holes and t > 1:
        valid = torch.rand(hkv, t, generator=g) > 0.2
        valid[:, -1] = True
    window = min(6, t)
    return dict(
        shape=ModelShape(1, hkv * group, hkv, d),
        keys=torch.randn(hkv, t, d, generator=g), values=torch.randn(hkv, t, d, generator=g), valid=valid,
        queries=torch.randn(hkv * group, window, d, generator=g), query_pos=torch.arange(t - window, t),
        states={"acc": torch.rand(hkv, t, generator=g)},
    )


def _inputs(layer) -> LayerInputs:
    hkv, t = layer["valid"].shape
    return LayerInputs(layer["keys"].clone(), layer["values"].clone(), layer["valid"].clone(), torch.arange(t).expand(hkv, t).clone(),
                       states={k: v.clone() for k, v in layer["states"].items()})


def _close(got: torch.Tensor, want: torch.Tensor):
    if not want.is_floating_point():
        assert torch.equal(got, want)
        return
    got = got.reshape(want.shape)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)) and torch.equal(got[~torch.isfinite(got)], want[~torch.isfinite(want)])
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", library.shipped_names())
@DRAWS
@given(layer=layers())
def test_shipped_policy_kernels_equal_torch(name, layer):
    """Every scoring step's output, then the whole decision (kept set, tiers,
    merged values), against the torch backend on the same layer."""
    policy = small(name)
    torch_engine, triton_engine = TorchPolicy(policy, layer["shape"]), TritonPolicy(policy, layer["shape"])
    runs = []
    for engine in (torch_engine, triton_engine):
        run = engine.new_sequence()
        engine.observe(run, 0, layer["queries"], layer["query_pos"])
        runs.append(run)
    want = torch_engine.compress_layer(runs[0], 0, _inputs(layer))
    got = triton_engine.compress_layer(runs[1], 0, _inputs(layer))
    # The scores each step produced, with the temperatures the torch run fitted.
    inputs = _inputs(layer)
    triton_engine._observed(runs[1], 0, inputs)
    calibration = {c.name: runs[0].temperatures[(c.name, 0)].expand(inputs.num_kv) for c in policy.ir.calibrations}
    rendered = triton_engine.rendered
    buffers = launch.run_steps(triton_engine.kernels, rendered.steps, inputs, calibration)
    program = triton_engine.program
    evaluator = Evaluator(program, inputs, calibration)
    for cal in program.of(Calibrate):
        written = next(c for c in policy.ir.calibrations if c.name == cal.name).target
        _close(buffers[rendered.lowering.tensor(written).id], evaluator.value(cal.target))
    for node, written in rendered_expressions(program).items():
        _close(buffers[rendered.lowering.token_scores(written).id], evaluator.token_scores(node))
    assert torch.equal(got.kept, want.kept) and got.physical == want.physical
    assert (got.tiers is None) == (want.tiers is None) and (want.tiers is None or torch.equal(got.tiers, want.tiers))
    assert (got.values is None) == (want.values is None)
    if want.values is not None:
        torch.testing.assert_close(got.values, want.values, rtol=1e-5, atol=1e-6)


USER_POLICY = """
policy mine "a user's own mix of the same constructs" {
  param budget: tokens = 20
  param window: tokens = 4
  observe queries last window
  score a = pool(max, 3, attn_logits(group = sum)) / 4
  score s = normalize(exp(a) - 0.5 * value_norm() + key_sim())
  keep sink = first 2
  keep recent = last window
  keep chosen = top_k(s, budget - window - 2) | s > 0.2 per kv_head
  merge evicted into top weighted by s
  compress at prefill
}
"""


@DRAWS
@given(layer=layers())
def test_a_user_policy_with_the_same_constructs_compiles_and_agrees(layer):
    policy = kvpolicy.compile_text(USER_POLICY, "mine.kvp")
    a, b = TorchPolicy(policy, layer["shape"]), TritonPolicy(policy, layer["shape"])
    decisions = []
    for engine in (a, b):
        run = engine.new_sequence()
        engine.observe(run, 0, layer["queries"], layer["query_pos"])
        decisions.append(engine.compress_layer(run, 0, _inputs(layer)))
    assert torch.equal(decisions[0].kept, decisions[1].kept)
    torch.testing.assert_close(decisions[1].values, decisions[0].values, rtol=1e-5, atol=1e-6)


def test_params_are_arguments_not_code():
    """Another budget, p or window renders the same code (and loads the same module)."""
    for name, a, b in [("snapkv", {"budget": 256}, {"budget": 512, "window": 16}), ("hardkv", {"p": 0.9}, {"p": 0.5, "budget": 64}),
                       ("rkv", {"lam": 0.1}, {"lam": 0.3})]:
        one, two = render.render(kvpolicy.load(name, **a)), render.render(kvpolicy.load(name, **b))
        assert one.body == two.body and one.code_hash == two.code_hash
        assert one.header != two.header  # the header names each program's hash
        assert render.load(one) is render.load(two)
    # a structural change is new code
    assert render.render(kvpolicy.load("snapkv")).code_hash != render.render(kvpolicy.load("pyramidkv")).code_hash


def test_module_header_names_policy_hash_and_lines():
    policy = kvpolicy.load("hardkv")
    text = render.render(policy).text
    head = text.split("import triton", 1)[0]
    assert "# policy: hardkv" in head and policy.hash in head
    assert "score s = softmax(pool(max, 7, z) / T)" in head
    # each fused kernel says which .kvp statement it implements
    assert "# .kvp 21: score s = softmax(pool(max, 7, z) / T)" in text
    compile(text, "generated.py", "exec")  # valid Python


def test_user_names_are_validated_before_code():
    policy = kvpolicy.load("snapkv").ir
    for bad in ["x\nimport os", "a b", "class", "é"]:
        with pytest.raises(KvpolicyError, match="not a plain identifier"):
            render.render(policy.model_copy(update={"name": bad}))
    keeps = tuple(k.model_copy(update={"name": "s);os.system('x')#"}) if k.name == "selected" else k for k in policy.keeps)
    with pytest.raises(KvpolicyError, match="not a plain identifier"):
        render.render(policy.model_copy(update={"keeps": keeps}))
    assert render.safe_comment("a\rb\nc\u2028") == "a?b?c?"


def test_an_operation_without_emitter_is_a_positioned_error(monkeypatch):
    monkeypatch.delitem(lowering.EMITTERS, "signal:redundancy")
    with pytest.raises(PolicyError) as err:
        build(kvpolicy.load("rkv"))
    text = err.value.render()
    assert "cannot lower redundancy()" in text and "rkv.kvp:12:3: error" in text


def test_compile_cli_writes_the_module_beside_the_manifest(tmp_path, capsys):
    import hashlib
    import json

    from kvpolicy import cli

    for name in library.shipped_names():
        out = tmp_path / name
        assert cli.main(["compile", name, "--backend", "triton", "-o", str(out)]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        module = out / manifest["module"]["file"]
        assert manifest["backend"] == "triton" and module.exists()
        assert manifest["module"]["sha256"] == hashlib.sha256(module.read_bytes()).hexdigest()
        compile(module.read_text(), str(module), "exec")
    assert cli.main(["compile", "snapkv", "--backend", "triton", "--set", "budget=128", "-o", str(tmp_path / "b")]) == 0
    one = json.loads((tmp_path / "snapkv" / "manifest.json").read_text())["module"]["code_hash"]
    two = json.loads((tmp_path / "b" / "manifest.json").read_text())["module"]["code_hash"]
    assert one == two  # another budget: the same kernels


def test_the_kernel_shown_in_readme_and_docs_is_generated():
    import re
    from pathlib import Path

    text = render.render(kvpolicy.load("hardkv")).text
    root = Path(__file__).resolve().parent.parent
    for doc in ("README.md", "docs/triton.md"):
        shown = re.search(r"```python\n(# step 4:.*?)```", (root / doc).read_text(), re.S).group(1)
        shown = shown.split("\n\n\n")[0].strip()
        assert shown in text, doc


@DRAWS
@given(layer=layers())
def test_bisection_fit_by_kernels_equals_torch(layer):
    """HARD-KV with a bisection solver: the temperatures fitted from kernel
    masses equal the torch fit's (same solver control, masses within fp32
    rounding), and so do the kept sets."""
    text = library.shipped_text("hardkv").replace("adam(lr = 0.01, steps = 50, tol = 0.01)", "bisect(steps = 30, tol = 0.01)")
    policy = kvpolicy.compile_text(text, "hardkv_bisect.kvp", {"budget": 24, "window": 6})
    a, b = TorchPolicy(policy, layer["shape"]), TritonPolicy(policy, layer["shape"])
    runs, decisions = [], []
    for engine in (a, b):
        run = engine.new_sequence()
        engine.observe(run, 0, layer["queries"], layer["query_pos"])
        decisions.append(engine.compress_layer(run, 0, _inputs(layer)))
        runs.append(run)
    fitted = runs[1].temperatures[("T", 0)]
    torch.testing.assert_close(fitted, runs[0].temperatures[("T", 0)], rtol=1e-5, atol=0)
    assert torch.equal(decisions[0].kept, decisions[1].kept)
    if layer["valid"].shape[1] > 1:  # a real fit, not a clamp bound
        assert bool(((fitted > 0.001) & (fitted < 10)).all()), fitted


def test_registered_in_backends_compile():
    from kvpolicy import backends

    shape = ModelShape(2, 6, 2, 16)
    engine = backends.compile(kvpolicy.load("snapkv"), shape, backend="triton")
    assert isinstance(engine, TritonPolicy) and engine.program.shape == shape
    if not torch.cuda.is_available():  # auto: triton only where CUDA is present
        assert type(backends.compile(kvpolicy.load("snapkv"), shape, backend="auto")) is TorchPolicy
    # every operation of every shipped policy is one the triton backend lowers
    for name in library.shipped_names():
        assert not backends.BACKENDS["triton"].missing(backends.registry.lower(kvpolicy.load(name), shape)), name
