"""How a count written once is spread over layers (`by layer SHAPE`).

Shared by `explain` and every backend, so all agree to the token. Weights
have mean 1 over the layers, so the total is count x layers (up to rounding).
"""
from __future__ import annotations

import math

from . import ir


def layer_weights(shape: ir.LayerShape | None, num_layers: int) -> list[float]:
    if num_layers < 1:
        raise ValueError("a model has at least one layer")
    if shape is None or shape.kind == "uniform" or num_layers == 1:
        return [1.0] * num_layers
    last = num_layers - 1
    if shape.kind == "pyramid":
        # PyramidKV: linear from (2 - 1/beta) at layer 0 down to 1/beta at the top.
        top, bottom = 2 - 1 / shape.beta, 1 / shape.beta
        return [top - (top - bottom) * layer / last for layer in range(num_layers)]
    if shape.kind == "linear":
        raw = [shape.start + (shape.end - shape.start) * layer / last for layer in range(num_layers)]
    else:
        if len(shape.weights) != num_layers:
            raise ValueError(f"the by-layer table has {len(shape.weights)} weights but the model has {num_layers} layers")
        raw = list(shape.weights)
    mean = sum(raw) / num_layers
    return [w / mean for w in raw]


def layer_counts(count: int, shape: ir.LayerShape | None, num_layers: int) -> list[int]:
    """Per-layer counts; halves round up, as kvpress's PyramidKVPress does."""
    return [int(math.floor(count * w + 0.5)) for w in layer_weights(shape, num_layers)]
