"""The results file of `kvpolicy eval`: one JSON document, rewritten
atomically (temporary file + os.replace) after every finished sample, so an
interrupted run keeps what it finished and `--resume` continues from it.

    {"format": "kvpolicy-eval/1", "command": "...", "config": {...},
     "environment": {...}, "settings": [...], "samples": [...]}

`config` identifies the experiment (model, context, seed, tasks, memory
fractions, policies and their content hashes); --resume accepts a file only
when its config is the same. The number of samples is not part of it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from kvpolicy.errors import KvpolicyError
from kvpolicy.manifest import write_atomic

FORMAT = "kvpolicy-eval/1"


class ResultsError(KvpolicyError):
    pass


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_writable(path: Path, what: str) -> None:
    """Fail early (before any model work) if `path` cannot be written."""
    if path.is_dir():
        raise ResultsError(f"{what} {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ResultsError(f"cannot write {what} {path}: directory {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    except OSError as err:
        raise ResultsError(f"cannot write {what} {path}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)
    if path.exists() and not os.access(path, os.W_OK):
        raise ResultsError(f"cannot write {what} {path}: permission denied")


def environment(model_name: str, model_dir: str | None = None) -> dict:
    import torch
    import transformers

    import kvpolicy

    env = {
        "date": now(),
        "kvpolicy": kvpolicy.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "model": model_name,
    }
    if model_dir:
        env["model_dir"] = model_dir
        marker = Path(model_dir) / "kvpolicy_model.json"
        if marker.is_file():
            try:
                env["model_source"] = json.loads(marker.read_text())
            except ValueError:
                pass
    return env


class Store:
    """The results document in memory plus where it is saved."""

    def __init__(self, path: Path, data: dict):
        self.path = path
        self.data = data

    @staticmethod
    def new(path: Path, config: dict, command: str, samples: int) -> "Store":
        data = {
            "format": FORMAT,
            "command": command,
            "config": config,
            "samples_requested": samples,
            "started": now(),
            "updated": None,
            "complete": False,
            "environment": {},
            "settings": [],
            "samples": [],
        }
        return Store(path, data)

    @staticmethod
    def load(path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ResultsError(f"cannot read {path}: {err.strerror or err}") from None
        except ValueError as err:
            raise ResultsError(f"{path} is not valid JSON ({err}); remove it or drop --resume") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ResultsError(f"{path} is not a `kvpolicy eval` results file ({FORMAT}); remove it or drop --resume")
        return data

    @staticmethod
    def resume(path: Path, config: dict, command: str, samples: int) -> "Store":
        """Continue `path` if it exists and holds the same experiment."""
        if not path.exists():
            return Store.new(path, config, command, samples)
        data = Store.load(path)
        old = data.get("config", {})
        if old != config:
            keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ResultsError(
                f"{path} holds another experiment (different {', '.join(keys)}); "
                "use the same options, another --json, or drop --resume"
            )
        data["samples_requested"] = samples
        data.setdefault("history", []).append({"resumed": now(), "command": command})
        return Store(path, data)

    # ----------------------------------------------------------------- access

    @property
    def settings(self) -> list[dict]:
        return self.data["settings"]

    @property
    def samples(self) -> list[dict]:
        return self.data["samples"]

    def done(self) -> set[tuple[str, int]]:
        return {(s["task"], s["index"]) for s in self.samples}

    def add_setting(self, setting: dict) -> None:
        self.settings.append(setting)

    def add_sample(self, record: dict) -> None:
        self.samples.append(record)
        self.samples.sort(key=lambda s: (self.data["config"]["tasks"].index(s["task"]), s["index"]))

    def save(self, complete: bool = False) -> None:
        self.data["updated"] = now()
        self.data["complete"] = complete
        write_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=False) + "\n")


def command_line(argv: list[str] | None) -> str:
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return "kvpolicy " + " ".join(shlex.quote(a) for a in args)
