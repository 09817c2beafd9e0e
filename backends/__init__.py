"""kvpolicy.backends: torch (reference), triton (generated kernels), hf, vllm."""
import os as _os

# Triton decides at import whether its own @jit helpers run in the
# interpreter, and transformers imports triton: without CUDA, choose the
# interpreter before any backend can pull triton in (a no-op on GPU machines).
if not _os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            _os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
