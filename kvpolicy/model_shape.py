"""The shape of a model, as far as a policy cares: layers, heads, head size."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    name: str = "the model"

    @staticmethod
    def from_config(config, name: str | None = None) -> "ModelShape":
        heads = config.num_attention_heads
        return ModelShape(
            num_layers=config.num_hidden_layers,
            num_q_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            name=name or getattr(config, "_name_or_path", None) or "the model",
        )
