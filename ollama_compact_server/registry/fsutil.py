"""Atomic file writes: a temporary file in the target's directory, fsync, rename, fsync of
the directory. A failure at any step leaves the target as it was and no temporary behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import StorageError

TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Makes a rename or unlink inside ``path`` durable (no-op where directories can't
    be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(target: Path) -> Iterator[BinaryIO]:
    """Yields a binary file; on clean exit its bytes replace ``target`` atomically."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=target.parent)
    except OSError as exc:
        raise storage_error(exc) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise storage_error(exc) from exc
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_writer(target) as handle:
        handle.write(data)


def storage_error(exc: OSError) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError("insufficient storage: the disk is full")
    return StorageError(f"storage error: {exc.strerror or exc.__class__.__name__}")


MIN_FREE = 1 << 30  # bytes every write of a model file (upload, pull) leaves free on its disk


def check_free_space(where: Path, needed: int, what: str) -> None:
    """Refuses (StorageError, a 507) to write ``needed`` more bytes at ``where`` when that
    would leave less than MIN_FREE on its disk; a disk that cannot be asked is let be."""
    directory = Path(where)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free - needed < MIN_FREE:
        raise StorageError(
            f"not enough disk space for {what} ({needed / (1 << 30):.2f} GiB) and a "
            f"{MIN_FREE >> 30} GiB reserve"
        )


def age(path: Path) -> float:
    """Seconds since ``path`` was last written (or touched); 0 if it cannot be read."""
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0
