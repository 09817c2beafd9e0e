"""Where generated kernels run: on a CUDA GPU when there is one, else in
Triton's interpreter (TRITON_INTERPRET=1: every program instance runs as
numpy on the CPU), with a one-line warning that it is slow."""
from __future__ import annotations

import os
import sys

_warned = False


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def helpers_interpreted() -> bool:
    """Whether triton.language's own @jit helpers (tl.sum, ...) were decorated
    for the interpreter. They are decorated when triton is first imported, so
    setting TRITON_INTERPRET afterwards (as an engine that imported triton
    first leads to) does not make them so."""
    if "triton" not in sys.modules:
        return interpreting()
    import triton.language.standard as standard

    return type(standard.sum).__name__ == "InterpretedFunction"


def ensure() -> None:
    """Before any generated module is imported: without CUDA, switch Triton
    to its interpreter (read when a kernel is decorated) and say so once."""
    global _warned
    if cuda_present():
        return
    if "triton" not in sys.modules and not interpreting():
        os.environ["TRITON_INTERPRET"] = "1"
    if not helpers_interpreted():  # triton came in first, decorated for a GPU: too late to interpret
        from kvpolicy.errors import KvpolicyError

        raise KvpolicyError("no CUDA device, and triton was imported before its interpreter could be chosen: "
                            "start with TRITON_INTERPRET=1 in the environment")
    if not _warned and not os.environ.get("KVPOLICY_QUIET_INTERPRETER"):
        print("kvpolicy: warning: no CUDA device; the triton backend runs in Triton's interpreter (slow, for checking only)", file=sys.stderr)
    _warned = True


def device():
    import torch

    return torch.device("cuda") if cuda_present() else torch.device("cpu")

