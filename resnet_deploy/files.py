"""Atomic file output: a reader (or a crash) never sees half an artifact."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from collections.abc import Iterator

from .errors import UserError


@contextlib.contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it into place only if the block succeeds."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{path}: folder {folder} does not exist; create it or choose "
                        "another output path")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{path}: folder {folder} is not writable; choose another output path")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
    except OSError as exc:
        raise UserError(f"{path}: cannot write in {folder} ({exc.strerror}); "
                        "choose another output path") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are meant to be shared
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder."""
    with atomic_output(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")
