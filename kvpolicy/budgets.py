"""How a count written once is spread over layers (`by layer SHAPE`).

Shared by `explain` and every backend, so all agree to the token. Weights
have mean 1 over the layers, so the total is count x layers (up to rounding).
Counts are computed in exact rational arithmetic: a count that is exactly
n + 1/2 rounds up on every machine.
"""
from __future__ import annotations

import math
from fractions import Fraction

from . import ir


def _exact_weights(shape: ir.LayerShape | None, num_layers: int) -> list[Fraction]:
    if num_layers < 1:
        raise ValueError("a model has at least one layer")
    if shape is None or shape.kind == "uniform" or num_layers == 1:
        return [Fraction(1)] * num_layers
    last = num_layers - 1
    if shape.kind == "pyramid":
        # PyramidKV: linear from (2 - 1/beta) at layer 0 down to 1/beta at the top.
        beta = Fraction(shape.beta)
        top, bottom = 2 - 1 / beta, 1 / beta
        return [top - (top - bottom) * layer / last for layer in range(num_layers)]
    if shape.kind == "linear":
        start, end = Fraction(shape.start), Fraction(shape.end)
        raw = [start + (end - start) * layer / last for layer in range(num_layers)]
    else:
        if len(shape.weights) != num_layers:
            raise ValueError(f"the by-layer table has {len(shape.weights)} weights but the model has {num_layers} layers")
        raw = [Fraction(w) for w in shape.weights]
    mean = sum(raw) / num_layers
    return [w / mean for w in raw]


def layer_weights(shape: ir.LayerShape | None, num_layers: int) -> list[float]:
    return [float(w) for w in _exact_weights(shape, num_layers)]


def layer_counts(count: int, shape: ir.LayerShape | None, num_layers: int) -> list[int]:
    """Per-layer counts: count x weight, halves rounded up."""
    return [math.floor(count * w + Fraction(1, 2)) for w in _exact_weights(shape, num_layers)]


def layer_peak(shape: ir.LayerShape) -> float:
    """Largest per-layer count as a multiple of the written (mean) count."""
    if shape.kind == "pyramid":
        return 2 - 1 / shape.beta
    if shape.kind == "linear":
        return max(shape.start, shape.end) / ((shape.start + shape.end) / 2)
    if shape.kind == "table":
        return max(shape.weights) / (sum(shape.weights) / len(shape.weights))
    return 1.0
