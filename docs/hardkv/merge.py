"""Merge decode-regime results files into one, for the tables and the plot
of docs/hardkv.md (the tasks and the policies were run as separate
processes side by side, on a 2-core machine).

    python docs/hardkv/merge.py OUT.json OUT.png "BASE.json[;BASE.json...]" [FILE.json ...]

BASE files (one per task) give the samples, their `full` reference and
their runs; each further FILE adds its non-full runs to the sample of the
same id (its continuation must be the same trace). Any file may be given as
FILE.json:OLD=NEW[,OLD=NEW...] to rename policy labels
(`docs/hardkv/x.kvp=hardkv_x`). Prints the table, writes OUT.json and the
plot OUT.png (both through a temporary file).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from kvpolicy.evaluate import report


def load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_renamed(path: str, rename: dict) -> dict:
    data = load(path)
    for sample in data["samples"]:
        for run in sample["runs"]:
            run["policy"] = rename.get(run["policy"], run["policy"])
    for setting in data["settings"]:
        setting["policy"] = rename.get(setting["policy"], setting["policy"])
    data["config"]["policy_order"] = [rename.get(label, label) for label in data["config"]["policy_order"]]
    return data


def merge(bases: list[tuple[str, dict]], extras: list[tuple[str, dict]]) -> dict:
    data = load_renamed(*bases[0])
    for path, rename in bases[1:]:
        more = load_renamed(path, rename)
        data["config"]["tasks"] += more["config"]["tasks"]
        data["samples"] += more["samples"]
        data["settings"] += more["settings"]
    by_id = {sample["id"]: sample for sample in data["samples"]}
    order = data["config"]["policy_order"]
    for path, rename in extras:
        more = load_renamed(path, rename)
        for sample in more["samples"]:
            base = by_id.get(sample["id"])
            if base is None:
                continue
            if base.get("continuation_ids") != sample.get("continuation_ids"):
                raise SystemExit(f"{path}: {sample['id']} has another continuation than the base file's")
            base["runs"] += [run for run in sample["runs"] if run["policy"] != "full"]
        data["settings"] += [setting for setting in more["settings"] if setting["method"] != "reference"]
        for label in more["config"]["policy_order"]:
            if label not in order:
                order.insert(1, label)
    return data


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def spec(text: str) -> tuple[str, dict]:
    """FILE.json[:OLD=NEW,...] -> (path, renames)."""
    path, _, names = text.partition(":")
    return path, dict(pair.split("=", 1) for pair in names.split(",") if pair)


def main(argv: list[str]) -> None:
    out_json, out_png = Path(argv[0]), Path(argv[1])
    bases = [spec(text) for text in argv[2].split(";")]
    data = merge(bases, [spec(text) for text in argv[3:]])
    write_atomically(out_json, json.dumps(data, indent=1) + "\n")
    report.plot(data, out_png)
    print(report.decode_table_text(data))


if __name__ == "__main__":
    main(sys.argv[1:])
