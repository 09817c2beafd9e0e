"""The picture of `kvpolicy explain --prompt ... --png OUT`, drawn from the
report `--json` writes (kvpolicy/explain_prompt.py builds it).

One block per policy: a heatmap with one row per (layer, kv_head), rows
grouped by layer, prompt positions along x, each cell coloured by the tier
holding its tokens and darker the more of them are held; above it, where the
protected first/last tokens and the marked text lie; beside it, the tokens
held per head (aligned with the heatmap's rows) and the KV bytes held against
a full cache. Positions are binned (`cells`) so that a 4k prompt or a
32 x 8 model stays readable instead of drawing sub-pixel columns.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .atomic_output import write_atomically

MAX_COLUMNS = 400  # heatmap columns at most: ~2 px each in an 11-inch figure at 100 dpi
DROPPED = np.array([0.93, 0.93, 0.93])  # a cell none of whose tokens is held
HELD = "#2a6fdb"  # a non-cascade policy's held tokens
TIER_COLOURS = ["#2a6fdb", "#e08a00", "#2e9e44", "#8e5cc2", "#c23b5a"]
PROTECTED = "#333333"
MARK = "#d62728"
FONT = 14
WIDTH = 11.0  # inches
DPI = 100


def bin_width(prompt_tokens: int, max_columns: int = MAX_COLUMNS) -> int:
    """Positions per heatmap column."""
    return max(1, math.ceil(prompt_tokens / max_columns))


def cells(entry: dict, prompt_tokens: int, width: int) -> np.ndarray:
    """[rows, columns, tiers]: the share of each column's positions that each
    (layer, kv_head) row holds in each tier; rows are layer-major. A policy
    without a cascade has one tier."""
    tiers = max(1, len(entry["tiers"]))
    layers, heads = entry["layers"], entry["kv_heads"]
    columns = math.ceil(prompt_tokens / width)
    held = np.zeros((layers * heads, columns, tiers))
    for layer in range(layers):
        for head in range(heads):
            positions = np.asarray(entry["positions"][layer][head], dtype=np.int64)
            tier = np.asarray(entry["position_tiers"][layer][head], dtype=np.int64) if entry["position_tiers"] else np.zeros_like(positions)
            inside = positions < prompt_tokens
            np.add.at(held[layer * heads + head], (positions[inside] // width, tier[inside]), 1.0)
    sizes = np.full(columns, float(width))
    sizes[-1] = prompt_tokens - width * (columns - 1)  # the last column may be narrower
    return held / sizes[None, :, None]


def colours(shares: np.ndarray, tier_count: int) -> np.ndarray:
    """[rows, columns, 3] RGB: a column's colour is its tiers' colours mixed
    by their shares, and it departs from DROPPED by the square root of the
    share held (so a column holding one token in eleven still shows)."""
    from matplotlib.colors import to_rgb

    palette = np.array([to_rgb(HELD)]) if tier_count == 0 else np.array([to_rgb(TIER_COLOURS[t % len(TIER_COLOURS)]) for t in range(tier_count)])
    total = shares.sum(axis=-1, keepdims=True)
    weights = np.divide(shares * np.sqrt(total), total, out=np.zeros_like(shares), where=total > 0)
    return DROPPED + np.einsum("rct,tk->rck", weights, palette - DROPPED)


def draw(report: dict, out: Path) -> None:
    """Write the picture of `report` (see explain_prompt.report) to `out` as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = report["prompt_tokens"]
    width = bin_width(n)
    entries = report["policies"]
    heights = [TITLE + STRIP + _heatmap_height(e) + XLABEL for e in entries]
    with plt.rc_context({"font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT}):
        fig = plt.figure(figsize=(WIDTH, sum(heights)), dpi=DPI)
        top = 0.0
        for entry, height in zip(entries, heights):
            _draw_block(fig, top, entry, report, width)
            top += height
        _save_atomically(fig, out)
        plt.close(fig)


# Fixed geometry (inches), the same in every block, so that the heatmaps of
# several policies line up position for position.
TITLE, STRIP, XLABEL = 0.45, 0.85, 0.8
LANES = 0.4  # the strip's height: protected spans above, marks below
HEAT_X, HEAT_W = 0.6, 6.8
BARS_X, BARS_W = 7.65, 1.9
BYTES_X, BYTES_W = 10.0, 0.55


def _heatmap_height(entry: dict) -> float:
    """Inches: ~0.035 per row, within [2.6, 6]."""
    return min(6.0, max(2.6, 0.035 * entry["layers"] * entry["kv_heads"]))


def _draw_block(fig, top: float, entry: dict, report: dict, width: int) -> None:
    """One policy's block, `top` inches below the figure's top."""
    n = report["prompt_tokens"]
    height = _heatmap_height(entry)
    fw, fh = fig.get_size_inches()

    def axes(x: float, y: float, w: float, h: float, **kw):  # y: inches from the figure's top to the axes' top
        return fig.add_axes((x / fw, 1 - (y + h) / fh, w / fw, h / fh), **kw)

    heat_top = top + TITLE + STRIP
    heat = axes(HEAT_X, heat_top, HEAT_W, height)
    counts = shares_to_counts(entry)
    _heatmap(heat, entry, n, width, height)
    _spans(axes(HEAT_X, heat_top - LANES - 0.05, HEAT_W, LANES, sharex=heat), heat, entry, report, width)
    _per_head(axes(BARS_X, heat_top, BARS_W, height, sharey=heat), entry, counts)
    fraction = _bytes(axes(BYTES_X, heat_top, BYTES_W, height), entry)
    _legend(axes(BARS_X, top + TITLE, WIDTH - BARS_X, STRIP - 0.4), entry, counts, bool(report["marks"]))  # above the panels' titles

    totals = counts.sum(axis=1)
    low, high = int(totals.min()), int(totals.max())
    held = f"{low} tokens per head" if low == high else f"{low}–{high} tokens per head (mean {totals.mean():.0f})"
    note = "" if entry["compressed"] else " — " + not_compressed(entry)
    fig.text(0.1 / fw, 1 - (top + 0.1) / fh, f"{entry['policy']}: {held}, {fraction:.0%} of the full cache's bytes{note}",
             ha="left", va="top", fontsize=FONT + 1)


def _heatmap(heat, entry: dict, n: int, width: int, height: float) -> None:
    layers, heads = entry["layers"], entry["kv_heads"]
    rows = layers * heads
    heat.imshow(colours(cells(entry, n, width), len(entry["tiers"])), aspect="auto", interpolation="nearest", extent=(0, n, rows, 0))
    for boundary in range(heads, rows, heads):  # layer groups
        heat.axhline(boundary, color="white", linewidth=0.8 if rows <= 120 else 0.5)
    step = _label_step(layers, height * 72 / layers)
    heat.set_yticks([layer * heads + heads / 2 for layer in range(0, layers, step)], [f"L{layer}" for layer in range(0, layers, step)])
    heat.tick_params(axis="y", length=0)
    heat.set_xlabel(f"prompt position (tokens; one column = {width} tokens)" if width > 1 else "prompt position (tokens)")
    heat.set_xlim(0, n)


def _spans(strip, heat, entry: dict, report: dict, width: int) -> None:
    """Two lanes above the heatmap: protected spans on top, marked text below
    (they often overlap: a needle near the end); marks are framed on the heatmap too."""
    n = report["prompt_tokens"]
    least = n * 0.006  # the narrowest span drawn: one token of 4k still shows
    spans = []
    if entry["protected"]["first"]:
        spans.append((0, min(n, entry["protected"]["first"]), PROTECTED, 0.55))
    if entry["protected"]["last"]:
        spans.append((max(0, n - entry["protected"]["last"]), n, PROTECTED, 0.55))
    for mark in report["marks"]:
        spans.append((mark["start"], mark["end"], MARK, 0.05))
        for x in (mark["start"] - width, mark["end"] + width):  # just outside the span: its own cells stay visible
            heat.axvline(x, color=MARK, linewidth=1.0)
    for start, end, colour, lane in spans:
        strip.broken_barh([(start, max(end - start, least))], (lane, 0.4), facecolors=colour)
    strip.set_ylim(0, 1)
    strip.axis("off")


def _per_head(bars, entry: dict, counts: np.ndarray) -> None:
    """Tokens held per (layer, kv_head), stacked by tier, on the heatmap's rows."""
    rows = counts.shape[0]
    left = np.zeros(rows)
    for t in range(counts.shape[1]):
        colour = TIER_COLOURS[t % len(TIER_COLOURS)] if entry["tiers"] else HELD
        bars.barh(np.arange(rows) + 0.5, counts[:, t], height=1.0, left=left, color=colour, linewidth=0)
        left += counts[:, t]
    totals = counts.sum(axis=1)
    bars.axvline(totals.mean(), color="black", linestyle="--", linewidth=1)
    bars.set_title("tokens held / head")
    bars.tick_params(axis="y", left=False, labelleft=False)
    bars.set_xlim(0, max(1.0, totals.max() * 1.08))
    bars.locator_params(axis="x", nbins=3)
    bars.set_ylim(rows, 0)


def _bytes(kvbytes, entry: dict) -> float:
    """The KV bytes held as a share of a full cache's; returns that share."""
    fraction = entry["kv_bytes"] / entry["kv_bytes_full"] if entry["kv_bytes_full"] else 1.0
    kvbytes.bar([0], [1.0], color="white", edgecolor="#888888", width=0.9)
    kvbytes.bar([0], [fraction], color="#555555", width=0.9)
    if fraction > 0.8:  # no room above the bar: write inside it
        kvbytes.text(0, fraction - 0.03, f"{fraction:.0%}", ha="center", va="top", color="white", fontsize=FONT - 1)
    else:
        kvbytes.text(0, fraction + 0.03, f"{fraction:.0%}", ha="center", va="bottom", fontsize=FONT - 1)
    kvbytes.set_xlim(-0.5, 0.5)
    kvbytes.set_ylim(0, 1.0)
    kvbytes.set_xticks([])
    kvbytes.set_yticks([])
    kvbytes.set_title("KV bytes")
    kvbytes.set_xlabel(f"{_mb(entry['kv_bytes'])}\nof {_mb(entry['kv_bytes_full'])}", fontsize=FONT - 2)
    return fraction


def _legend(where, entry: dict, counts: np.ndarray, marked: bool) -> None:
    from matplotlib.patches import Patch

    where.axis("off")
    handles = [Patch(color=TIER_COLOURS[t % len(TIER_COLOURS)], label=name) for t, name in enumerate(entry["tiers"]) if counts[:, t].any()]
    if not entry["tiers"]:
        handles.append(Patch(color=HELD, label="held"))
    if entry["protected"]["first"] or entry["protected"]["last"]:
        handles.append(Patch(color=PROTECTED, label="protected"))
    if marked:
        handles.append(Patch(color=MARK, label="needle"))
    where.legend(handles=handles, loc="center left", ncol=2, frameon=False, fontsize=FONT - 2, handlelength=1.0, columnspacing=0.8)


def not_compressed(entry: dict) -> str:
    """Why a policy held every token after the prefill."""
    return "never compresses" if not entry["compresses"] else "not compressed after the prefill (no trigger fired)"


def shares_to_counts(entry: dict) -> np.ndarray:
    """[rows, tiers] tokens each (layer, kv_head) row holds in each tier."""
    tiers = max(1, len(entry["tiers"]))
    rows = []
    for layer in range(entry["layers"]):
        for head in range(entry["kv_heads"]):
            tier = entry["position_tiers"][layer][head] if entry["position_tiers"] else [0] * len(entry["positions"][layer][head])
            rows.append(np.bincount(np.asarray(tier, dtype=np.int64), minlength=tiers)[:tiers])
    return np.array(rows, dtype=float).reshape(-1, tiers)


def _label_step(layers: int, points_per_layer: float) -> int:
    """Label every k-th layer so labels are at least ~1.3 font heights apart."""
    for step in (1, 2, 4, 5, 8, 10, 16, 20, 25, 50):
        if step * points_per_layer >= 1.3 * FONT:
            return step
    return max(1, layers)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _save_atomically(fig, out: Path) -> None:
    """PNG with a 256-colour palette: the picture has few colours, and it is a third of the RGBA size."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    picture = Image.open(buffer).convert("RGB").quantize(256)
    write_atomically(out, lambda tmp: picture.save(tmp, format="PNG", optimize=True))
