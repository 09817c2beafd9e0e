"""`fmt`: canonical, idempotent, keeps comments, and means the same thing."""
import pytest

import kvpolicy
from kvpolicy import formatter, library, syntax


def fmt(text: str) -> str:
    return formatter.format_policy(syntax.parse(text), text)


@pytest.mark.parametrize("name", library.shipped_names())
def test_shipped_policies_are_canonical(name):
    text = library.shipped_text(name)
    assert fmt(text) == text


def test_minimal_parentheses_keep_meaning():
    text = 'policy t "" {\n param a: tokens = (8 - (2 - 1)) * 2\n param b: tokens = ((8 - 2) - 1)\n}\n'
    out = fmt(text)
    assert "param a: tokens = (8 - (2 - 1)) * 2" in out and "param b: tokens = 8 - 2 - 1" in out
    assert kvpolicy.compile_text(out) == kvpolicy.compile_text(text)


def test_comments_and_blank_lines_survive():
    text = (
        "# header\n"
        'policy t "doc" {  # trailing on header\n'
        "  param budget: tokens = 8\n"
        "\n"
        "\n"
        "  # about keep\n"
        "  keep k = last budget # why\n"
        "  compress at prefill\n"
        "  # at the end\n"
        "}\n"
        "# after\n"
    )
    out = fmt(text)
    assert out == (
        "# header\n"
        'policy t "doc" {  # trailing on header\n'
        "  param budget: tokens = 8\n"
        "\n"
        "  # about keep\n"
        "  keep k = last budget  # why\n"
        "  compress at prefill\n"
        "  # at the end\n"
        "}\n"
        "# after\n"
    )
    assert fmt(out) == out


def test_long_tier_wraps_after_a_comma():
    text = library.shipped_text("hardkv")
    tier_lines = [line for line in text.splitlines() if line.strip().startswith("tier sparse")]
    assert all(len(line) <= formatter.WIDTH for line in text.splitlines())
    assert tier_lines and tier_lines[0].rstrip().endswith(",")


def test_prefill_guard_round_trips():
    text = 'policy t "" {\n  param budget: tokens = 8\n  keep k = last budget\n  compress at prefill when length>budget+1, every 4 steps\n}\n'
    out = fmt(text)
    assert "  compress at prefill when length > budget + 1, every 4 steps\n" in out and fmt(out) == out
    assert kvpolicy.compile_text(out) == kvpolicy.compile_text(text)
    assert kvpolicy.compile_text(out).triggers[0].min_length == 10
