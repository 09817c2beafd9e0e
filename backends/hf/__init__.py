"""The HF transformers engine: a Cache that applies a policy for real, the
attention function that feeds it, and greedy generation with stats."""
from .cache import PolicyCache, PolicyLayer
from .decoding import Result, Stats, encode, generate, prepare

__all__ = ["PolicyCache", "PolicyLayer", "Result", "Stats", "encode", "generate", "prepare"]
