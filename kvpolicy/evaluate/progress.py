"""A progress line on stderr: runs done of the total, elapsed time, ETA.

On a terminal one line is rewritten in place; otherwise (a log file, CI)
a line is printed per finished sample and per note, so logs stay short.
"""
from __future__ import annotations

import sys
import time


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.width = 0
        self.current = ""

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        eta_text = "ETA --:--" if eta is None else f"ETA {clock(eta)}"
        return f"kvpolicy eval: {self.done}/{self.total} runs, {clock(elapsed)} elapsed, {eta_text}  {self.current}"

    def _write(self, text: str, newline: bool) -> None:
        if self.quiet:
            return
        if self.tty:
            pad = max(0, self.width - len(text))
            self.stream.write("\r" + text + " " * pad + ("\n" if newline else ""))
            self.width = 0 if newline else len(text)
        elif newline:
            self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, label: str) -> None:
        """A run starts (the previous one, if any, is done)."""
        if self.current:
            self.done += 1
        self.current = label
        self._write(self._line(), newline=False)

    def note(self, text: str) -> None:
        self._write(text, newline=True)

    def sample_done(self, sample_id: str, summary: str) -> None:
        self.done += 1
        self.current = ""
        self._write(self._line() + f"{sample_id} done: {summary}", newline=True)

    def finish(self) -> None:
        if self.tty and self.width and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0
