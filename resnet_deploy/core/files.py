"""Output files: checked before any work starts, and written atomically, so a reader (or a
crash) never sees half an artifact and no input is ever overwritten."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    pass


@contextlib.contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it into place only if the block succeeds."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{path}: folder {folder} does not exist; create it or choose "
                        "another output path")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{path}: folder {folder} is not writable; choose another output path")
    if path.is_dir():
        raise UserError(f"{path}: is a folder where a file belongs; remove it or choose another "
                        "output path")
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
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise UserError(f"{path}: {(exc.strerror or 'disk full').lower()} while writing it; "
                        f"free space in "
                        f"{folder} or choose another path") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder.

    UTF-8, except that a file name which is not (held as surrogate escapes) is written back
    as its own bytes rather than failing."""
    with atomic_output(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")


def beside(model: str | Path, tag: str) -> Path:
    """Where a model derived from ``model`` goes by default: ``A.onnx`` -> ``A.<tag>.onnx``
    beside it (INT8 and FP16 copies keep the name they came from)."""
    model = Path(model)
    return model.with_name(f"{model.name.removesuffix('.onnx')}.{tag}.onnx")


NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, in bytes: one name, a whole path


def _same(a: Path, b: Path) -> bool:
    """The same file: equal resolved paths, or one inode reached through a link."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Mapping[str, Path | None], inputs: Iterable[Path | None] = (),
                  *, folders: Mapping[str, Path | None] | None = None) -> None:
    """Refuse, before any work, an output that cannot be written or would destroy something.

    ``outputs`` and ``folders`` map an option name (for the message) to a path or None. A
    file output needs an existing writable parent and must be a regular file or absent; a
    folder output must be a folder or absent. No output may be one of ``inputs`` (a file
    already inside an input folder is an input too) or another output (compared by resolved
    path and by inode).
    """
    seen: list[tuple[str, Path]] = []
    given = [(name, Path(p), False) for name, p in outputs.items() if p is not None]
    given += [(name, Path(p), True) for name, p in (folders or {}).items() if p is not None]
    sources = [Path(p) for p in inputs if p is not None]
    for name, path, is_folder in given:
        too_long = [part for part in path.parts if len(os.fsencode(part)) > NAME_MAX]
        if too_long or len(os.fsencode(str(path))) > PATH_MAX:
            raise UserError(f"{name} {str(path)[:80]}...: the name is longer than the file "
                            "system allows; choose a shorter path")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise UserError(f"{name} {path}: folder {parent} does not exist; create it or "
                            "choose another path")
        if not os.access(parent, os.W_OK):
            raise UserError(f"{name} {path}: folder {parent} is not writable; choose another "
                            "path")
        if path.exists() or path.is_symlink():
            mode = path.stat().st_mode if path.exists() else 0
            if is_folder and not stat.S_ISDIR(mode):
                raise UserError(f"{name} {path}: exists and is not a folder; choose a folder")
            if not is_folder and not stat.S_ISREG(mode):
                kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
                raise UserError(f"{name} {path}: is {kind}; give a file path to write")
        for source in sources:
            # Writing inside an input folder changes the inputs: a file there may be one, and
            # a new one joins it (a plot in the calibration folder becomes a "photo").
            inside = source.is_dir() and path.resolve().is_relative_to(source.resolve())
            if _same(path, source):
                raise UserError(f"{name} {path}: is one of this command's inputs and would be "
                                "overwritten; choose another path")
            if inside:
                raise UserError(f"{name} {path}: is inside the input folder {source}, so "
                                "writing there would change this command's inputs; choose "
                                "another path")
        for other_name, other in seen:
            if _same(path, other):
                raise UserError(f"{name} {path}: is also {other_name}; give each output its "
                                "own path")
        seen.append((name, path))


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
