"""The lowered program and the backend entry point (kvpolicy.backends.compile)."""
import pytest

import kvpolicy
from kvpolicy import library
from kvpolicy.backends import BACKENDS, Backend, compile, register
from kvpolicy.backends.torch import TorchPolicy
from kvpolicy.errors import KvpolicyError
from kvpolicy.model_shape import ModelShape
from kvpolicy.ops import OPS
from kvpolicy.program import Keep, Tier, lower

SHAPE = ModelShape(num_layers=4, num_q_heads=4, num_kv_heads=2, head_dim=8, name="tiny")


@pytest.mark.parametrize("name", library.shipped_names())
def test_every_shipped_policy_lowers_to_ordered_nodes(name):
    program = lower(kvpolicy.load(name), SHAPE)
    for node in program.nodes:
        assert node.op in OPS
        assert all(i < node.index for i in node.inputs), "inputs come first"
    assert [n.index for n in program.nodes] == list(range(len(program.nodes)))
    assert sorted(program.scores) == sorted(program.policy.scores)
    named = [n.name for n in program.nodes if n.name]
    assert len(named) == len(set(named)), "each named score is one node"
    assert set(program.ops()) <= set(OPS)


def test_named_score_is_computed_once():
    pol = kvpolicy.compile_text("""policy p {
      observe queries last 8
      score s = pool(max, 3, attn())
      score u = s + s * 2
      keep recent = last 8
      keep top = top_k(u, 16)
      compress at prefill
    }""")
    program = lower(pol, SHAPE)
    assert [n.op for n in program.nodes].count("pool") == 1
    assert [n.op for n in program.nodes].count("attn") == 1


def test_by_layer_counts_resolved_for_the_shape():
    pol = kvpolicy.compile_text("""policy p {
      observe queries last 8
      score s = attn()
      keep top = top_k(s, 100) by layer pyramid(beta = 4)
      compress at prefill
    }""")
    (keep,) = [s for s in lower(pol, SHAPE).steps if isinstance(s, Keep)]
    # PyramidKV with beta 4 over 4 layers: weights linear from 2 - 1/4 to 1/4.
    top, bottom = 2 - 1 / 4, 1 / 4
    expected = tuple(int(100 * (top - (top - bottom) * layer / 3) + 0.5) for layer in range(4))
    assert keep.select.counts == expected


def test_cascade_lowers_to_tier_steps_in_order():
    program = lower(kvpolicy.load("hardkv"), SHAPE)
    tiers = [s for s in program.steps if isinstance(s, Tier)]
    assert [t.name for t in tiers] == [t.name for t in program.policy.cascade]
    assert tiers[0].source is None and all(t.source == t.index - 1 for t in tiers[1:])
    assert program.storage_layout == "flatten_sum"


def test_compile_returns_the_engine_object_and_auto_picks_an_available_backend():
    pol = kvpolicy.load("snapkv")
    engine = compile(pol, SHAPE, backend="torch")
    assert isinstance(engine, TorchPolicy)
    assert engine.program.policy == pol.ir
    assert hasattr(compile(pol, SHAPE, backend="auto"), "compress_layer")
    for method in ("new_sequence", "observe", "accumulate", "due", "compress_layer"):
        assert callable(getattr(engine, method))


def test_unknown_backend_is_one_line():
    with pytest.raises(KvpolicyError, match="unknown backend 'tpu'"):
        compile(kvpolicy.load("snapkv"), SHAPE, backend="tpu")


@pytest.fixture
def partial_backend():
    """A backend that lacks redundancy(), registered for one test."""
    backend = Backend("partial", frozenset(OPS) - {"redundancy"}, lambda policy, program: program, priority=100)
    register(backend)
    yield backend
    del BACKENDS["partial"]


def test_a_missing_operation_is_a_positioned_compile_time_error(partial_backend):
    text = library.shipped_text("rkv")
    pol = kvpolicy.load("rkv")
    with pytest.raises(kvpolicy.PolicyError) as err:
        compile(pol, SHAPE, backend="partial")
    line = next(i for i, row in enumerate(text.split("\n"), start=1) if "redundancy(" in row)
    col = text.split("\n")[line - 1].index("redundancy(") + 1
    assert str(err.value).startswith(f"policies/rkv.kvp:{line}:{col}: error: the partial backend cannot lower redundancy(...) yet")
    # From the IR alone there is no position, but the same refusal.
    with pytest.raises(KvpolicyError, match="cannot lower redundancy"):
        compile(pol.ir, SHAPE, backend="partial")
    # auto skips a backend that lacks an op, and takes it where nothing is missing.
    assert isinstance(compile(pol, SHAPE, backend="auto"), TorchPolicy)
    assert compile(kvpolicy.load("snapkv"), SHAPE, backend="auto").policy.name == "snapkv"


def test_shape_errors_come_from_lowering():
    pol = kvpolicy.compile_text("""policy p {
      observe queries last 8
      score s = attn()
      keep top = top_k(s, 16) in layers 0..7
      compress at prefill
    }""")
    with pytest.raises(KvpolicyError, match="names layer 4"):
        lower(pol, SHAPE)


def test_a_state_the_torch_backend_cannot_accumulate_is_refused_at_compile_time(tmp_path):
    path = tmp_path / "p.kvp"
    path.write_text("policy p {\n  state acc += key_norm()\n  keep heavy = top_k(acc, 16)\n  compress at prefill\n}\n")
    with pytest.raises(kvpolicy.PolicyError) as err:
        compile(kvpolicy.load(str(path)), SHAPE, backend="torch")
    assert str(err.value).startswith(f"{path}:2:3: error: state acc: the torch backend accumulates only attn(...) states yet")
