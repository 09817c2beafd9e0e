"""`kvpolicy calibrate`'s fitting: every calibration of a policy fitted on
real English text through the HF engine, on exactly the inputs an online fit
sees at a prefill compression (the held keys and the observed query window).
The file format it is written in is kvpolicy/calibration_file.py."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvpolicy import ir, texts
from kvpolicy.backends.torch import TorchPolicy
from kvpolicy.backends.torch.policy import LayerDecision
from kvpolicy.calibration_file import normalised
from kvpolicy.errors import KvpolicyError

from . import attention
from .cache import PolicyCache
from .decoding import prepare


def english_ids(tokenizer, tokens: int):
    """[1, tokens] ids: the start of kvpolicy.texts.english_text, the text
    `kvpolicy calibrate` fits on."""

    chars = max(64, tokens * 6)
    while True:
        ids = tokenizer(texts.english_text(chars), return_tensors="pt").input_ids
        if ids.shape[1] >= tokens:
            return ids[:, :tokens]
        chars *= 2


@dataclass
class Fitted:
    """What fit_on_text found: per calibration name, [layers, kv_heads] arrays."""

    values: dict
    errors: dict
    row_errors: dict
    converged: dict  # name -> [layers, kv_heads] bool
    steps: dict  # name -> [layers] solver iterations


def fit_on_text(model, policy: ir.Policy, input_ids, progress=None) -> Fitted:
    """Prefill `input_ids` through the HF engine under `policy` (its `fit`
    clauses set to once) and fit every calibration on every layer, on the
    inputs an online fit would see at a prefill compression: the held keys
    and the observed query window. progress(layer, layers) after each layer."""
    policy = normalised(policy)
    if not policy.calibrations:
        raise KvpolicyError(f"policy {policy.name} has no calibrate block: nothing to fit")
    if not policy.triggers:
        raise KvpolicyError(f"policy {policy.name} never compresses, so its calibrations are never used")
    shape = prepare(model, policy).shape
    layers = shape.num_layers
    results: dict[int, dict] = {}

    class Fitting(TorchPolicy):
        """Every layer is due once; 'compressing' it fits and keeps everything,
        so the cache builds the layer inputs exactly as for a real compression."""

        def due(self, run, layer, phase, held):
            return layer not in results

        def compress_layer(self, run, layer, inputs):
            results[layer] = self.calibrate_layer(run, layer, inputs)
            if progress is not None:
                progress(len(results), layers)
            return LayerDecision(kept=inputs.valid.clone(), physical=False)

    cache = PolicyCache(Fitting(policy, shape))
    with torch.inference_mode(), attention.active(cache):
        model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        cache.compress("prefill")
    missing = [i for i in range(layers) if i not in results]
    if missing:
        raise KvpolicyError(f"layers {missing} were not fitted (no keys held?)")

    def table(name, pick, dtype=np.float32):
        rows = []
        for i in range(layers):
            value = pick(results[i][name]).detach().reshape(-1)
            rows.append(value.expand(shape.num_kv_heads) if value.numel() == 1 else value)
        return torch.stack(rows).numpy().astype(dtype)

    names = [c.name for c in policy.calibrations]
    return Fitted(
        values={n: table(n, lambda r: r.temperature) for n in names},
        errors={n: table(n, lambda r: r.error) for n in names},
        row_errors={n: table(n, lambda r: r.row_error) for n in names},
        converged={n: table(n, lambda r: r.converged, bool) for n in names},
        steps={n: np.array([results[i][n].steps for i in range(layers)]) for n in names},
    )
