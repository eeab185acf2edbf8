"""Atomic file and directory writes: a reader never sees a partial output.

A full disk (``ENOSPC``, or ``EDQUOT`` for a quota) while writing becomes a one-line
:class:`~components.errors.UserError` naming the output: the temporary file or folder is removed and the
previous version of the output, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.errors import UserError

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFull(UserError):
    """A write ran out of space; ``os_error`` is the original ``ENOSPC``/``EDQUOT``."""

    def __init__(self, message: str, os_error: OSError) -> None:
        super().__init__(message)
        self.os_error = os_error


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS


def disk_full_error(target: str | os.PathLike[str], err: OSError) -> DiskFull:
    """The one line for a write to ``target`` that ran out of space."""
    target = Path(target)
    try:
        free = shutil.disk_usage(next(p for p in (target, *target.parents) if p.exists())).free
        left = f"{free / 2**20:.1f} MiB free"
    except (OSError, StopIteration):
        left = "free space unknown"
    what = "quota exceeded" if err.errno == errno.EDQUOT else "no space left on device"
    return DiskFull(
        f"{target}: {what} ({left}); it was not written and its previous version, if any, is unchanged; "
        "free some space and run the same command again",
        err,
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)  # first, so the message counts the space it held as free
        if is_disk_full(err):
            raise disk_full_error(target, err) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` as a whole if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise disk_full_error(target, err) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write JSON deterministically (sorted keys), so unchanged content stays byte-identical."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")
