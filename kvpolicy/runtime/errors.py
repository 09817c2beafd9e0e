"""Errors raised by the runtime core (block pool, paged store, rewriter).

Apart from PoolExhausted (a capacity condition an engine reacts to, e.g. by
preempting a sequence), these mean a caller bug; they are not user input
errors, so they deliberately do not derive from kvpolicy.errors.KvpolicyError
(the CLI would hide their traceback).
"""


class RuntimeCoreError(Exception):
    """Base class of every error raised by kvpolicy.runtime."""


class PoolExhausted(RuntimeCoreError):
    """Not enough free blocks; nothing was allocated or written."""


class DoubleFree(RuntimeCoreError):
    """A block was freed that is not currently allocated."""


class BlockLeak(RuntimeCoreError):
    """Block bookkeeping is inconsistent: a block is allocated but held by no
    sequence, held by two sequences, or held while marked free."""


class InvalidKeep(RuntimeCoreError):
    """A kept set names slots that are out of range, unsorted, or not valid."""
