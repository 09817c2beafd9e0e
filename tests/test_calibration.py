"""Calibration files (kvpolicy/calibration_file.py), `fit from "FILE"` in the
torch backend, and `kvpolicy calibrate`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kvpolicy
from kvpolicy import calibration_file as cf
from kvpolicy import cli
from kvpolicy.backends.torch import LayerInputs, ModelShape, TorchPolicy
from kvpolicy.backends.hf import fit_text
from kvpolicy.backends.torch import calibrate as calibrate_module
from kvpolicy.diagnostics import PolicyError

ROOT = Path(__file__).resolve().parent.parent
HARDKV = (ROOT / "policies/hardkv.kvp").read_text()
assert HARDKV.count("fit once") == 1

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """On a busy 2-core machine two OpenMP threads per small op cost far more
    than they save (the SmolLM2 test: ~9 s on one thread, minutes on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A small shape for tests without a model: 2 layers, 4 query heads on 2 kv heads.
SMALL = ModelShape(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, name="tiny")


def hardkv_from(file: str, **replace: str) -> str:
    text = HARDKV.replace("fit once", f'fit from "{file}"')
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def write_small(path: Path, policy_text: str = HARDKV, values=None, layers: int = 2, kv_heads: int = 2, **params) -> np.ndarray:
    """A calibration file for hardkv on SMALL with known values."""
    policy = kvpolicy.compile_text(policy_text, "hardkv.kvp", params)
    if values is None:
        values = np.arange(1, layers * kv_heads + 1, dtype=np.float32).reshape(layers, kv_heads) / 10
    errors = np.full((layers, kv_heads), 0.005, dtype=np.float32)
    rows = np.full((layers, kv_heads), 0.05, dtype=np.float32)
    cf.write(path, policy, model={"name": "tiny", "layers": layers, "kv_heads": kv_heads}, values={"T": values},
             errors={"T": errors}, row_errors={"T": rows}, text={"source": "test", "tokens": 99}, source="hardkv.kvp")
    return values


def line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


# --------------------------------------------------------------------- the file


def test_round_trip(tmp_path):
    path = tmp_path / "cal.safetensors"
    values = write_small(path)
    back = cf.read(path)
    assert np.array_equal(back.values["T"], values)
    assert np.array_equal(back.errors["T"], np.full((2, 2), 0.005, dtype=np.float32))
    assert np.array_equal(back.row_errors["T"], np.full((2, 2), 0.05, dtype=np.float32))
    header = back.header
    policy = kvpolicy.load("hardkv")
    assert header["format_version"] == cf.FORMAT_VERSION
    assert header["model"] == {"name": "tiny", "layers": 2, "kv_heads": 2}
    assert header["policy"]["name"] == "hardkv" and header["policy"]["hash"] == policy.hash
    assert header["policy"]["params"]["p"] == 0.9
    assert header["text"] == {"source": "test", "tokens": 99}
    entry = header["calibrations"]["T"]
    assert entry["hash"] == cf.calibration_hash(policy.ir, "T")
    assert entry["p"] == 0.9 and entry["init"] == 0.5 and entry["clamp"] == [0.001, 10.0]
    assert entry["solver"] == "adam(lr = 0.01, steps = 50, tol = 0.01)" and entry["observe"] == 32
    assert header["created"][:2] == "20"
    cf.check(back, policy.ir, "T", 2, 2)  # fits
    assert [p.name for p in tmp_path.iterdir()] == ["cal.safetensors"]  # no temporary left behind


def test_hash_covers_what_feeds_the_fit_and_nothing_else():
    def h(text=HARDKV, **params):
        return cf.calibration_hash(kvpolicy.compile_text(text, "x.kvp", params), "T")

    base = h()
    # the same calibration: another fit clause, other budgets, a renamed score
    assert h(hardkv_from("x.safetensors")) == base
    assert h(budget=128, interval=64, condense=1) == base
    assert h(HARDKV.replace("score z", "score logits").replace("(z)", "(logits)").replace(", z)", ", logits)")) == base
    # another calibration: p, the solver, init, clamp, the metric, the observed window
    assert h(p=0.8) != base
    assert h(HARDKV.replace("steps = 50", "steps = 40")) != base
    assert h(HARDKV.replace("init 0.5", "init 0.4")) != base
    assert h(HARDKV.replace("clamp [0.001, 10]", "clamp [0.01, 10]")) != base
    assert h(HARDKV.replace("metric softmax(pool(max, 7, z) / T)", "metric softmax(pool(max, 5, z) / T)")) != base
    assert h(window=16) != base


def test_not_a_calibration_file(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(cf.CalibrationFileError, match="is not a kvpolicy calibration file"):
        cf.read(garbage)
    from safetensors.numpy import save

    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(save({"T": np.ones((2, 2), np.float32)}))
    with pytest.raises(cf.CalibrationFileError, match="without the 'kvpolicy-calibration' header"):
        cf.read(plain)
    with pytest.raises(cf.CalibrationFileError, match="no such file"):
        cf.read(tmp_path / "missing.safetensors")


def test_values_must_be_positive(tmp_path):
    path = tmp_path / "cal.safetensors"
    write_small(path, values=np.array([[0.5, float("nan")], [0.5, 0.5]], dtype=np.float32))
    with pytest.raises(cf.CalibrationFileError, match="not positive numbers"):
        cf.read(path)


# --------------------------------------------------------------------- fit from "FILE" in the torch backend


def random_layer(seed: int, length: int = 80) -> tuple[torch.Tensor, LayerInputs]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(SMALL.num_q_heads, length, SMALL.head_dim, generator=gen)
    k = torch.randn(SMALL.num_kv_heads, length, SMALL.head_dim, generator=gen)
    v = torch.randn(SMALL.num_kv_heads, length, SMALL.head_dim, generator=gen)
    valid = torch.ones(SMALL.num_kv_heads, length, dtype=torch.bool)
    pos = torch.arange(length)
    return q, LayerInputs(keys=k, values=v, valid=valid, key_pos=pos.expand(SMALL.num_kv_heads, -1).clone())


def prefill(engine: TorchPolicy, seed: int):
    run = engine.new_sequence()
    decisions = []
    for layer in range(SMALL.num_layers):
        q, inputs = random_layer(seed + layer)
        engine.observe(run, layer, q, torch.arange(q.shape[1]))
        decisions.append(engine.compress_layer(run, layer, inputs))
    return run, decisions


def test_fit_from_file_uses_its_values_and_fits_nothing(tmp_path, monkeypatch):
    """Relative to the policy's directory (not the working directory); the
    selection equals an online run whose fit returns the file's values."""
    (tmp_path / "policies").mkdir()
    values = write_small(tmp_path / "policies" / "cal.safetensors", budget=4)
    policy_path = tmp_path / "policies" / "hardkv_file.kvp"
    policy_path.write_text(hardkv_from("cal.safetensors"))
    monkeypatch.chdir(tmp_path)  # cal.safetensors is not here

    def no_fit(self, inputs, scores=None):
        raise AssertionError("fit from a file must not fit")

    monkeypatch.setattr(calibrate_module.Calibrator, "fit", no_fit)
    engine = TorchPolicy(kvpolicy.load(str(policy_path), budget=4), SMALL)
    run, from_file = prefill(engine, seed=7)
    for layer in range(SMALL.num_layers):
        assert torch.equal(run.temperatures[("T", layer)], torch.from_numpy(values[layer]))
        assert torch.equal(run.fit_errors[("T", layer)], torch.full((2,), 0.005))

    def fake_fit(self, inputs, scores=None, _layer=iter(range(SMALL.num_layers))):
        t = torch.from_numpy(values[next(_layer)].copy())
        return calibrate_module.FitResult(t, torch.zeros(2), torch.zeros(2), 0, torch.ones(2, dtype=torch.bool))

    monkeypatch.setattr(calibrate_module.Calibrator, "fit", fake_fit)
    _, online = prefill(TorchPolicy(kvpolicy.load("hardkv", budget=4), SMALL), seed=7)
    for a, b in zip(from_file, online):
        assert torch.equal(a.kept, b.kept)
    assert any(not bool(d.kept.all()) for d in from_file)  # something was dropped: the comparison means something


def errors_for(policy, shape=SMALL) -> list:
    with pytest.raises(PolicyError) as info:
        TorchPolicy(policy, shape)
    return info.value.diagnostics


def test_shape_mismatch_is_one_positioned_line(tmp_path):
    write_small(tmp_path / "cal.safetensors", layers=3)
    text = hardkv_from("cal.safetensors")
    path = tmp_path / "h.kvp"
    path.write_text(text)
    (diag,) = errors_for(kvpolicy.load(str(path)))
    assert "\n" not in diag.message
    assert (diag.span.line, diag.span.col) == (line_of(text, "fit from"), 5)
    assert str(tmp_path / "cal.safetensors") in diag.message
    assert "fitted for 3 layers x 2 kv heads (tiny), but tiny has 2 layers x 2 kv heads" in diag.message


def test_hash_mismatch_is_one_positioned_line(tmp_path):
    write_small(tmp_path / "cal.safetensors")  # fitted with p = 0.9
    text = hardkv_from("cal.safetensors")
    path = tmp_path / "h.kvp"
    path.write_text(text)
    (diag,) = errors_for(kvpolicy.load(str(path), p=0.8))
    assert "\n" not in diag.message and diag.span.line == line_of(text, "fit from")
    assert "T fitted by policy hardkv for another definition (p 0.9 there, 0.8 here;" in diag.message
    # a change the settings do not show is still caught by the hash
    path.write_text(text.replace("pool(max, 7, z) / T)  #", "pool(max, 5, z) / T)  #"))
    (diag,) = errors_for(kvpolicy.load(str(path)))
    assert "its target or metric differs" in diag.message
    # rendered: the message line, the source line, the caret, the count
    rendered = PolicyError([diag], kvpolicy.load(str(path)).source).render().split("\n")
    assert rendered[0].startswith(f"{path}:{diag.span.line}:5: error: {tmp_path / 'cal.safetensors'} holds T")
    assert rendered[1].strip() == 'fit from "cal.safetensors"' and rendered[2].strip().startswith("^^^")


def test_without_a_source_errors_are_one_line(tmp_path, monkeypatch):
    """A bare IR (no file name): paths are relative to the working directory."""
    write_small(tmp_path / "cal.safetensors", layers=3)
    monkeypatch.chdir(tmp_path)
    policy_ir = kvpolicy.compile_text(hardkv_from("cal.safetensors"))
    with pytest.raises(kvpolicy.KvpolicyError) as info:
        TorchPolicy(policy_ir, SMALL)
    assert not isinstance(info.value, PolicyError)
    assert str(info.value) == "cal.safetensors was fitted for 3 layers x 2 kv heads (tiny), but tiny has 2 layers x 2 kv heads"


def test_missing_calibration_name(tmp_path):
    write_small(tmp_path / "cal.safetensors")
    text = hardkv_from("cal.safetensors").replace("calibrate T", "calibrate U").replace("/ T)", "/ U)")
    path = tmp_path / "h.kvp"
    path.write_text(text)
    (diag,) = errors_for(kvpolicy.load(str(path)))
    assert diag.message.endswith("has no calibration named 'U' (it has: T)")


# --------------------------------------------------------------------- kvpolicy calibrate: bad input


@pytest.mark.parametrize("args, fragment", [
    (["calibrate", "no_such_policy", "--out", "{tmp}/x.safetensors"], "no policy file or shipped policy named 'no_such_policy'"),
    (["calibrate", "{tmp}/missing.kvp", "--out", "{tmp}/x.safetensors"], "cannot read {tmp}/missing.kvp"),
    (["calibrate", "hardkv", "--out", "{tmp}/afile/x.safetensors"], "cannot write {tmp}/afile/x.safetensors"),
    (["calibrate", "hardkv", "--out", "{tmp}"], "is a directory"),
    (["calibrate", "snapkv", "--out", "{tmp}/x.safetensors"], "policy snapkv has no calibrate block"),
    (["calibrate", "hardkv", "--out", "{tmp}/x.safetensors", "--tokens", "10"], "--tokens must be between 64 and 8192"),
    (["calibrate", "hardkv", "--out", "{tmp}/x.safetensors", "--set", "budget"], "--set expects NAME=VALUE"),
    (["calibrate", "hardkv", "--out", "{tmp}/x.safetensors", "--model", "nosuchmodel"], "unknown model 'nosuchmodel'"),
])
def test_calibrate_bad_input_is_one_line_exit_2(tmp_path, capsys, args, fragment):
    (tmp_path / "afile").write_text("a file, not a directory")
    argv = [a.format(tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and err[0].startswith("kvpolicy: error: "), err
    assert fragment.format(tmp=tmp_path) in err[0]
    assert not (tmp_path / "x.safetensors").exists()


def test_calibrate_invalid_policy_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.kvp"
    bad.write_text(HARDKV.replace("init 0.5", "init 50"))
    assert cli.main(["calibrate", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "init 50 is outside the clamp" in capsys.readouterr().err


# --------------------------------------------------------------------- kvpolicy calibrate on SmolLM2


def kept_sets(model, policy, ids) -> tuple[list, dict]:
    """Per layer and kv head, the logical positions held after the prefill
    compression, and the temperatures used."""
    from kvpolicy.backends.hf import attention
    from kvpolicy.backends.hf.cache import PolicyCache

    cache = PolicyCache(kvpolicy.hf.prepare(model, policy))
    with torch.inference_mode(), attention.active(cache):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache.compress("prefill")
    sets = [[sorted(layer.positions[h][layer.valid[h]].tolist()) for h in range(layer.valid.shape[0])] for layer in cache.layers]
    return sets, dict(cache.run.temperatures)


@pytest.mark.model
def test_calibrate_then_fit_from_reproduces_the_online_fit(smollm2, tmp_path, capsys):
    """`kvpolicy calibrate` on 512 tokens writes a file; hardkv with `fit from`
    that file (at another budget: the file does not depend on it) keeps
    exactly the tokens hardkv keeps fitting online on the same text."""
    model, tok = smollm2
    out = tmp_path / "hardkv.calib.safetensors"
    assert cli.main(["calibrate", "hardkv", "--set", "budget=128", "--model", "smollm2-135m", "--out", str(out), "--tokens", "512"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {out}: T of hardkv for smollm2-135m (30 layers x 3 kv heads), fitted on 512 tokens")
    assert "30/30 layers fitted" in captured.err

    back = cf.read(out)
    assert back.header["text"]["tokens"] == 512 and back.header["policy"]["params"]["budget"] == 128
    values = back.values["T"]
    assert values.shape == (30, 3)
    assert (np.abs(values - 0.5) > 1e-3).sum() > 45  # fitted: most heads moved from init ...
    assert len(np.unique(values.round(4))) > 30  # ... each to its own value
    converged = back.errors["T"] < 0.01
    assert converged.sum() >= 45, f"only {converged.sum()} of 90 heads within tol"

    policy_path = tmp_path / "hardkv_file.kvp"
    policy_path.write_text(hardkv_from(out.name))
    ids = fit_text.english_ids(tok, 512)
    online_sets, online_t = kept_sets(model, kvpolicy.load("hardkv", budget=200), ids)
    file_sets, file_t = kept_sets(model, kvpolicy.load(str(policy_path), budget=200), ids)
    for layer in range(30):
        assert torch.equal(online_t[("T", layer)], torch.from_numpy(values[layer])), f"layer {layer}"
        assert torch.equal(file_t[("T", layer)], online_t[("T", layer)])
        assert file_sets[layer] == online_sets[layer], f"layer {layer}: kept sets differ"
    held = [len(s) for layer in online_sets for s in layer]
    assert min(held) < 512  # the policy dropped tokens, so equal sets mean something
