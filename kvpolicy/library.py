"""The shipped policies (policies/*.kvp, installed as package data)."""
from __future__ import annotations

from importlib import resources


def shipped() -> dict[str, str]:
    """Name -> source text of every shipped policy, sorted by name."""
    root = resources.files("kvpolicy.policies")
    files = sorted((f for f in root.iterdir() if f.name.endswith(".kvp")), key=lambda f: f.name)
    return {f.name[: -len(".kvp")]: f.read_text(encoding="utf-8") for f in files}


def shipped_names() -> list[str]:
    root = resources.files("kvpolicy.policies")
    return sorted(f.name[: -len(".kvp")] for f in root.iterdir() if f.name.endswith(".kvp"))


def shipped_text(name: str) -> str | None:
    resource = resources.files("kvpolicy.policies").joinpath(f"{name}.kvp")
    return resource.read_text(encoding="utf-8") if resource.is_file() else None
