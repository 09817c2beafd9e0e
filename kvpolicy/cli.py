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
CALIBRATE_TOKENS, CALIBRATE_MIN_TOKENS = 2048, 64


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

    exp = sub.add_parser("explain", help="what a policy keeps and when, in plain words (or, with --prompt, on a prompt)")
    exp.add_argument("files", nargs="+", metavar="FILE", help="a .kvp file or a shipped policy name (several with --prompt)")
    exp.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a param")
    exp.add_argument("--layers", type=int, metavar="N", help="show per-layer budgets for a model with N layers")
    exp.add_argument("--prompt", metavar="FILE", help="prefill this text file under each policy and report what every (layer, kv head) holds")
    exp.add_argument("--model", default="smollm2-135m", metavar="NAME", help="with --prompt: a known model name or a converted HF directory (default: smollm2-135m)")
    exp.add_argument("--chat", action="store_true", help="with --prompt: wrap the prompt in the model's chat template")
    exp.add_argument("--png", metavar="OUT", help="with --prompt: draw the held positions per head to this PNG")
    exp.add_argument("--json", metavar="OUT", help="with --prompt: write the held positions per head and the bytes as JSON")
    exp.add_argument("--mark", action="append", default=[], metavar="TEXT", help="with --prompt: show where TEXT (a needle) lies in the prompt")
    exp.set_defaults(run=cmd_explain)

    lst = sub.add_parser("list", help="the shipped policies, one line each")
    lst.set_defaults(run=cmd_list)

    cal = sub.add_parser(
        "calibrate",
        help="fit a policy's calibrations on English text and write a calibration file (for fit from)",
        description=(
            "Prefill --tokens tokens of English prose (licence texts on this machine) through the model under the policy, "
            "fit every calibration of the policy on every layer as its first compression would, and write the values to "
            "--out (safetensors + JSON header). A policy that says fit from \"FILE\" then loads them instead of fitting online."
        ),
    )
    cal.add_argument("file", metavar="POLICY", help="a .kvp file or a shipped policy name")
    cal.add_argument("--model", default="smollm2-135m", metavar="NAME", help="a known model name or a converted HF directory (default: smollm2-135m)")
    cal.add_argument("--out", required=True, metavar="FILE", help="the calibration file to write (e.g. hardkv.calib.safetensors)")
    cal.add_argument("--tokens", type=int, default=CALIBRATE_TOKENS, metavar="N", help=f"length of the text in tokens, {CALIBRATE_MIN_TOKENS}..8192 (default: {CALIBRATE_TOKENS})")
    cal.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a param")
    cal.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's own, one per core)")
    cal.set_defaults(run=cmd_calibrate)

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
    needs_prompt = [flag for flag, value in (("--png", args.png), ("--json", args.json), ("--mark", args.mark), ("--chat", args.chat)) if value]
    if args.prompt is None and needs_prompt:
        raise UsageError(f"{needs_prompt[0]} needs --prompt FILE")
    overrides = _overrides(args.set)
    policies = [_compile(path, overrides)[0] for path in args.files]
    if args.prompt is not None:
        from . import explain_prompt

        explain_prompt.run(policies, args)
        return EXIT_OK
    try:
        sys.stdout.write("\n".join(explain(policy, args.layers) for policy in policies))
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


def cmd_calibrate(args) -> int:
    if not CALIBRATE_MIN_TOKENS <= args.tokens <= 8192:
        raise UsageError(f"--tokens must be between {CALIBRATE_MIN_TOKENS} and 8192, got {args.tokens}")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    policy, filename = _compile(args.file, _overrides(args.set))
    if not policy.calibrations:
        raise UsageError(f"{filename}: policy {policy.name} has no calibrate block, nothing to fit")
    if not policy.triggers:
        raise UsageError(f"{filename}: policy {policy.name} never compresses, so its calibrations are never used")
    out = Path(args.out)
    _check_writable(out)

    import numpy as np
    import torch

    from . import calibration_file, models
    from .backends.hf import fit_text
    from .backends.torch import ModelShape

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    directory = models.path(args.model)  # an unknown model fails here, before any progress line
    print(f"kvpolicy: loading {args.model}", file=sys.stderr)
    model, tok = models.load(directory)
    shape = ModelShape.from_config(model.config, args.model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and args.tokens > limit:
        raise UsageError(f"--tokens {args.tokens} is more than {args.model} reads ({limit} positions)")
    ids = fit_text.english_ids(tok, args.tokens)
    names = ", ".join(c.name for c in policy.calibrations)
    print(f"kvpolicy: fitting {names} of {policy.name} on {ids.shape[1]} tokens of English text, {shape.num_layers} layers", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if done == total or done % 10 == 0:
            print(f"kvpolicy: {done}/{total} layers fitted", file=sys.stderr)

    fitted = fit_text.fit_on_text(model, policy, ids, progress)
    model_info = {"name": args.model, "layers": shape.num_layers, "kv_heads": shape.num_kv_heads,
                  "q_heads": shape.num_q_heads, "head_dim": shape.head_dim}
    path = calibration_file.write(
        out, policy, model=model_info, values=fitted.values, errors=fitted.errors, row_errors=fitted.row_errors,
        text={"source": "kvpolicy.texts.english_text", "tokens": int(ids.shape[1])}, source=filename,
    )
    print(f"wrote {path}: {names} of {policy.name} for {args.model} ({shape.num_layers} layers x {shape.num_kv_heads} kv heads), fitted on {ids.shape[1]} tokens")
    for cal in policy.calibrations:
        values, errors = fitted.values[cal.name], fitted.errors[cal.name]
        within = int(fitted.converged[cal.name].sum())
        print(
            f"  {cal.name}: {values.min():.3g}..{values.max():.3g} (median {float(np.median(values)):.3g}); "
            f"|mean mass - p| mean {errors.mean():.4f}, max {errors.max():.4f}, within tol {cal.solver.tol:g} in {within}/{values.size} heads; "
            f"mean |mass - p| over query rows {fitted.row_errors[cal.name].mean():.4f}"
        )
    return EXIT_OK


def _check_writable(out: Path) -> None:
    """Fail before an expensive run if `out` cannot be written."""
    import tempfile

    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"cannot write {out}: {blocking} is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"cannot write {out}: {err.strerror or err}") from None


if __name__ == "__main__":
    sys.exit(main())
