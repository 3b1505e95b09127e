"""Atomic file output: a result appears complete under its final name or not at all.

A result is written to a hidden temporary beside its final name, flushed to disk, then renamed. The temporary's
name records the writing process (`.<name>.partial.<pid>.<host>.<random><suffix>`), so that a later run can
remove what a killed run left behind without touching a file that another live process is still writing.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(r"^\..+\.partial\.(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})\.")


def _fsync(path: str | Path, flags: int = os.O_RDONLY) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` (ending in `suffix`, so writers pick the right format);
    when the block succeeds it is flushed to disk and replaces `path` in one step, when it fails it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.partial.{os.getpid()}.{_HOST}."
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes files private; results are meant to be shared
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # the rename itself survives a crash
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8", newline="")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_temporary(path: str | Path) -> bool:
    """Whether `path` is a temporary of `atomic_output` (finished or not)."""
    return _TEMPORARY.match(Path(path).name) is not None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries in `folder` that `atomic_output` left when its process was killed; return them.

    Only temporaries of dead processes on this machine are removed: one from a live process is still being
    written, and one from another machine (a shared file system) cannot be judged from here.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.match(path.name)
        if match and match["host"] == _HOST and not _process_alive(int(match["pid"])) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
