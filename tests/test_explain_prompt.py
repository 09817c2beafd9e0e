"""`kvpolicy explain --prompt`: the picture's data is what the HF engine holds,
positions are binned readably, and bad input is one line, exit 2, nothing written."""
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy import cli, explain_picture, texts
from kvpolicy.backends.hf import attention, generate, prepare
from kvpolicy.backends.hf.cache import PolicyCache
from kvpolicy.backends.hf.explain_prompt import encode_prompt

NEEDLE = "The secret pass key is 58213."
POLICIES = ["snapkv", "adakv", "hardkv"]
BUDGET = 96
SNAPKV_WINDOW = 64  # snapkv's and adakv's default `last window`


def prompt_text() -> str:
    """~300 tokens of prose with a needle two thirds in."""
    prose = texts.english_text(1500)[:1300]
    cut = prose.rfind("\n", 0, 900)
    return prose[:cut] + "\n" + NEEDLE + "\n" + prose[cut:] + "\nWhat is the secret pass key?\n"


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """The CLI run once, in process: (report JSON, PNG path, stdout)."""
    out = tmp_path_factory.mktemp("explain")
    prompt = out / "prompt.txt"
    prompt.write_text(prompt_text())
    png, data = out / "held.png", out / "held.json"
    status = cli.main(["explain", *POLICIES, "--set", f"budget={BUDGET}", "--prompt", str(prompt),
                       "--mark", NEEDLE, "--png", str(png), "--json", str(data)])
    assert status == 0
    return json.loads(data.read_text()), png, prompt


def engine_cache(model, policy, ids) -> PolicyCache:
    """The policy's own prefill and compression in the HF engine (no shared prefill)."""
    cache = PolicyCache(prepare(model, policy))
    with torch.inference_mode(), attention.active(cache):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache.compress("prefill")
    cache.settle()
    return cache


def test_report_is_what_the_engine_holds(explained, smollm2):
    report, _, prompt = explained
    model, tok = smollm2
    ids = encode_prompt(tok, prompt.read_text(), chat=False).ids
    assert report["prompt_tokens"] == ids.shape[1]
    assert [e["policy"] for e in report["policies"]] == POLICIES
    for entry in report["policies"]:
        policy = kvpolicy.load(entry["policy"], budget=BUDGET)
        stats = generate(model, tok, ids, policy=policy, max_new_tokens=1).stats  # one token: no decode step
        assert entry["kept"] == stats.kept
        assert (entry["kv_bytes"], entry["kv_bytes_full"]) == (stats.kv_bytes, stats.kv_bytes_full)
        cache = engine_cache(model, policy, ids)
        assert entry["compressed"] and entry["layers"] == len(cache.layers)
        for index, layer in enumerate(cache.layers):
            for head in range(layer.num_kv_heads):
                held = layer.valid[head] & (layer.positions[head] >= 0)
                assert entry["positions"][index][head] == sorted(layer.positions[head][held].tolist())
                if entry["position_tiers"] is not None:
                    by_position = dict(zip(layer.positions[head][held].tolist(), layer.tiers[head][held].tolist()))
                    assert entry["position_tiers"][index][head] == [by_position[p] for p in entry["positions"][index][head]]
        assert [len(h) for layer in entry["positions"] for h in layer] == [c for layer in stats.kept for c in layer]


def test_protected_tokens_and_budgets_follow_each_policy(explained):
    report, _, _ = explained
    n = report["prompt_tokens"]
    snapkv, adakv, hardkv = report["policies"]
    assert snapkv["protected"] == {"first": 0, "last": SNAPKV_WINDOW}
    assert hardkv["protected"] == {"first": 1, "last": 32}
    assert hardkv["tiers"] == ["dense", "sparse", "condensed"]
    for entry in report["policies"]:
        first, last = entry["protected"]["first"], entry["protected"]["last"]
        protected = set(range(first)) | set(range(n - last, n))
        for layer in entry["positions"]:
            for head in layer:
                assert protected <= set(head)
    assert all(c == BUDGET for layer in snapkv["kept"] for c in layer)  # snapkv: cap budget per head
    for layer in adakv["kept"]:  # adakv: the layer's heads share 3 x budget
        assert sum(layer) == 3 * BUDGET
    cap = 2 * BUDGET + 32
    assert all(c <= cap for layer in hardkv["kept"] for c in layer)


def test_mark_is_the_needles_tokens(explained, smollm2):
    report, _, _ = explained
    _, tok = smollm2
    (mark,) = report["marks"]
    ids = encode_prompt(tok, prompt_text(), chat=False).ids[0]
    assert NEEDLE in tok.decode(ids[mark["start"]:mark["end"]])
    assert NEEDLE not in tok.decode(ids[mark["start"] + 1:mark["end"]]) and NEEDLE not in tok.decode(ids[mark["start"]:mark["end"] - 1])


def test_picture_cells_are_the_held_positions(explained):
    report, png, _ = explained
    n = report["prompt_tokens"]
    assert explain_picture.bin_width(n) == 1  # ~300 tokens: one column per position
    for entry in report["policies"]:
        shares = explain_picture.cells(entry, n, 1)
        heads = entry["kv_heads"]
        for row in range(shares.shape[0]):
            held = set(entry["positions"][row // heads][row % heads])
            drawn = {p for p in range(n) if shares[row, p].sum() == 1.0}
            assert drawn == held and not shares[row, [p for p in range(n) if p not in held]].any()
        assert explain_picture.shares_to_counts(entry).sum(axis=1).tolist() == [c for layer in entry["kept"] for c in layer]
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width == explain_picture.WIDTH * explain_picture.DPI and height > width  # three blocks stacked
    assert not [p.name for p in png.parent.iterdir() if p.name.startswith(".")]  # no temp file left


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4096), st.integers(1, 8), st.integers(1, 3), st.data())
def test_binned_cells_are_the_share_held(n, heads, tiers, data):
    entry = {"layers": 2, "kv_heads": heads, "tiers": [f"t{i}" for i in range(tiers)], "positions": [], "position_tiers": []}
    for _ in range(2):
        layer_pos, layer_tiers = [], []
        for _ in range(heads):
            pos = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=64)))
            layer_pos.append(pos)
            layer_tiers.append([data.draw(st.integers(0, tiers - 1)) for _ in pos])
        entry["positions"].append(layer_pos)
        entry["position_tiers"].append(layer_tiers)
    width = explain_picture.bin_width(n)
    shares = explain_picture.cells(entry, n, width)
    assert shares.shape == (2 * heads, math.ceil(n / width), tiers) and shares.shape[1] <= explain_picture.MAX_COLUMNS
    for row in range(2 * heads):
        pos, tier = entry["positions"][row // heads][row % heads], entry["position_tiers"][row // heads][row % heads]
        for column in range(shares.shape[1]):
            lo, hi = column * width, min(n, (column + 1) * width)
            for t in range(tiers):
                direct = sum(1 for p, q in zip(pos, tier) if lo <= p < hi and q == t) / (hi - lo)
                assert shares[row, column, t] == pytest.approx(direct)


def synthetic_report(layers: int, heads: int, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    positions = [[sorted(rng.choice(n, size=int(rng.integers(16, n // 4)), replace=False).tolist()) for _ in range(heads)] for _ in range(layers)]
    entry = {"policy": f"synthetic {layers}x{heads}", "hash": "", "compresses": True, "compressed": True, "layers": layers, "kv_heads": heads,
             "kv_bytes": 2 * layers * heads * 64 * 2 * 512, "kv_bytes_full": 2 * layers * heads * 64 * 2 * n, "protected": {"first": 4, "last": 64}, "tiers": [],
             "kept": [[len(h) for h in layer] for layer in positions], "positions": positions, "position_tiers": None}
    return {"model": "synthetic", "prompt_tokens": n, "chat": False, "marks": [{"text": "x", "start": 1000, "end": 1012}], "policies": [entry]}


@pytest.mark.parametrize("layers,heads", [(30, 3), (32, 8)])
def test_large_shapes_draw_binned(tmp_path, layers, heads):
    report = synthetic_report(layers, heads, 4096)
    out = tmp_path / "big.png"
    explain_picture.draw(report, out)
    width, height = struct.unpack(">II", out.read_bytes()[16:24])
    rows = layers * heads
    # At least ~2 px per heatmap row, and every drawn column at least 2 px wide.
    assert height * 0.7 >= 2 * rows or height >= explain_picture.DPI * 6
    assert explain_picture.cells(report["policies"][0], 4096, explain_picture.bin_width(4096)).shape[1] * 2 <= width


# ----------------------------------------------------------------- bad input


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvpolicy.cli", "explain", "snapkv", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def assert_one_line_error(result, fragment: str):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("kvpolicy: error: ") and fragment in lines[-1], result.stderr


def test_bad_prompt_files_exit_2(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "dir").mkdir()
    png = tmp_path / "out.png"
    for prompt, fragment in [("missing.txt", "no such file"), ("empty.txt", "is empty"), ("latin1.txt", "not UTF-8"), ("dir", "is a directory")]:
        result = run("--prompt", str(tmp_path / prompt), "--png", str(png))
        assert_one_line_error(result, fragment)
    assert not png.exists()


def test_bad_outputs_and_flags_exit_2(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("a short prompt")
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (["--prompt", str(prompt), "--png", str(blocker / "out.png")], "is not a directory"),
        (["--prompt", str(prompt), "--json", str(tmp_path)], "is a directory"),
        (["--prompt", str(prompt), "--png", str(tmp_path / "no" / "such" / "out.png")], "does not exist"),
        (["--png", str(tmp_path / "out.png")], "--png needs --prompt"),
        (["--prompt", str(prompt), "--mark", "not there"], "is not in the prompt"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run(*args), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "p.txt"]


def test_prompt_longer_than_the_model_reads_exits_2(tmp_path):
    prompt = tmp_path / "long.txt"
    prompt.write_text("word " * 9000)  # > 8192 positions of SmolLM2
    out = tmp_path / "out.json"
    result = run("--prompt", str(prompt), "--json", str(out))
    assert_one_line_error(result, "more than smollm2-135m reads (8192 positions)")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["long.txt"]


def test_without_prompt_explain_stays_words(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kvpolicy.cli", "explain", "snapkv", "adakv"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("snapkv:") and "\nadakv:" in result.stdout
    assert "transformers" not in result.stderr


def test_readme_picture_comes_from_the_shown_command():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert "--prompt docs/explain_needle.txt --mark \"The secret pass key is 58213\" --png docs/explain.png" in readme
    assert "](docs/explain.png)" in readme
    assert "The secret pass key is 58213" in (root / "docs/explain_needle.txt").read_text()
    png = (root / "docs/explain.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000
