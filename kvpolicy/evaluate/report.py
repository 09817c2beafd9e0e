"""What `kvpolicy eval` prints and plots, computed from the results document
(so a resumed run reports every sample, old and new)."""
from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from .tasks import ANSWER_TASKS


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def aggregate(data: dict) -> dict[str, list[dict]]:
    """Per task, one row per (policy, memory): means over its samples."""
    config = data["config"]
    order = {label: i for i, label in enumerate(config["policy_order"])}
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for sample in data["samples"]:
        for run in sample["runs"]:
            cells[(sample["task"], run["policy"], run["memory"])].append(run)
    table: dict[str, list[dict]] = {task: [] for task in config["tasks"]}
    for (task, policy, memory), runs in cells.items():
        correct = [r["correct"] for r in runs if r.get("correct") is not None]
        table[task].append(
            {
                "policy": policy,
                "memory": memory,
                "samples": len(runs),
                "correct": sum(correct) if correct else None,
                "judged": len(correct),
                "accuracy": sum(correct) / len(correct) if correct else None,
                "answer_logprob": _mean(r.get("answer_logprob") for r in runs),
                "kl": _mean(r["kl"] for r in runs),
                "top1": _mean(r["top1"] for r in runs),
                "ppl": _mean(r["ppl"] for r in runs),
                "held": _mean(r["held"] for r in runs),
                "peak": _mean(r.get("peak") for r in runs),
                "mean": _mean(r.get("mean") for r in runs),
                "compressions": _mean(len(r["compression_steps"]) for r in runs if "compression_steps" in r),
                "segments": [_mean(seg[i]["kl"] for seg in (r["segments"] for r in runs))
                             for i in range(min((len(r["segments"]) for r in runs), default=0))] if all("segments" in r for r in runs) else None,
            }
        )
    for rows in table.values():
        rows.sort(key=lambda r: (order.get(r["policy"], len(order)), -1 if r["memory"] is None else r["memory"]))
    return table


def _pct(x, digits=1):
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


def _kl(x):
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.1e}"


def decode_table_text(data: dict) -> str:
    """The decode regime: peak and mean bytes over the continuation, quality
    over it and KL per segment (the trace's first quarter, second, ...)."""
    config = data["config"]
    lines = []
    for task, rows in aggregate(data).items():
        if not rows:
            continue
        n = max(r["samples"] for r in rows)
        lines.append(f"{task}: {n} sample{'s' if n != 1 else ''}, {config['prompt_tokens']}-token prompt (prose; reasoning: its problems), "
                     f"{config['continuation']}-token continuation; memory = PEAK KV bytes over it vs the full cache at its end")
        segs = max((len(r["segments"] or []) for r in rows), default=0)
        width = max([16] + [len(r["policy"]) for r in rows])
        header = (f"{'policy':<{width}} {'memory':>6} {'peak':>7} {'mean':>7} {'events':>6} {'KL':>8} {'top-1':>7} {'ppl':>8}  "
                  + " ".join(f"{'KL q' + str(i + 1):>8}" for i in range(segs)))
        lines.append(header.rstrip())
        lines.append("-" * len(header.rstrip()))
        for r in rows:
            memory = "-" if r["memory"] is None else f"{100 * r['memory']:g}%"
            seg = " ".join(f"{_kl(x):>8}" for x in (r["segments"] or []))
            lines.append(f"{r['policy']:<{width}} {memory:>6} {_pct(r['peak']):>7} {_pct(r['mean']):>7} {_num(r['compressions'], '.0f'):>6} "
                         f"{_kl(r['kl']):>8} {_pct(r['top1'], 0):>7} {_num(r['ppl'], '.2f'):>8}  {seg}".rstrip())
        lines.append("")
    settings = [s for s in data["settings"] if s["method"] != "reference"]
    if settings:
        lines.append("How each policy was sized (peak = most KV bytes held at any decode step, as a share of the full cache at the end; "
                     "mean = bytes held averaged over the steps, vs the full cache's average; events = decode steps with a compression):")
        for s in settings:
            lines.append(f"  {s['policy']} @ {100 * s['memory']:g}% on {s.get('task')}: {s['how']}")
    return "\n".join(lines).rstrip() + "\n"


def table_text(data: dict) -> str:
    config = data["config"]
    if config.get("regime") == "decode":
        return decode_table_text(data)
    lines = []
    for task, rows in aggregate(data).items():
        if not rows:
            continue
        n = max(r["samples"] for r in rows)
        what = "answer tokens" if task in ANSWER_TASKS else f"next {config['text_tokens']} tokens"
        lines.append(f"{task}: {n} sample{'s' if n != 1 else ''}, {config['prompt_tokens']}-token prompts; KL(full || policy), top-1 and ppl over the {what}")
        header = f"{'policy':<16} {'memory':>6} {'held':>7} {'accuracy':>9} {'logP(ans)':>9} {'KL':>8} {'top-1':>7} {'ppl':>8}"
        lines.append(header)
        lines.append("-" * len(header))
        for r in rows:
            acc = "-" if r["accuracy"] is None else f"{r['correct']}/{r['judged']}"
            memory = "-" if r["memory"] is None else f"{100 * r['memory']:g}%"
            logp = r["answer_logprob"] if task in ANSWER_TASKS else None
            lines.append(
                f"{r['policy']:<16} {memory:>6} {_pct(r['held']):>7} {acc:>9} {_num(logp, '.2f'):>9} "
                f"{_kl(r['kl']):>8} {_pct(r['top1'], 0):>7} {_num(r['ppl'], '.2f'):>8}"
            )
        lines.append("")
    settings = [s for s in data["settings"] if s["method"] != "reference"]
    if settings:
        lines.append("How each policy was sized (memory = share of the full cache's KV bytes; held = bytes measured at the end of each run):")
        for s in settings:
            memory = "any memory" if s["memory"] is None else f"{100 * s['memory']:g}%"
            lines.append(f"  {s['policy']} @ {memory}: {s['how']}")
    return "\n".join(lines).rstrip() + "\n"


def plot(data: dict, path: Path) -> None:
    """Quality vs KV memory held, one line per policy; one row per task:
    accuracy (or top-1 for `text`) and KL(full || policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {task: rows for task, rows in aggregate(data).items() if rows}
    config = data["config"]
    decode = config.get("regime") == "decode"
    x_key = "peak" if decode else "held"
    fig, axes = plt.subplots(len(table), 2, figsize=(12.5, 3.6 * len(table)), squeeze=False)
    policies = [p for p in config["policy_order"]]
    colors = {p: plt.get_cmap("tab10" if len(policies) <= 10 else "tab20")(i) for i, p in enumerate(policies)}
    markers = "os^vD<>phX*P"
    for row, (task, rows) in enumerate(table.items()):
        left_key, left_label = ("accuracy", "accuracy") if task in ANSWER_TASKS else ("top1", "top-1 agreement with full")
        ax_q, ax_kl = axes[row]
        for i, policy in enumerate(policies):
            pts = sorted((r[x_key], r[left_key], r["kl"]) for r in rows if r["policy"] == policy and r[x_key] is not None)
            if not pts:
                continue
            x = [100 * p[0] for p in pts]
            style = dict(color=colors[policy], marker=markers[i % len(markers)], label=policy)
            if policy == "full" or len(pts) == 1 and rows and all(r["memory"] is None for r in rows if r["policy"] == policy):
                style.update(linestyle="none", markersize=9)
            ax_q.plot(x, [100 * p[1] if p[1] is not None else math.nan for p in pts], **style)
            kl = [p[2] if p[2] and p[2] > 0 else math.nan for p in pts]
            if any(not math.isnan(k) for k in kl):
                ax_kl.plot(x, kl, **style)
        ax_q.set_title(f"{task}: {left_label}")
        ax_q.set_ylabel(f"{left_label} (%)")
        ax_q.set_ylim(-5, 105)
        ax_kl.set_title(f"{task}: KL(full || policy), nats per token")
        ax_kl.set_yscale("log")
        for ax in (ax_q, ax_kl):
            ax.set_xlim(0, 105)
            ax.set_xlabel("peak KV bytes over the continuation (% of full cache)" if decode else "KV bytes held (% of full cache)")
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", frameon=False)
    env = data.get("environment", {})
    shape = f"decode regime, {config['continuation']}-token continuations" if decode else f"{config['prompt_tokens']}-token prompts"
    versions = ", ".join(f"{k} {env[k]}" for k in ("kvpolicy", "torch", "transformers") if env.get(k))
    fig.text(0.43, 0.005, f"{env.get('model', '')}, {shape}, seed {config['seed']}, {env.get('date', '')[:10]}; {versions}", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 0.86, 1))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
