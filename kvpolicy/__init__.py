"""kvpolicy: a declarative language and compiler for KV-cache compression policies."""
__version__ = "0.1.0"
