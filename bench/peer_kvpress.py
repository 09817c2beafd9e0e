"""The kvpress side of the peer comparison (issue 4). Standalone: it runs in
.venv-peer (kvpress 0.5.5, transformers<5.3, built by `make peer`) and never
imports kvpolicy; bench/peer.py drives it through JSON.

    .venv-peer/bin/python bench/peer_kvpress.py REQUEST.json ANSWER.json   # "-" for stdin / stdout

Request:
    {"model": DIR,                      # a local HF directory (from_pretrained, local_files_only)
     "input_ids": [int, ...],           # the prompt, already tokenized
     "threads": 2,
     "runs": [{"press": "snapkv", "compression_ratio": 0.75,
               "params": {"window_size": 64, ...},   # the press's own fields
               "new_tokens": 0}, ...]}  # > 0: also decode greedily after compression
Answer:
    {"versions": {...},
     "runs": [{"press", "compression_ratio", "params",
               "kept": [layer][kv_head] -> sorted prompt positions the press keeps,
               "masked": bool,          # True: kept by masking (fake keys), the cache holds every token
               "kv_bytes": int,         # bytes of K/V the cache really holds after prefill
               "kv_bytes_full": int,    # bytes an uncompressed cache holds for the prompt
               "tokens": [int, ...],    # greedy tokens (first from the prefill logits)
               "seconds": float}]}

How the kept positions are read, without changing what kvpress computes:
- ScorerPress family (SnapKV, StreamingLLM, Knorm, TOVA, ObservedAttention,
  KeyDiff, PyramidKV): the press's compress() is wrapped; inside it the
  press's own score() is wrapped to capture the scores it returns, and the
  kept count is the length of the keys compress() returns. The positions are
  then `scores.topk(n_kept, dim=-1).indices`, the very call ScorerPress /
  PyramidKVPress make, and they are checked: gathering the input keys at those
  positions must give exactly the keys compress() returned.
- AdaKV (head-wise, masks instead of evicting): compress() leaves the cache
  whole and stores the masked (batch, head, position) triples in
  module.masked_key_indices, which kvpress's attention patch turns into fake
  keys at decode time; kept = every position not in that list.
"""
from __future__ import annotations

import json
import sys
import time

import torch

PRESSES = {
    "snapkv": "SnapKVPress",
    "streaming_llm": "StreamingLLMPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
    "observed_attention": "ObservedAttentionPress",
    "keydiff": "KeyDiffPress",
    "pyramidkv": "PyramidKVPress",
    "adakv": "AdaKVPress",  # over SnapKVPress; params: alpha_safeguard plus SnapKV's
}
EAGER = {"observed_attention"}  # needs the attention weights (attn_implementation="eager")


def make_press(name: str, ratio: float, params: dict):
    import kvpress

    params = dict(params)
    if name == "adakv":
        alpha = params.pop("alpha_safeguard", 0.2)
        return kvpress.AdaKVPress(press=kvpress.SnapKVPress(compression_ratio=ratio, **params), alpha_safeguard=alpha)
    if name not in PRESSES:
        raise SystemExit(f"peer_kvpress: unknown press {name!r}; known: {', '.join(PRESSES)}")
    return getattr(kvpress, PRESSES[name])(compression_ratio=ratio, **params)


def _scorer_recorder(press, record: dict):
    """Wrap press.compress (an instance attribute shadows the method) so each
    layer's kept positions land in record[layer_idx]."""
    original_compress = press.compress
    original_score = press.score

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        captured = {}

        def score(*args, **kw):
            captured["scores"] = original_score(*args, **kw)
            return captured["scores"]

        press.score = score
        try:
            out_keys, out_values = original_compress(module, hidden_states, keys, values, attentions, kwargs)
        finally:
            del press.score
        n_kept, length = out_keys.shape[2], keys.shape[2]
        if "scores" not in captured:  # compression_ratio 0: nothing scored, nothing evicted
            kept = torch.arange(length).expand(keys.shape[0], keys.shape[1], length)
        else:
            kept = captured["scores"].topk(n_kept, dim=-1).indices  # the call ScorerPress.compress makes
            gathered = keys.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
            if not torch.equal(gathered, out_keys):
                raise RuntimeError(f"layer {module.layer_idx}: could not recover the positions {type(press).__name__} kept")
        record[module.layer_idx] = [sorted(row.tolist()) for row in kept[0]]
        return out_keys, out_values

    press.compress = compress


def _adakv_recorder(press, record: dict, num_kv: int):
    original_compress = press.compress

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        out = original_compress(module, hidden_states, keys, values, attentions, kwargs)
        length = keys.shape[2]
        kept = torch.ones(num_kv, length, dtype=torch.bool)
        masked = getattr(module, "masked_key_indices", None)
        if masked is not None:
            _, heads, positions = masked
            kept[heads, positions] = False
        record[module.layer_idx] = [torch.nonzero(row).flatten().tolist() for row in kept]
        return out

    press.compress = compress


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def run_one(model, input_ids: torch.Tensor, spec: dict) -> dict:
    from transformers import DynamicCache

    name, ratio, params = spec["press"], float(spec["compression_ratio"]), spec.get("params", {})
    press = make_press(name, ratio, params)
    config = model.config
    num_kv = config.num_key_value_heads
    record: dict[int, list[list[int]]] = {}
    if name == "adakv":
        _adakv_recorder(press, record, num_kv)
    else:
        _scorer_recorder(press, record)

    start = time.perf_counter()
    cache = DynamicCache()
    with press(model):
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    length = input_ids.shape[1]
    kept = [record.get(layer, [list(range(length))] * num_kv) for layer in range(config.num_hidden_layers)]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bytes_full = config.num_hidden_layers * 2 * num_kv * length * head_dim * torch.finfo(model.dtype).bits // 8
    held = _cache_bytes(cache)

    tokens: list[int] = []
    new_tokens = int(spec.get("new_tokens", 0))
    if new_tokens > 0:
        # As kvpress's pipeline decodes: positions given explicitly (the cache is shorter than the prompt).
        token = out.logits[0, -1].argmax()
        tokens.append(int(token))
        for step in range(new_tokens - 1):
            position = torch.tensor([[length + step]])
            out = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=position, use_cache=True)
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
    for module in model.modules():  # AdaKV leaves its mask on the attention modules
        if hasattr(module, "masked_key_indices"):
            module.masked_key_indices = None
    return {
        "press": name,
        "compression_ratio": ratio,
        "params": params,
        "kept": kept,
        "masked": name == "adakv",
        "kv_bytes": held,
        "kv_bytes_full": bytes_full,
        "tokens": tokens,
        "seconds": seconds,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    request = json.load(sys.stdin if argv[0] == "-" else open(argv[0], encoding="utf-8"))
    torch.set_num_threads(int(request.get("threads", 2)))

    import kvpress  # noqa: F401  (patches transformers' attention functions for AdaKV's masking)
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from transformers import AutoModelForCausalLM

    models = {}

    def model_for(attn: str):
        if attn not in models:
            m = AutoModelForCausalLM.from_pretrained(request["model"], local_files_only=True, dtype=torch.float32, attn_implementation=attn)
            models[attn] = m.eval()
        return models[attn]

    input_ids = torch.tensor([request["input_ids"]], dtype=torch.long)
    runs = [run_one(model_for("eager" if spec["press"] in EAGER else "sdpa"), input_ids, spec) for spec in request["runs"]]
    answer = {
        "versions": {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else _version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__},
        "runs": runs,
    }
    text = json.dumps(answer)
    if argv[1] == "-":
        sys.stdout.write(text)
    else:
        with open(argv[1], "w", encoding="utf-8") as f:
            f.write(text)
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
