"""Hostile and broken input, through the real console script and in-process.

Every case must end with exit code 1 and a positioned `FILE:LINE:COL: error:`
report (the position is derived by hand in each case), never a traceback,
and quickly: each subprocess has a timeout, so a hang fails instead of
blocking the suite. Usage errors (missing file, bad --set, unknown command)
exit 2.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import kvpolicy
from kvpolicy import cli, library, syntax

SCRIPT = Path(sys.executable).with_name("kvpolicy")
TIMEOUT = 60


def kvpolicy_cmd() -> list[str]:
    """The installed console script; `python -m kvpolicy.cli` if it is missing."""
    if SCRIPT.exists():
        return [str(SCRIPT)]
    found = shutil.which("kvpolicy")
    return [found] if found else [sys.executable, "-m", "kvpolicy.cli"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        kvpolicy_cmd() + list(args),
        capture_output=True,
        timeout=TIMEOUT,
        cwd=cwd,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def run_inprocess(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def _b(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


# ----------------------------------------------------------------- the cases

VALID = "policy a {\n  param budget: tokens = 5\n  keep r = last budget\n  compress at prefill\n}\n"


@dataclass(frozen=True)
class Case:
    id: str
    content: bytes
    line: int
    col: int
    message: str  # a regex the first diagnostic's message must match
    args: tuple[str, ...] = ()  # extra CLI args (e.g. --set)


def _ten_megabytes() -> bytes:
    comment = "  # " + "x" * 75 + "\n"  # 80 bytes a line
    return ("policy big {\n" + comment * (10 * 1024 * 1024 // len(comment)) + "}\n").encode()


CASES = [
    Case("empty", b"", 1, 1, r"empty policy"),
    Case("whitespace", b"  \n\t\n   \n", 1, 1, r"empty policy"),
    # A PNG header: byte 0 (0x89) is not UTF-8.
    Case("binary-garbage", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", 1, 1, r"invalid UTF-8 \(byte 0x89\)"),
    # Control bytes that are valid UTF-8 reach the lexer: first one at line 2, col 3.
    Case("binary-after-header", b"policy a {\n  \x01\x02\x03\x04\n}\n", 2, 3, r"unexpected character U\+0001"),
    # '  keep ' is 7 characters, so the bad byte is column 8 of line 3.
    Case("invalid-utf8", b"policy a {\n  param budget: tokens = 5\n  keep \xff = last budget\n}\n", 3, 8, r"invalid UTF-8 \(byte 0xff\)"),
    # Columns count characters, not bytes: '  # h\xc3\xa9llo ' is 10 characters (12 bytes).
    Case("invalid-utf8-after-multibyte", "policy a {\n  # héllo ".encode() + b"\xc3\x28\n}\n", 2, 11, r"invalid UTF-8 \(byte 0xc3\)"),
    # 'param b' ends at column 9; the NUL is column 10.
    Case("nul-byte", b"policy a {\n  param b\x00: tokens = 5\n}\n", 2, 10, r"unexpected character U\+0000"),
    Case("nul-first", b"\x00policy a {\n}\n", 1, 1, r"unexpected character U\+0000"),
    Case("unknown-keyword", b"policy a {\n  param budget: tokens = 5\n  kep r = last budget\n  compress at prefill\n}\n", 3, 3, r"unknown statement 'kep'; did you mean 'keep'\?"),
    Case("unknown-keyword-2", b"policy a {\n  param budget: tokens = 5\n  keep r = last budget\n  compres at prefill\n}\n", 4, 3, r"unknown statement 'compres'; did you mean 'compress'\?"),
    # The '{' of line 1 is never closed: reported at the end of the text
    # (line 2 is '  param budget: tokens = 5', 26 characters, so column 27).
    Case("unterminated-block", b"policy a {\n  param budget: tokens = 5\n", 2, 27, r"not closed.*line 1"),
    # The inner cascade block (line 3) is the one left open.
    Case("unterminated-inner-block", b"policy a {\n  param r: steps = 4\n  cascade {\n    tier fresh: new\n", 4, 20, r"not closed.*line 3"),
    # The string opens at column 10 of line 1 and runs into the newline.
    Case("unterminated-string", b'policy a "a doc that never ends {\n  param budget: tokens = 5\n}\n', 1, 10, r"unterminated string"),
    Case("duplicate-param", b"policy a {\n  param budget: tokens = 5\n  param budget: tokens = 6\n}\n", 3, 9, r"'budget' is already defined on line 2"),
    Case("duplicate-keep", b"policy a {\n  keep r = last 4\n  keep r = first 2\n  compress at prefill\n}\n", 3, 8, r"keep 'r' is already defined on line 2"),
    Case("duplicate-tier", b"policy a {\n  cascade {\n    tier t: new\n    tier t: from t\n  }\n  compress every 4 steps\n}\n", 4, 10, r"tier 't' is already defined on line 3"),
    # '  param budget: tokens = ' is 25 characters: the number starts at column 26.
    Case("huge-float", b"policy a {\n  param budget: tokens = 1e400\n}\n", 2, 26, r"too large"),
    Case("huge-int", b"policy a {\n  param budget: tokens = 99999999999999999999\n}\n", 2, 26, r"too large"),
    Case("huge-product", b"policy a {\n  param budget: tokens = 1000000 * 1000000 * 10\n}\n", 2, 26, r"too large"),
    Case("negative-budget", b"policy a {\n  param budget: tokens = -5\n}\n", 2, 26, r"non-negative.*-5"),
    # --set is reported at the default it replaces (column 26 of line 2).
    Case("negative-budget-set", VALID.encode(), 2, 26, r"non-negative.*-5.*set to -5", ("--set", "budget=-5")),
    Case("set-not-a-number", VALID.encode(), 2, 26, r"must be a number; --set gave 'lots'", ("--set", "budget=lots")),
    Case("set-unknown-param", VALID.encode(), 1, 8, r"no param 'budgt' to set; did you mean 'budget'\?", ("--set", "budgt=4")),
    # Overrides are numbers within the same limits as literals.
    Case("set-huge", VALID.encode(), 2, 26, r"too large.*set to 1e20", ("--set", "budget=1e20")),
    Case("set-infinite", VALID.encode(), 2, 26, r"too large", ("--set", "budget=inf")),
    Case("set-nan", VALID.encode(), 2, 26, r"must be a number; --set gave 'nan'", ("--set", "budget=nan")),
    # A state named after a built-in (this crashed the checker with a KeyError).
    Case("state-named-builtin", b"policy a {\n  state adam += attn(group = sum)\n  keep k = top_k(adam, 4)\n  compress at prefill\n}\n", 2, 9, r"'adam' is a built-in function"),
    Case("state-named-keyword", b"policy a {\n  state layer += key_norm() decay 2\n}\n", 2, 9, r"reserved word"),
    # An enum argument must be one of its words: '  score t = pool(' is 17 characters.
    Case("enum-not-a-word", b"policy a {\n  score s = key_norm()\n  score t = pool(max(), 3, s)\n}\n", 3, 18, r"pool's op is one of the words max or mean, not an expression"),
    # The policy's '{' is depth 1, so the 64th '(' (column 26 + 63) is depth 65.
    Case("deep-parentheses", ("policy a {\n  param budget: tokens = " + "(" * 5000 + "1" + ")" * 5000 + "\n}\n").encode(), 2, 89, r"nested more than 64 deep"),
    Case("deep-brackets-first-line", ("policy a " + "{" * 100 + "\n").encode(), 1, 74, r"nested more than 64 deep"),
    # A flat 20000-term sum parses, but is far too deep a tree to check: the
    # error points at the start of the expression.
    Case("long-sum", ("policy a {\n  param budget: tokens = " + "+".join(["1"] * 20000) + "\n}\n").encode(), 2, 26, r"too (long|deep)"),
    Case("long-negation", ("policy a {\n  param budget: tokens = " + "-" * 5000 + "1\n}\n").encode(), 2, 26, r"too (long|deep)"),
    Case("long-union", ("policy a {\n  keep k = " + " | ".join(["last 1"] * 3000) + "\n  compress at prefill\n}\n").encode(), 2, 12, r"too (long|deep)"),
    Case("ten-megabytes", _ten_megabytes(), 1, 1, r"file too large"),
]
BY_ID = {c.id: c for c in CASES}


def _header_re(name: str, line: int, col: int) -> str:
    return rf"(?m)^{re.escape(name)}:{line}:{col}: error: "


def _assert_report(stderr: str, name: str, case: Case) -> None:
    assert "Traceback" not in stderr, stderr
    match = re.search(_header_re(name, case.line, case.col) + "(.*)$", stderr)
    assert match, f"expected {name}:{case.line}:{case.col}: error: ... in\n{stderr[:2000]}"
    assert re.search(case.message, match.group(1)), f"message {match.group(1)!r} does not match {case.message!r}"
    first = stderr.splitlines()[0]
    assert re.match(rf"{re.escape(name)}:\d+:\d+: error: ", first), first


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    for case in CASES:
        (root / f"{case.id}.kvp").write_bytes(case.content)
    return root


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_console_script_reports_position(case: Case, case_dir: Path) -> None:
    result = run_cli("check", f"{case.id}.kvp", *case.args, cwd=case_dir)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1, stderr
    _assert_report(stderr, f"{case.id}.kvp", case)
    assert result.stdout == b""


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_in_process_reports_position(case: Case, case_dir: Path) -> None:
    path = str(case_dir / f"{case.id}.kvp")
    code, out, err = run_inprocess("check", path, *case.args)
    assert code == 1, err
    _assert_report(err, path, case)

    # The Python API raises PolicyError with the same first position.
    overrides = dict(a.split("=", 1) for a in case.args[1::2])
    with pytest.raises(kvpolicy.PolicyError) as info:
        kvpolicy.compile_text(case.content, "mem.kvp", overrides)
    positions = [(d.span.line, d.span.col) for d in info.value.diagnostics]
    assert (case.line, case.col) in positions, positions
    assert str(info.value).startswith("mem.kvp:")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_text_and_bytes_agree(case: Case) -> None:
    """compile_text on str (when the bytes are UTF-8) reports what it does on bytes."""
    try:
        text = case.content.decode("utf-8")
    except UnicodeDecodeError:
        pytest.skip("not UTF-8")
    overrides = dict(a.split("=", 1) for a in case.args[1::2])
    with pytest.raises(kvpolicy.PolicyError) as from_text:
        kvpolicy.compile_text(text, "x.kvp", overrides)
    with pytest.raises(kvpolicy.PolicyError) as from_bytes:
        kvpolicy.compile_text(case.content, "x.kvp", overrides)
    assert [(d.span, d.message) for d in from_text.value.diagnostics] == [(d.span, d.message) for d in from_bytes.value.diagnostics]


def test_ten_megabytes_names_the_limit(case_dir: Path) -> None:
    result = run_cli("check", "ten-megabytes.kvp", cwd=case_dir)
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert f"{syntax.MAX_BYTES // 1024} KiB" in stderr
    # The size shown must not understate a 10 MB file as 1.0 MB.
    assert "(1.0 MB)" not in stderr


def test_several_files_one_bad(case_dir: Path) -> None:
    (case_dir / "good.kvp").write_text(VALID)
    result = run_cli("check", "good.kvp", "unknown-keyword.kvp", "snapkv", cwd=case_dir)
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert re.search(_header_re("unknown-keyword.kvp", 3, 3), stderr)
    assert "good.kvp" not in stderr and "Traceback" not in stderr


def test_valid_file_passes(case_dir: Path) -> None:
    (case_dir / "good.kvp").write_text(VALID)
    result = run_cli("check", "good.kvp", "--set", "budget=7", cwd=case_dir)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""


def test_reserved_word_as_argument_name(case_dir: Path) -> None:
    """linear's arguments are called first and last, which are keywords: say so."""
    text = "policy a {\n  score s = key_norm()\n  keep k = top_k(s, 5) by layer linear(first = 1, last = 2)\n  compress at prefill\n}\n"
    with pytest.raises(kvpolicy.PolicyError) as info:
        kvpolicy.compile_text(text, "kw.kvp")
    (diag,) = info.value.diagnostics
    # 'first' starts at column 40 of line 3.
    assert (diag.span.line, diag.span.col) == (3, 40)
    assert "reserved word" in diag.message and "by position" in diag.message


def test_lone_surrogate_in_a_str() -> None:
    """A str may hold what no UTF-8 file can: a lone surrogate (here in the doc string)."""
    with pytest.raises(kvpolicy.PolicyError) as info:
        kvpolicy.compile_text('policy a "x\ud800" {\n}\n', "s.kvp")
    (diag,) = info.value.diagnostics
    assert (diag.span.line, diag.span.col) == (1, 12)  # 'policy a "x' is 11 characters
    assert "U+D800" in diag.message


@pytest.mark.parametrize("value", [10**400, float("inf"), float("-inf"), float("nan"), 1e13, True, "12 tokens"])
def test_api_overrides_out_of_range(value) -> None:
    with pytest.raises(kvpolicy.PolicyError) as info:
        kvpolicy.load("snapkv", budget=value)
    (diag,) = info.value.diagnostics
    line = SNAPKV_LINES.index("  param budget: tokens = 1024") + 1
    assert (diag.span.line, diag.span.col) == (line, 26)


SNAPKV_LINES = library.shipped_text("snapkv").split("\n")


def test_a_prob_divided_by_a_number_is_a_prob() -> None:
    text = "policy a {\n  param p: prob = 0.9\n  observe queries last 8\n  keep k = top_p(attn(), p / 2) | top_p(attn(), p * 0.5)\n  compress at prefill\n}\n"
    policy = kvpolicy.compile_text(text)
    assert [part.p for part in policy.keeps[0].select.parts] == [0.45, 0.45]


def test_statement_after_the_policy_block() -> None:
    with pytest.raises(kvpolicy.PolicyError) as info:
        kvpolicy.compile_text("policy a {\n}\nkeep x = last 1\n", "after.kvp")
    (diag,) = info.value.diagnostics
    assert (diag.span.line, diag.span.col) == (3, 1)
    assert "end of file" in diag.message and "<" not in diag.message


# ----------------------------------------------------------------- usage errors (exit 2)


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("check", str(tmp_path / "nope.kvp"))
    assert result.returncode == 2
    assert b"cannot read" in result.stderr and b"Traceback" not in result.stderr
    code, _, err = run_inprocess("check", str(tmp_path / "nope.kvp"))
    assert code == 2 and "cannot read" in err


def test_unknown_shipped_name_is_a_usage_error() -> None:
    result = run_cli("check", "snapkvv")
    assert result.returncode == 2
    assert b"did you mean 'snapkv'" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.parametrize("bad", ["budget", "=5", "budget=", " = "])
def test_bad_set_syntax_is_a_usage_error(bad: str, case_dir: Path) -> None:
    (case_dir / "good.kvp").write_text(VALID)
    result = run_cli("check", "good.kvp", "--set", bad, cwd=case_dir)
    assert result.returncode == 2, result.stderr.decode()
    assert b"--set expects NAME=VALUE" in result.stderr and b"Traceback" not in result.stderr
    code, _, err = run_inprocess("compile", str(case_dir / "good.kvp"), "--set", bad, "-o", str(case_dir / "never"))
    assert code == 2 and "--set expects NAME=VALUE" in err
    assert not (case_dir / "never").exists()


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = run_cli("frobnicate", "x.kvp")
    assert result.returncode == 2
    assert b"invalid choice" in result.stderr and b"Traceback" not in result.stderr
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(io.StringIO()):
        cli.main(["frobnicate", "x.kvp"])
    assert info.value.code == 2


def test_no_arguments_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2 and b"Traceback" not in result.stderr


# ----------------------------------------------------------------- fmt and compile leave no trace


@pytest.mark.parametrize("case", [c for c in CASES if not c.args], ids=lambda c: c.id)
def test_fmt_leaves_a_broken_file_untouched(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "broken.kvp"
    path.write_bytes(case.content)
    before = os.stat(path)
    code, _, err = run_inprocess("fmt", str(path))
    if case.id in ("duplicate-param", "duplicate-keep", "duplicate-tier", "huge-float", "huge-int", "huge-product", "negative-budget", "state-named-builtin", "state-named-keyword", "enum-not-a-word"):
        # Well-formed text with a meaning error: fmt only needs the syntax.
        assert code == 0, err
        return
    assert code == 1, err
    assert "Traceback" not in err
    assert re.search(_header_re(str(path), case.line, case.col), err), err
    assert path.read_bytes() == case.content
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert [p.name for p in tmp_path.iterdir()] == ["broken.kvp"]  # no temporary left behind


def test_fmt_console_script_on_syntax_error(tmp_path: Path) -> None:
    content = b"policy a {\n  param budget: tokens = 5\n  keep r = last budget  # recent\n  compress at prefil\n}\n"
    path = tmp_path / "broken.kvp"
    path.write_bytes(content)
    for args in (("fmt", str(path)), ("fmt", "--check", str(path))):
        result = run_cli(*args)
        assert result.returncode == 1
        assert re.search(_header_re(str(path), 4, 15), result.stderr.decode()), result.stderr.decode()
        assert path.read_bytes() == content


def test_fmt_formats_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.kvp"
    path.write_text("policy a {param budget:tokens=5 keep r=last budget   # recent\ncompress at prefill}")
    assert run_cli("fmt", "--check", str(path)).returncode == 1
    result = run_cli("fmt", str(path))
    assert result.returncode == 0, result.stderr.decode()
    assert path.read_text() == "policy a {\n  param budget: tokens = 5\n  keep r = last budget  # recent\n  compress at prefill\n}\n"
    assert run_cli("fmt", "--check", str(path)).returncode == 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compile_writes_no_manifest_for_an_invalid_policy(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "bad.kvp"
    path.write_bytes(case.content)
    out = tmp_path / "out"
    code, _, err = run_inprocess("compile", str(path), "-o", str(out), *case.args)
    assert code == 1, err
    assert "Traceback" not in err
    assert not (out / "manifest.json").exists()
    assert not out.exists() or not any(out.iterdir())


def test_compile_console_script_invalid_then_valid(tmp_path: Path) -> None:
    bad, good, out = tmp_path / "bad.kvp", tmp_path / "good.kvp", tmp_path / "out"
    bad.write_bytes(BY_ID["unknown-keyword"].content)
    good.write_text(VALID)
    result = run_cli("compile", str(bad), "-o", str(out))
    assert result.returncode == 1 and b"Traceback" not in result.stderr
    assert not (out / "manifest.json").exists()
    result = run_cli("compile", str(good), "-o", str(out), "--set", "budget=-5")
    assert result.returncode == 1 and not (out / "manifest.json").exists()
    result = run_cli("compile", str(good), "-o", str(out))
    assert result.returncode == 0, result.stderr.decode()
    assert (out / "manifest.json").exists()
