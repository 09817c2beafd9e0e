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


def ensure() -> None:
    """Before any generated module is imported: without CUDA, switch Triton
    to its interpreter (read when a kernel is decorated) and say so once."""
    global _warned
    if cuda_present():
        return
    if not interpreting():
        if "triton" in sys.modules:
            # triton.language's own @jit helpers (tl.sum, ...) were decorated
            # for a GPU when triton was imported: too late to interpret.
            from kvpolicy.errors import KvpolicyError

            raise KvpolicyError("no CUDA device, and triton was imported before the interpreter could be chosen: set TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
    if not _warned and not os.environ.get("KVPOLICY_QUIET_INTERPRETER"):
        print("kvpolicy: warning: no CUDA device; the triton backend runs in Triton's interpreter (slow, for checking only)", file=sys.stderr)
    _warned = True


def device():
    import torch

    return torch.device("cuda") if cuda_present() else torch.device("cpu")

