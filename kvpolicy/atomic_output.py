"""Write an output file whole or not at all: into a temp file beside it, then rename."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(out: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` fills a temp file in out's directory, which then replaces `out`.
    The file gets the mode a plain open() would give (mkstemp makes it 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
