"""`kvpolicy compile --backend triton`: the kernels module written beside
manifest.json (temp file + rename, like the manifest)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from kvpolicy import ir
from kvpolicy.diagnostics import Source
from kvpolicy.manifest import write_atomic
from kvpolicy.policy import Policy

from .engine import build


def write_module(out_dir: Path, policy: ir.Policy, text: str | bytes, filename: str) -> dict:
    """Render the policy's kernels into DIR/<name>_kernels.py; returns what
    the manifest records about it (file, sha256 of the file, code hash)."""
    source = Source(text if isinstance(text, str) else text.decode("utf-8", "replace"), filename)
    rendered = build(Policy(policy, source))
    path = Path(out_dir) / f"{rendered.policy}_kernels.py"
    write_atomic(path, rendered.text)
    return {
        "file": path.name,
        "sha256": hashlib.sha256(rendered.text.encode()).hexdigest(),
        "code_hash": rendered.code_hash,
        "lines": rendered.lines,
        "kernels": sorted({s.kernel for s in rendered.steps} | _fixed(rendered)),
    }


def _fixed(rendered) -> set[str]:
    import re

    return set(re.findall(r"^def ([a-z]\w*)\(", rendered.body, flags=re.M)) - {f"e{s.out.id}" for s in rendered.steps}
