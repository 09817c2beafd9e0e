"""The HF transformers engine: a Cache that applies a policy for real, the
attention function that feeds it, and greedy generation with stats."""
from .cache import PolicyCache
from .layer import PolicyLayer
from .decoding import Result, Scored, Stats, encode, generate, prepare, score, trace
from .prefill import Prefilled, prefill

__all__ = ["PolicyCache", "PolicyLayer", "Prefilled", "Result", "Scored", "Stats", "encode", "generate", "prefill", "prepare", "score", "trace"]
