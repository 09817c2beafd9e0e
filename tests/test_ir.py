"""The IR: frozen, round-trips through JSON, hashed by behaviour."""
import json

import pydantic
import pytest

import kvpolicy
from kvpolicy import budgets, ir, library
from kvpolicy.manifest import manifest, read_manifest, write_manifest


@pytest.mark.parametrize("name", library.shipped_names())
def test_json_round_trip(name):
    policy = kvpolicy.load(name).ir
    again = ir.Policy.model_validate_json(policy.model_dump_json())
    assert again == policy and again.content_hash == policy.content_hash


def test_ir_is_frozen():
    policy = kvpolicy.load("snapkv").ir
    with pytest.raises(pydantic.ValidationError):
        policy.cap = 5


def test_hash_follows_behaviour_not_doc():
    base = kvpolicy.load("snapkv")
    assert base.with_params(budget=256).hash != base.hash
    assert base.with_params(budget=1024).hash == base.hash
    redoc = base.source.text.replace("keep what the last queries attend to", "other words")
    assert kvpolicy.compile_text(redoc).content_hash == base.hash


def test_params_substituted_and_recorded():
    policy = kvpolicy.load("snapkv", budget=256).ir
    assert policy.params["budget"] == ir.Param(unit="tokens", value=256, default=1024)
    assert policy.keeps[1].select.count == 256 - 64


def test_manifest_round_trip(tmp_path):
    policy = kvpolicy.load("hardkv").ir
    path = write_manifest(tmp_path / "out", policy, "torch", "policies/hardkv.kvp")
    data = json.loads(path.read_text())
    assert data["hash"] == policy.content_hash and data["backend"] == "torch"
    assert read_manifest(path) == policy
    data["ir"]["cap"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(kvpolicy.KvpolicyError, match="hash mismatch"):
        read_manifest(path)


def test_manifest_has_compiler_version():
    data = manifest(kvpolicy.load("full").ir, "torch", "x")
    assert data["kvpolicy_version"] == kvpolicy.__version__ and data["ir_version"] == ir.IR_VERSION


@pytest.mark.parametrize(
    "shape",
    [None, ir.LayerShape(kind="pyramid", beta=5.0), ir.LayerShape(kind="linear", start=1.0, end=3.0), ir.LayerShape(kind="table", weights=(1.0, 0.0, 2.0, 1.0))],
)
def test_layer_weights_have_mean_one(shape):
    weights = budgets.layer_weights(shape, 4)
    assert len(weights) == 4 and abs(sum(weights) / 4 - 1) < 1e-9


def test_linear_shape_direct_formula():
    # start = 1, end = 3 over 3 layers: raw 1, 2, 3 with mean 2.
    assert budgets.layer_weights(ir.LayerShape(kind="linear", start=1.0, end=3.0), 3) == [0.5, 1.0, 1.5]


def test_table_of_wrong_length():
    with pytest.raises(ValueError, match="2 weights but the model has 3 layers"):
        budgets.layer_weights(ir.LayerShape(kind="table", weights=(1.0, 2.0)), 3)
