"""The one atomic file writer: a reader never sees half a file, a crash leaves no partial one.

Every file the project writes (meshes, images, pipeline records, downloaded assets and
checkpoints) goes through :func:`atomic_write` or :func:`atomic_write_from`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_from", "atomic_path"]


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, tmp_dir: str | os.PathLike | None = None, fsync: bool = True
) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path`` (``os.replace``), on any
    error it is removed and ``path`` is left as it was.

    Args:
        path: the final file.
        tmp_dir: folder for the temporary file (default: the target's folder); it must be on
            the same filesystem as ``path``.
        fsync: flush the temporary file to disk before the rename (crash-safe contents).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    td = Path(tmp_dir) if tmp_dir is not None else p.parent
    td.mkdir(parents=True, exist_ok=True)
    tmp = td / f".{p.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        if fsync and tmp.exists():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(
    path: str | os.PathLike, data: bytes, tmp_dir: str | os.PathLike | None = None, fsync: bool = True
) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`). Returns ``path``."""
    with atomic_path(path, tmp_dir, fsync) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode honours the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_from(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], None],
    tmp_dir: str | os.PathLike | None = None,
    fsync: bool = True,
) -> Path:
    """Like :func:`atomic_write`, with ``write(file)`` streaming the contents (downloads)."""
    with atomic_path(path, tmp_dir, fsync) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
    return Path(path)
