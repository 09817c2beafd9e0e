"""The `kvpolicy` command.

Exit codes: 0 ok, 1 an invalid policy (or a file that is not formatted, for
`fmt --check`), 2 a usage error (bad flags, unreadable file). A policy error
prints positioned diagnostics, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__, formatter, library, syntax
from .diagnostics import PolicyError
from .errors import KvpolicyError
from .explain import explain
from .manifest import BACKENDS, write_atomic, write_manifest
from .policy import compile_text, read_source

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


class UsageError(KvpolicyError):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return args.run(args)
    except UsageError as err:
        print(f"kvpolicy: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except PolicyError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_INVALID
    except KvpolicyError as err:
        print(f"kvpolicy: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kvpolicy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`, say
        return EXIT_OK
    except OSError as err:  # e.g. an output directory that cannot be created
        where = f": {err.filename}" if err.filename else ""
        print(f"kvpolicy: error: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvpolicy", description="Check, format, compile and explain KV-cache compression policies (.kvp).")
    p.add_argument("--version", action="version", version=f"kvpolicy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="check policies; exit 1 with FILE:LINE:COL errors if any is invalid")
    check.add_argument("files", nargs="+", metavar="FILE", help="a .kvp file or a shipped policy name")
    check.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a param")
    check.set_defaults(run=cmd_check)

    fmt = sub.add_parser("fmt", help="rewrite policies in canonical form")
    fmt.add_argument("files", nargs="+", metavar="FILE")
    fmt.add_argument("--check", action="store_true", help="only report files that are not formatted (exit 1)")
    fmt.set_defaults(run=cmd_fmt)

    comp = sub.add_parser("compile", help="check a policy and write DIR/manifest.json")
    comp.add_argument("file", metavar="FILE")
    comp.add_argument("--backend", choices=BACKENDS, default="torch")
    comp.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a param")
    comp.add_argument("-o", "--output", metavar="DIR", help="output directory (default: build/NAME)")
    comp.set_defaults(run=cmd_compile)

    exp = sub.add_parser("explain", help="what a policy keeps and when, in plain words")
    exp.add_argument("file", metavar="FILE")
    exp.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a param")
    exp.add_argument("--layers", type=int, metavar="N", help="show per-layer budgets for a model with N layers")
    exp.set_defaults(run=cmd_explain)

    lst = sub.add_parser("list", help="the shipped policies, one line each")
    lst.set_defaults(run=cmd_list)

    from .evaluate.command import add_parser as add_eval_parser

    add_eval_parser(sub)
    return p


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"--set expects NAME=VALUE, got '{pair}'")
        out[name.strip()] = value.strip()
    return out


def _compile(path_or_name: str, overrides: dict[str, str]):
    text, filename = read_source(path_or_name)
    return compile_text(text, filename, overrides), filename


def cmd_check(args) -> int:
    overrides = _overrides(args.set)
    status = EXIT_OK
    for path in args.files:
        try:
            _compile(path, overrides)
        except PolicyError as err:
            print(err.render(), file=sys.stderr)
            status = EXIT_INVALID
        except KvpolicyError as err:
            print(f"kvpolicy: error: {err}", file=sys.stderr)
            status = max(status, EXIT_USAGE) if status != EXIT_INVALID else status
    return status


def cmd_fmt(args) -> int:
    status = EXIT_OK
    for path in args.files:
        if not os.path.isfile(path):
            raise UsageError(f"cannot read {path}: no such file")
        text, filename = read_source(path)
        tree = syntax.parse(text, filename)
        original = text.decode("utf-8") if isinstance(text, bytes) else text
        formatted = formatter.format_policy(tree, original)
        if formatted == original:
            continue
        if args.check:
            print(f"{filename}: not formatted (run: kvpolicy fmt {filename})", file=sys.stderr)
            status = EXIT_INVALID
        else:
            write_atomic(Path(path), formatted)
            print(f"formatted {filename}")
    return status


def cmd_compile(args) -> int:
    policy, filename = _compile(args.file, _overrides(args.set))
    out_dir = Path(args.output or os.path.join("build", policy.name))
    if args.backend == "triton":
        raise UsageError("the triton backend is not built yet; use --backend torch")
    path = write_manifest(out_dir, policy, args.backend, filename)
    print(f"{filename}: {policy.name} {policy.content_hash[:19]} -> {path}")
    return EXIT_OK


def cmd_explain(args) -> int:
    if args.layers is not None and not 1 <= args.layers <= 4096:
        raise UsageError("--layers must be between 1 and 4096")
    policy, _ = _compile(args.file, _overrides(args.set))
    try:
        sys.stdout.write(explain(policy, args.layers))
    except ValueError as err:  # e.g. a by-layer table of another length
        raise UsageError(str(err)) from None
    return EXIT_OK


def cmd_list(args) -> int:
    texts = library.shipped()
    width = max(map(len, texts))
    for name, text in texts.items():
        doc = compile_text(text, f"policies/{name}.kvp").doc or ""
        print(f"{name:<{width}}  {doc}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
