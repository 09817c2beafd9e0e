"""Calibration files: fitted temperatures saved once, loaded by `fit from "FILE"`.

`kvpolicy calibrate POLICY --model M --out FILE` fits every calibration of a
policy on real English text and writes FILE; a policy whose calibration says
`fit from "FILE"` then takes its values from the file instead of fitting
online. The format is engine-agnostic (numpy arrays; no torch needed to read
or write it):

- a safetensors file; per calibration NAME three float32 tensors of shape
  [layers, kv_heads]: `NAME` (the fitted values), `NAME.error` (|mean mass -
  p| at the fitted value, what the solver drives under tol) and
  `NAME.row_error` (mean over query rows of |mass - p|: the spread between
  rows that no single value removes). A per-layer scope repeats its value
  over the heads.
- its metadata holds `format` ("kvpolicy-calibration") and `kvpolicy`, a JSON
  header: format version, kvpolicy version, creation date, the model (name,
  layers, kv heads, query heads, head dim), the policy (name, content hash,
  source, params), the text (where from, length in tokens) and, per
  calibration, its definition hash and settings (p, solver, init, clamp,
  scope, observe window).

Which hash is checked. A file is usable by a policy when, for the calibration
being loaded, the *calibration hash* matches: the sha256 of the calibrate
block's definition -- scope, target, metric, solver, init, clamp -- with every
named score, state and other calibration it reads inlined (so renaming a
score changes nothing), plus the observe window and the IR version. It leaves
out the `fit` clause (so a file written from a policy with `fit once` serves
the same policy with `fit from`), the calibration's own name, and everything
that does not feed the fit (budgets, keeps, tiers, triggers: one file serves
every budget). The policy's full content hash is stored too, for the record,
but not checked. The model is checked by shape (layers, kv heads); its name
is recorded but not compared (a converted model's path differs per machine).

Files are written to a temporary name in the same directory and renamed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, ast, ir, syntax
from .diagnostics import Diagnostic, PolicyError, Source, Span
from .errors import KvpolicyError

FORMAT = "kvpolicy-calibration"
FORMAT_VERSION = 1


class CalibrationFileError(KvpolicyError):
    """A calibration file that cannot be used: one line naming the file."""


# ----------------------------------------------------------------- what is hashed


def _calibration(policy: ir.Policy, name: str) -> ir.Calibration:
    for cal in policy.calibrations:
        if cal.name == name:
            return cal
    raise KeyError(name)


def _definition(policy: ir.Policy, name: str, outer: tuple[str, ...] = ()) -> dict:
    """The calibration's definition as JSON data, named references inlined."""
    states = {s.name: s for s in policy.states}

    def inline(node):
        if isinstance(node, list):
            return [inline(v) for v in node]
        if not isinstance(node, dict):
            return node
        if node.get("op") == "ref":
            kind, ref = node["kind"], node["name"]
            if kind == "score":
                return inline(policy.scores[ref].model_dump(mode="json"))
            if kind == "state":
                state = states[ref]
                return {"op": "state", "update": inline(state.update.model_dump(mode="json")), "decay": state.decay}
            if ref == name:
                return {"op": "fitted"}
            if ref in outer:  # the checker rejects cycles; never loop here
                return {"op": "calibration", "cycle": ref}
            return {"op": "calibration", "definition": _definition(policy, ref, outer + (name,))}
        return {key: inline(value) for key, value in node.items()}

    body = _calibration(policy, name).model_dump(mode="json", exclude={"fit", "name"})
    return {"ir_version": policy.ir_version, "observe": policy.observe, "calibration": inline(body)}


def calibration_hash(policy: ir.Policy, name: str) -> str:
    """What a calibration file is checked against (see the module doc)."""
    data = json.dumps(_definition(policy, name), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def _number(x: float) -> str:
    return f"{x:g}"


def calibration_settings(policy: ir.Policy, name: str) -> dict:
    """The settings a reader compares first, in the language's own words."""
    cal = _calibration(policy, name)
    s = cal.solver
    solver = (
        f"adam(lr = {_number(s.lr)}, steps = {s.steps}, tol = {_number(s.tol)})"
        if s.kind == "adam"
        else f"bisect(steps = {s.steps}, tol = {_number(s.tol)})"
    )
    return {
        "p": float(cal.target.options["p"]),
        "solver": solver,
        "init": float(cal.init),
        "clamp": [float(cal.clamp[0]), float(cal.clamp[1])],
        "scope": "(" + ", ".join(cal.scope) + ")" if len(cal.scope) > 1 else cal.scope[0],
        "observe": policy.observe,
    }


def normalised(policy: ir.Policy) -> ir.Policy:
    """The policy with every calibration set to `fit once`: what `kvpolicy
    calibrate` runs (a `fit from` policy can be calibrated into its own file)."""
    cals = tuple(c.model_copy(update={"fit": ir.Fit(kind="once")}) for c in policy.calibrations)
    return policy.model_copy(update={"calibrations": cals})


# ----------------------------------------------------------------- the file


@dataclass(frozen=True)
class CalibrationFile:
    path: Path
    header: dict
    values: dict = field(default_factory=dict)  # name -> np.ndarray [layers, kv_heads] float32
    errors: dict = field(default_factory=dict)  # name -> np.ndarray, |mean mass - p|
    row_errors: dict = field(default_factory=dict)  # name -> np.ndarray, mean |mass - p|

    @property
    def layers(self) -> int:
        return int(self.header["model"]["layers"])

    @property
    def kv_heads(self) -> int:
        return int(self.header["model"]["kv_heads"])

    def describe_model(self) -> str:
        model = self.header["model"]
        return f"{model['layers']} layers x {model['kv_heads']} kv heads ({model.get('name') or 'unnamed model'})"


def write(
    path: str | os.PathLike,
    policy: ir.Policy,
    *,
    model: dict,
    values: dict,
    errors: dict,
    row_errors: dict,
    text: dict,
    source: str | None = None,
    created: str | None = None,
) -> Path:
    """Write a calibration file atomically. `model` has name, layers, kv_heads
    (and optionally q_heads, head_dim); `values`, `errors` and `row_errors`
    map each calibration name to a [layers, kv_heads] array; `text` says what
    the fit read (e.g. {"source": ..., "tokens": 512})."""
    import numpy as np
    from safetensors.numpy import save

    shape = (int(model["layers"]), int(model["kv_heads"]))
    tensors = {}
    calibrations = {}
    for cal in policy.calibrations:
        if cal.name not in values:
            raise KvpolicyError(f"no fitted values for calibration {cal.name}")
        for suffix, table in (("", values), (".error", errors), (".row_error", row_errors)):
            array = np.ascontiguousarray(np.asarray(table[cal.name], dtype=np.float32))
            if array.shape != shape:
                raise KvpolicyError(f"calibration {cal.name}{suffix}: shape {array.shape}, expected {shape}")
            tensors[cal.name + suffix] = array
        calibrations[cal.name] = {"hash": calibration_hash(policy, cal.name), **calibration_settings(policy, cal.name)}
    header = {
        "format_version": FORMAT_VERSION,
        "kvpolicy_version": __version__,
        "created": created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": dict(model),
        "policy": {
            "name": policy.name,
            "hash": policy.content_hash,
            "source": source,
            "params": {name: p.value for name, p in policy.params.items()},
        },
        "text": dict(text),
        "calibrations": calibrations,
    }
    data = save(tensors, metadata={"format": FORMAT, "kvpolicy": json.dumps(header, sort_keys=True)})
    out = Path(path)
    _write_bytes_atomic(out, data)
    return out


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read(path: str | os.PathLike) -> CalibrationFile:
    """Read and validate a calibration file (not yet against a policy)."""
    from safetensors import SafetensorError, safe_open
    import numpy as np

    path = Path(path)
    if not path.is_file():
        why = "it is a directory" if path.is_dir() else "no such file"
        raise CalibrationFileError(f"cannot read calibration file {path}: {why}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CalibrationFileError(f"{path} is not a kvpolicy calibration file ({reason})") from None
    if metadata.get("format") != FORMAT:
        raise CalibrationFileError(f"{path} is not a kvpolicy calibration file (a safetensors file without the '{FORMAT}' header)")
    try:
        header = json.loads(metadata["kvpolicy"])
        version = header["format_version"]
        layers, kv_heads = int(header["model"]["layers"]), int(header["model"]["kv_heads"])
        names = list(header["calibrations"])
    except (KeyError, TypeError, ValueError):
        raise CalibrationFileError(f"{path}: damaged calibration header") from None
    if version != FORMAT_VERSION:
        raise CalibrationFileError(f"{path}: calibration file format {version}; this kvpolicy ({__version__}) reads format {FORMAT_VERSION}")
    out = CalibrationFile(path, header)
    for name in names:
        for suffix, table in (("", out.values), (".error", out.errors), (".row_error", out.row_errors)):
            array = tensors.get(name + suffix)
            if array is None or array.shape != (layers, kv_heads):
                got = "missing" if array is None else f"shape {list(array.shape)}"
                raise CalibrationFileError(f"{path}: tensor '{name}{suffix}' is {got}, the header says [{layers}, {kv_heads}]")
            table[name] = array.astype(np.float32)
        values = out.values[name]
        if not (np.isfinite(values).all() and (values > 0).all()):
            raise CalibrationFileError(f"{path}: calibration {name} holds values that are not positive numbers")
    return out


# ----------------------------------------------------------------- using a file


def resolve(file: str, policy_filename: str | None) -> Path:
    """`fit from "FILE"`: absolute, or relative to the policy file's directory
    (to the working directory for a policy given as text)."""
    path = Path(os.path.expanduser(file))
    if path.is_absolute() or not policy_filename or policy_filename.startswith("<"):
        return path
    return Path(os.path.dirname(policy_filename) or ".") / path


def check(cf: CalibrationFile, policy: ir.Policy, name: str, layers: int, kv_heads: int, model_name: str = "the model") -> None:
    """Raise CalibrationFileError (one line) unless `cf` fits this model and
    this policy's calibration `name`."""
    if (cf.layers, cf.kv_heads) != (layers, kv_heads):
        raise CalibrationFileError(f"{cf.path} was fitted for {cf.describe_model()}, but {model_name} has {layers} layers x {kv_heads} kv heads")
    entry = cf.header["calibrations"].get(name)
    if entry is None:
        have = ", ".join(sorted(cf.header["calibrations"])) or "none"
        raise CalibrationFileError(f"{cf.path} has no calibration named '{name}' (it has: {have})")
    expected = calibration_hash(policy, name)
    if entry.get("hash") == expected:
        return
    wanted = calibration_settings(policy, name)
    differ = [key for key in wanted if key in entry and entry[key] != wanted[key]]
    fitted_by = cf.header.get("policy", {}).get("name", "?")
    if differ:
        what = "; ".join(f"{key} {_show(entry[key])} there, {_show(wanted[key])} here" for key in differ)
    else:
        what = "its target or metric differs"
    raise CalibrationFileError(
        f"{cf.path} holds {name} fitted by policy {fitted_by} for another definition ({what}; "
        f"calibration hash {str(entry.get('hash'))[:19]}, this one {expected[:19]}); re-run kvpolicy calibrate"
    )


def _show(value) -> str:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def fit_span(source: Source, name: str) -> Span | None:
    """Where calibration `name`'s `fit` line is (its calibrate line if none)."""
    try:
        tree = syntax.parse(source.text, source.filename)
    except KvpolicyError:
        return None
    for st in tree.statements:
        if isinstance(st, ast.Calibrate) and st.name.name == name:
            return next((item.span for item in st.items if item.kind == "fit"), st.span)
    return None


def load_for(policy, name: str, layers: int, kv_heads: int, model_name: str = "the model") -> CalibrationFile:
    """The file of `policy`'s calibration `name` (which says `fit from`),
    checked against the model's shape and the calibration's hash. `policy`
    is a kvpolicy.Policy (errors are then positioned at the `fit from` line)
    or a bare ir.Policy (one-line errors, paths relative to the working
    directory)."""
    policy_ir = policy.ir if hasattr(policy, "ir") else policy
    source = policy.source if hasattr(policy, "source") else None
    cal = _calibration(policy_ir, name)
    try:
        cf = read(resolve(cal.fit.file, source.filename if source else None))
        check(cf, policy_ir, name, layers, kv_heads, model_name)
        return cf
    except CalibrationFileError as err:
        span = fit_span(source, name) if source is not None else None
        if span is None:
            raise
        raise PolicyError([Diagnostic(span, str(err))], source) from None
