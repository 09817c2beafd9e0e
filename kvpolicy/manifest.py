"""`kvpolicy compile` output: DIR/manifest.json (IR + hash + backend).

Files are written to a temporary name in the same directory and renamed, so
an interrupted compile never leaves half a manifest behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import __version__, ir
from .errors import KvpolicyError

BACKENDS = ("torch", "triton")


def manifest(policy: ir.Policy, backend: str, source: str, module: dict | None = None) -> dict:
    out = {
        "kvpolicy_version": __version__,
        "ir_version": policy.ir_version,
        "backend": backend,
        "policy": policy.name,
        "source": source,
        "hash": policy.content_hash,
        "params": {name: p.value for name, p in policy.params.items()},
        "ir": policy.model_dump(mode="json"),
    }
    if module is not None:  # triton: the generated kernels module beside the manifest
        out["module"] = module
    return out


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_manifest(out_dir: Path, policy: ir.Policy, backend: str, source: str, module: dict | None = None) -> Path:
    path = out_dir / "manifest.json"
    write_atomic(path, json.dumps(manifest(policy, backend, source, module), indent=2) + "\n")
    return path


def read_manifest(path: Path) -> ir.Policy:
    """The IR back from a manifest; the stored hash must match."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    policy = ir.Policy.model_validate(data["ir"])
    if policy.content_hash != data["hash"]:
        raise KvpolicyError(f"{path}: hash mismatch (manifest says {data['hash']}, IR hashes to {policy.content_hash})")
    return policy
