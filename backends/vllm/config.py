"""What a user writes in vLLM's `additional_config["kvpolicy"]`, checked.

    {"policy": "snapkv" | "path/to/mine.kvp",   # required
     "params": {"budget": 512},                  # optional param overrides
     "backend": "auto" | "torch" | "triton",     # optional: kvpolicy.backends.compile's backend
     }

Nothing here imports vLLM: `parse` turns the dict into Settings (the policy
loaded and checked, so a bad policy fails with the checker's FILE:LINE:COL
message), and `unsupported` says why a checked policy cannot run inside
vLLM's paged cache (an empty string when it can).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import kvpolicy
from kvpolicy.backends import BACKENDS
from kvpolicy.backends import compile as compile_policy
from kvpolicy.errors import KvpolicyError
from kvpolicy.library import shipped_names

KEY = "kvpolicy"
FIELDS = {"policy", "params", "backend"}


@dataclass(frozen=True)
class Settings:
    policy: object  # kvpolicy.Policy
    params: dict
    backend: str = "auto"  # a name in kvpolicy.backends.BACKENDS, or "auto"

    @property
    def name(self) -> str:
        return self.policy.name


def parse(additional_config) -> Settings | None:
    """Settings from vLLM's additional_config; None when kvpolicy is not configured."""
    if not isinstance(additional_config, dict) or KEY not in additional_config:
        return None
    raw = additional_config[KEY]
    if isinstance(raw, str):  # a JSON string (e.g. from an env var or a shell)
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise KvpolicyError(f"kvpolicy: additional_config['kvpolicy'] is not valid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(raw, dict):
        raise KvpolicyError(f"kvpolicy: additional_config['kvpolicy'] must be an object like {{\"policy\": \"snapkv\"}}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise KvpolicyError(f"kvpolicy: unknown field(s) {', '.join(map(repr, unknown))} in additional_config['kvpolicy'] (known: {', '.join(sorted(FIELDS))})")
    name = raw.get("policy")
    if not isinstance(name, str) or not name:
        raise KvpolicyError("kvpolicy: additional_config['kvpolicy'] needs \"policy\": a shipped policy name or a path to a .kvp file")
    params = raw.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise KvpolicyError("kvpolicy: \"params\" must be an object of param names to values, e.g. {\"budget\": 512}")
    backend = raw.get("backend", "auto")
    known = ["auto", *sorted(BACKENDS)]
    if backend not in known:
        raise KvpolicyError(f"kvpolicy: unknown backend {backend!r} in additional_config['kvpolicy'] (known: {', '.join(known)})")
    policy = kvpolicy.load(name, **params)  # checker errors carry FILE:LINE:COL
    reason = unsupported(policy.ir)
    if reason:
        raise KvpolicyError(f"kvpolicy: policy '{policy.name}' cannot run in vLLM: {reason}; "
                            f"shipped policies that run in vLLM: {', '.join(runnable())}")
    return Settings(policy=policy, params=dict(params), backend=backend)


def compile_for(settings: Settings, shape):
    """The policy compiled once for the model's shape, through the public
    backend entry point (positioned errors if it does not fit the model)."""
    if settings.backend == "triton":  # "auto" takes triton only where CUDA is present
        _check_triton_runs_here()
    return compile_policy(settings.policy, shape, backend=settings.backend)


def _check_triton_runs_here() -> None:
    """Without CUDA the Triton backend runs in Triton's interpreter, which
    triton reads when it is imported, and vLLM imports triton before any
    plugin: unless TRITON_INTERPRET=1 was in the environment from the start,
    triton's own helpers are compiled for a GPU and every kernel fails."""
    import sys

    import torch

    if torch.cuda.is_available() or "triton" not in sys.modules:
        return
    from kvpolicy.backends.triton.interpret import helpers_interpreted

    if not helpers_interpreted():
        raise KvpolicyError("kvpolicy: backend 'triton' without CUDA runs in Triton's interpreter, which must be chosen before "
                            "vLLM imports triton: start the engine with TRITON_INTERPRET=1 in the environment (or use backend 'torch')")


def runnable() -> list[str]:
    """The shipped policies this integration can run."""
    return [name for name in shipped_names() if not unsupported(kvpolicy.load(name).ir)]


def unsupported(policy_ir) -> str:
    """Why the vLLM path cannot run this policy ('' when it can). The paged
    cache holds one physical length per request, and every event must only
    drop tokens: what it keeps is compacted, the rest freed."""
    if policy_ir.states:
        return ("it accumulates per-token attention (states); missing: the attention probabilities of each step's queries, "
                "which vLLM's CPU attention kernel does not return (recomputing them would read every request's cache twice per step)")
    stored = next((t for t in policy_ir.cascade if t.store != "native"), None)
    if stored is not None:
        return (f"tier {stored.name} stores its tokens as {stored.store}; missing: a second dtype in vLLM's paged cache "
                "(it holds one dtype for every token)")
    if any(t.merge is not None for t in policy_ir.cascade) or policy_ir.merge is not None:
        return ("it merges evicted tokens into kept ones; missing: writing changed values back into the paged cache "
                "(this integration only moves tokens)")
    return ""
