"""Render one readable Python module of @triton.jit kernels per policy.

    # header: policy name, program hash, the .kvp lines it implements
    import triton, triton.language as tl
    <library helpers>            _order_key, _kth_largest, _mark_top, ...
    <fixed kernels it uses>      window_stats, select_rows, compact, ...
    <per fused step>             e<N>(h, r, offs, tmask, leaves...) + <template>_<N>

The module is cached by the hash of everything below the header (the code),
so a policy with other param values reuses the same module: params are
kernel arguments. User-written names reach the module only inside comments,
and only after `safe_identifier` / `safe_comment` checked them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import keyword
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from kvpolicy import ir
from kvpolicy.program import selection_leaves
from kvpolicy.errors import KvpolicyError

from . import templates
from .library import LIBRARY
from .lowering import Buffer, Inline, Lowering, Step, Unsupported

TEMPLATE_VERSION = 1
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def safe_identifier(name: str) -> str:
    """A user-written name, checked before it goes anywhere near generated code."""
    if not isinstance(name, str) or not _IDENT.fullmatch(name) or keyword.iskeyword(name):
        raise KvpolicyError(f"refusing to generate code for the name {name!r}: not a plain identifier")
    return name


def safe_comment(text: str) -> str:
    """Text for a `#` comment: printable ASCII only (no line break can end the comment)."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


@dataclass(frozen=True)
class Rendered:
    policy: str
    program_hash: str
    header: str
    body: str
    steps: tuple[Step, ...]
    lowering: Lowering

    @property
    def text(self) -> str:
        return self.header + self.body

    @property
    def code_hash(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()

    @property
    def lines(self) -> int:
        return self.text.count("\n")


def policy_expressions(policy: ir.Policy) -> list[tuple[str, str, object]]:
    """(kind, name, expression) of every scored thing a compression reads,
    in the order the torch backend evaluates them."""
    out = []
    for cal in policy.calibrations:
        out.append(("calibrate", cal.name, cal.target))
    for keep in policy.keeps:
        out += [("keep", keep.name, s.score) for s in _scored_parts(keep.select)]
    for tier in policy.cascade:
        if tier.select is not None:
            out += [("tier", tier.name, s.score) for s in _scored_parts(tier.select)]
    for merge, where in [(policy.merge, "merge")] + [(t.merge, t.name) for t in policy.cascade]:
        if merge is not None and merge.weight is not None:
            out.append(("merge", where, merge.weight))
    return out


def _scored_parts(sel) -> list:
    return [leaf for leaf in selection_leaves(sel) if isinstance(leaf, (ir.TopK, ir.TopP, ir.Threshold))]


def lower_policy(policy: ir.Policy) -> Lowering:
    """Every step a compression of this policy runs, fused."""
    low = Lowering(policy)
    for kind, name, expr in policy_expressions(policy):
        safe_identifier(name)
        try:
            low.tensor(expr) if kind == "calibrate" else low.token_scores(expr)
            if kind == "calibrate":  # the fit evaluates the metric at trial temperatures
                low.tensor(next(c.metric for c in policy.calibrations if c.name == name))
        except Unsupported as err:
            err.kind, err.name = ("keep", name) if kind == "merge" else (kind, name)
            raise
    return low


def fixed_kernels(policy: ir.Policy, low: Lowering) -> list[str]:
    """The fixed kernels this policy's compressions and reads use."""
    used = {s.template for s in low.steps if s.inline is None}
    if "window_signal" in used:
        used.add("window_stats")  # the row statistics the probabilities divide by
    if any(s.template == "top_p_count" for s in low.steps):
        used.add("mass_count")
    if policy.compresses:
        used |= {"select_rows", "mass_count", "compact", "gather_kept", "decode_tier", "lse_merge"}
    if policy.calibrations:
        used.add("row_mass")
    if policy.merge or any(t.merge for t in policy.cascade):
        used |= {"merge_assign", "merge_apply"}
    stores = {t.store for t in policy.cascade}
    if stores & {"int8", "int4"}:
        used.add("quantize_groups")
    if "int4" in stores:
        used.add("pack_int4")
    return [name for name in templates.FIXED if name in used]


def render(policy, source_text: str | None = None, every_kernel: bool = False) -> Rendered:
    """policy: a kvpolicy.Policy (source known) or an ir.Policy."""
    pir: ir.Policy = policy.ir if hasattr(policy, "ir") else policy
    if source_text is None and hasattr(policy, "source"):
        source_text = policy.source.text
    safe_identifier(pir.name)
    low = lower_policy(pir)
    parts = ["import triton\nimport triton.language as tl\n", LIBRARY]
    for name in (list(templates.FIXED) if every_kernel else fixed_kernels(pir, low)):
        parts.append(templates.FIXED[name])
    for step in low.steps:
        if step.inline is not None:
            parts.append(_render_fused(step, _source_lines(source_text, step, pir)))
    body = "\n".join(parts)
    header = _header(pir, source_text)
    return Rendered(pir.name, pir.content_hash, header, body, tuple(low.steps), low)


def _header(policy: ir.Policy, source_text: str | None) -> str:
    lines = [
        f"# Generated by kvpolicy (triton backend, templates v{TEMPLATE_VERSION}). Do not edit.",
        f"# policy: {safe_comment(policy.name)}",
        f"# program hash: {policy.content_hash}",
        "# implements these .kvp lines:",
    ]
    for number, text in enumerate((source_text or "").splitlines(), start=1):
        stripped = text.strip()
        if stripped and not stripped.startswith("#"):
            lines.append(f"#   {number:3d} | {safe_comment(text.rstrip())}")
    return "\n".join(lines) + "\n"


def _source_lines(source_text: str | None, step: Step, policy: ir.Policy) -> list[str]:
    """The .kvp lines whose statements define names this step reads."""
    if not source_text:
        return []
    names = set(policy.scores) | {c.name for c in policy.calibrations} | {k.name for k in policy.keeps}
    wanted = [n for n in names if re.search(rf"\b{re.escape(n)}\b", step.note)]
    out = []
    for number, text in enumerate(source_text.splitlines(), start=1):
        m = re.match(r"\s*(score|calibrate|keep|state)\s+([A-Za-z_]\w*)", text)
        if m and m.group(2) in wanted:
            out.append(f".kvp {number}: {safe_comment(text.strip())}")
    return out


def _render_fused(step: Step, lines: list[str]) -> str:
    inline: Inline = step.inline
    params, loads = [], []
    for i, leaf in enumerate(inline.tensors):
        params += [f"X{i}", f"X{i}_sh", f"X{i}_sr"]
        loads.append(f"    x{i} = tl.load(X{i} + h * X{i}_sh + r * X{i}_sr + offs, mask=tmask, other=0.0)")
    for i, _ in enumerate(inline.scalars):
        params += [f"S{i}", f"S{i}_sh"]
        loads.append(f"    s{i} = tl.load(S{i} + h * S{i}_sh)")
    params += [f"c{i}" for i in range(len(inline.consts))]
    fn = f"e{step.out.id}"
    leaves = ", ".join([_leaf_name(leaf) for leaf in inline.tensors] + [f"{n} (calibrated)" for n in inline.scalars])
    comment = [f"# step {step.out.id}: {safe_comment(step.note)}"] + [f"# {line}" for line in lines]
    if leaves:
        comment.append(f"# reads: {safe_comment(leaves)}")
    func = "\n".join(
        ["@triton.jit", f"def {fn}(h, r, offs, tmask{''.join(', ' + p for p in params)}):"] + loads + [f"    return {inline.code}"]
    )
    joined = ", ".join(params) if params else "DUMMY"
    kernel = templates.FUSED[step.template].replace("__NAME__", step.kernel).replace("__FN__", fn)
    kernel = kernel.replace("__PARAMS__", joined).replace("__ARGS__", joined)
    return "\n" + "\n".join(comment) + "\n" + func + "\n\n" + kernel


def _leaf_name(leaf) -> str:
    if isinstance(leaf, Buffer):
        return f"step {leaf.id}"
    return f"state {leaf[1]}"


# ----------------------------------------------------------------- loading, cached


_LOADED: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("KVPOLICY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvpolicy")
    return Path(root) / "triton"


def load(rendered: Rendered):
    """The module for this code, imported once per process and written once
    per cache (Triton reads kernel source from a real file)."""
    key = rendered.code_hash
    if key in _LOADED:
        return _LOADED[key]
    from . import interpret

    interpret.ensure()
    path = cache_dir() / f"kvp_{key[:20]}.py"
    if not path.exists():
        from kvpolicy.manifest import write_atomic

        write_atomic(path, rendered.text)
    name = f"kvpolicy_triton_{key[:20]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _LOADED[key] = module
    return module
