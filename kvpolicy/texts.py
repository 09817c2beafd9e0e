"""Real English text already on the machine, for long prompts (no download).

Licence texts under /usr/share/common-licenses first; Python's own module
documentation as a fallback on machines without them.
"""
from __future__ import annotations

import importlib
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
_LICENSE_ORDER = ("Apache-2.0", "GPL-3", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0", "BSD")
_MODULES = ("argparse", "collections", "subprocess", "threading", "email.message", "json", "logging", "pathlib", "typing", "unittest")


def english_text(min_chars: int) -> str:
    """At least min_chars of real prose (repeating the sources if needed)."""
    parts = [p.read_text(encoding="utf-8", errors="replace") for name in _LICENSE_ORDER if (p := LICENSES / name).is_file()]
    if not parts:
        parts = [importlib.import_module(name).__doc__ or "" for name in _MODULES]
    text = "\n\n".join(part.strip() for part in parts if part.strip())
    if not text:
        raise RuntimeError("no English text found on this machine")
    while len(text) < min_chars:
        text = text + "\n\n" + text
    return text[:min_chars]
