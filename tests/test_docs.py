"""The README shows real things: its policy is the shipped one, its error is real output."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_policy_is_the_shipped_snapkv():
    block = re.search(r"```\n# policies/snapkv.kvp\n(.*?)```", README, re.S).group(1)
    shipped = (ROOT / "policies/snapkv.kvp").read_text()
    assert block.strip() in shipped


def test_readme_error_is_what_check_prints(tmp_path):
    shown = re.search(r"\$ kvpolicy check mine.kvp\n(.*?)```", README, re.S).group(1)
    source = tmp_path / "mine.kvp"
    source.write_text(
        'policy mine "a SnapKV variant" {\n  param budget: tokens = 1024\n  param window: tokens = 32\n  param p: prob = 0.9\n'
        "  observe queries last window\n  score s = pool(max, 7, atn(group = mean))\n  keep recent = last window\n"
        "  keep selected = top_k(s, p) per kv_head\n  compress at prefill\n}\n"
    )
    result = subprocess.run([sys.executable, "-m", "kvpolicy.cli", "check", "mine.kvp"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == shown.strip()


def test_language_reference_examples_check(tmp_path):
    text = (ROOT / "docs/language.md").read_text()
    blocks = re.findall(r"```kvp\n(.*?)```", text, re.S)
    assert len(blocks) >= 10
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.kvp"
        path.write_text(block)
        result = subprocess.run([sys.executable, "-m", "kvpolicy.cli", "check", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"example {i} of docs/language.md:\n{block}\n{result.stderr}"
