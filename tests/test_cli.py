"""The `kvpolicy` command: exit codes, outputs, and what it writes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvpolicy import cli, library

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(str(p) for p in (ROOT / "policies").glob("*.kvp"))


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvpolicy.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_check_every_shipped_policy():
    result = run("check", *SHIPPED)
    assert result.returncode == 0, result.stderr


def test_fmt_check_every_shipped_policy():
    result = run("fmt", "--check", *SHIPPED)
    assert result.returncode == 0, result.stderr


def test_compile_writes_a_manifest_for_each(tmp_path):
    for path in SHIPPED:
        name = Path(path).stem
        assert cli.main(["compile", path, "-o", str(tmp_path / name)]) == 0
        data = json.loads((tmp_path / name / "manifest.json").read_text())
        assert data["policy"] == name and data["hash"].startswith("sha256:")
    leftovers = [p for p in tmp_path.rglob(".*")]
    assert leftovers == []  # no temporary files left next to the manifests


def test_compile_with_set(tmp_path):
    assert cli.main(["compile", "snapkv", "--set", "budget=256", "-o", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["params"]["budget"] == 256 and data["ir"]["keeps"][1]["select"]["count"] == 192


def test_invalid_policy_exits_1_with_position(tmp_path):
    bad = tmp_path / "mine.kvp"
    bad.write_text('policy mine "x" {\n  observe queries last 8\n  score s = pool(max, 7, atn(group = mean))\n  keep k = top_k(s, 8)\n  compress at prefill\n}\n')
    result = run("check", str(bad))
    assert result.returncode == 1
    assert f"{bad}:3:26: error: unknown signal 'atn'; did you mean 'attn'?" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.rstrip().endswith(f"1 error in {bad}")


def test_check_reports_each_invalid_file_and_keeps_going(tmp_path):
    bad = tmp_path / "bad.kvp"
    bad.write_text("policy {")
    result = run("check", str(bad), SHIPPED[0])
    assert result.returncode == 1 and str(bad) in result.stderr


def test_usage_errors_exit_2(tmp_path):
    assert run("check", str(tmp_path / "missing.kvp")).returncode == 2
    assert run("check", "snapkv", "--set", "budget").returncode == 2
    assert run("frobnicate").returncode == 2
    assert run("check", "snapkvv").returncode == 2


def test_unknown_set_param_is_a_policy_error():
    result = run("check", "snapkv", "--set", "budgt=3")
    assert result.returncode == 1 and "did you mean 'budget'?" in result.stderr


def test_list_names_every_shipped_policy():
    result = run("list")
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == library.shipped_names()


def test_explain_in_plain_words():
    result = run("explain", "snapkv", "--set", "budget=512")
    assert result.returncode == 0
    assert "the last 64 tokens" in result.stdout and "the 448 tokens with the highest s" in result.stdout
    assert "right after prefill" in result.stdout
    pyramid = run("explain", "pyramidkv", "--layers", "4").stdout
    assert "by layer (pyramid, 4 layers)" in pyramid


def test_fmt_rewrites_in_place_and_is_idempotent(tmp_path):
    messy = tmp_path / "messy.kvp"
    messy.write_text('policy   m "x"{param budget:tokens=8\n keep k=last(budget)   # recent\ncompress at prefill}')
    assert cli.main(["fmt", str(messy)]) == 0
    once = messy.read_text()
    assert once == 'policy m "x" {\n  param budget: tokens = 8\n  keep k = last budget  # recent\n  compress at prefill\n}\n'
    assert cli.main(["fmt", "--check", str(messy)]) == 0


@pytest.mark.parametrize("expression", [
    "normalize(0.07 * softmax(z) - 0.93 * key_norm())",
    "(z - key_norm()) * 2",
    "z - (key_norm() + z)",
    "z / (2 * key_norm())",
    "-(z + key_norm())",
    "-z * 2 - -key_norm()",
])
def test_explain_prints_expressions_that_parse_back_to_the_same_ir(expression):
    from kvpolicy import explain
    from kvpolicy.policy import compile_text

    def scores(text):
        policy = compile_text(f"""policy e "e" {{
          observe queries last 8
          score z = attn_logits(group = max)
          score s = {text}
          keep chosen = top_k(s, 16)
          compress at prefill
        }}""")
        return policy, policy.scores["s"]

    policy, ir_of = scores(expression)
    printed = explain.expr_text(ir_of)
    assert "((" not in printed
    assert scores(printed)[1] == ir_of, printed
