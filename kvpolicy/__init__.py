"""kvpolicy: a declarative language and compiler for KV-cache compression policies.

    import kvpolicy
    pol = kvpolicy.load("snapkv", budget=256)   # a shipped name or a .kvp path
    pol.ir                                      # the checked IR (kvpolicy.ir.Policy)
"""
__version__ = "0.1.0"

from .diagnostics import PolicyError  # noqa: E402
from .errors import KvpolicyError  # noqa: E402
from .policy import Policy, compile_text, load  # noqa: E402

__all__ = ["KvpolicyError", "Policy", "PolicyError", "compile_text", "hf", "load", "models", "__version__"]


def __getattr__(name: str):
    # Heavy submodules (torch, transformers) load on first use, so `kvpolicy check` stays fast.
    import importlib

    if name == "models":
        return importlib.import_module(".models", __name__)
    if name == "hf":
        return importlib.import_module(".backends.hf", __name__)
    raise AttributeError(f"module 'kvpolicy' has no attribute {name!r}")
