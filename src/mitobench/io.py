"""Atomic file writes: a crash never leaves a half-written file under its final name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _read_umask() -> int:
    """The process umask. Reading it means setting it, so do it once, at import (before any worker
    thread could create a file in between with the wrong mode)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None], *, exclusive: bool = False) -> Path:
    """Call ``write(tmp_path)`` then move the temporary file to ``path``.

    The file gets the mode a plain ``open()`` would give it (``0o666 & ~umask``), not mkstemp's 0600, so a
    run folder can be shared with a group. ``exclusive``: never replace a file that exists at ``path`` (even
    one that appeared while ``write`` ran): raise ``FileExistsError`` instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if exclusive:
            _publish_exclusive(tmp_path, path)
        else:
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def _publish_exclusive(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` unless ``path`` exists: a hard link is created atomically or not at all.

    Where hard links are unsupported, reserve the name with ``O_CREAT | O_EXCL`` and rename over that
    (empty) placeholder: still never over someone else's file.
    """
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        os.replace(tmp, path)
    except OSError:
        path.unlink(missing_ok=True)  # our own placeholder
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    def _write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.save(fh, array)

    return atomic_write(path, _write)


def atomic_write_csv(path: str | Path, frame, *, exclusive: bool = False) -> Path:
    return atomic_write(path, lambda p: frame.to_csv(p, index=False), exclusive=exclusive)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
