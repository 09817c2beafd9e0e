"""Errors a user can cause. The CLI prints them as one line (or a positioned
report) and exits non-zero; it never shows a traceback for these."""


class KvpolicyError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ModelError(KvpolicyError):
    """The model could not be found, converted or loaded; the message says what to do."""
