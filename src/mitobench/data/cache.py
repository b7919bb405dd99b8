"""Decode each dataset's PNGs once into a uint8 array cache keyed by the files' content.

An entry is ``<key>.npy`` (N, H, W, 3) uint8 plus ``<key>.json`` (file list, shape, digest of the
array). The key hashes every file's bytes in record order and the patch size, so an edited,
added or re-ordered image makes a new entry. Writes are atomic (array first, metadata last); an
entry whose array is truncated or does not match its metadata is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from mitobench.data.images import ImageModeWarning, read_patch
from mitobench.io import atomic_save_npy, atomic_write_json
from mitobench.progress import progress_bar

#: Part of every key: raise it when decoding changes, so arrays decoded the old way are never reused
#: (2: 16-bit grey keeps its high byte; version 1 clipped it to white).
CACHE_FORMAT = 2


def content_key(paths: list[str], patch_size: int) -> str:
    digest = hashlib.sha256(f"mitobench-patches-v{CACHE_FORMAT}-{patch_size}".encode())
    for path in paths:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:32]


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _warn_converted(n: int, example: str) -> None:
    warnings.warn(f"{n} image(s) converted to RGB, e.g. {example}", ImageModeWarning, stacklevel=3)


class PatchCache:
    """Folder of decoded patch arrays; ``load(records)`` returns a read-only memory map."""

    def __init__(self, root: str | Path, patch_size: int = 128, workers: int = 4):
        self.root = Path(root) / "patches"
        self.patch_size = patch_size
        self.workers = workers

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npy", self.root / f"{key}.json"

    def _valid(self, key: str, n: int) -> tuple[np.ndarray, dict] | None:
        array_path, meta_path = self._paths(key)
        if not (array_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            array = np.load(array_path, mmap_mode="r")
        except (ValueError, OSError, json.JSONDecodeError):
            return None
        if not isinstance(meta, dict):  # a half-written or foreign file: rebuild
            return None
        if array.shape != (n, self.patch_size, self.patch_size, 3) or array.dtype != np.uint8:
            return None
        if meta.get("shape") != list(array.shape) or meta.get("bytes") != array_path.stat().st_size:
            return None
        return array, meta

    def _content_key(self, paths: list[str]) -> str:
        """``content_key`` without reading the files again while none changed since it was computed.

        As git's index does, the file list with each file's size, mtime, ctime and inode points to the
        content key computed before; any write to a file changes its ctime, so a changed file is re-read.
        """
        stats = hashlib.sha256(f"{CACHE_FORMAT}-{self.patch_size}".encode())
        for path in paths:
            st = os.stat(path)
            stats.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
        memo = self.root / "by-stat" / f"{stats.hexdigest()[:32]}.json"
        try:
            return str(json.loads(memo.read_text())["content_key"])
        except (OSError, ValueError, KeyError, TypeError):
            key = content_key(paths, self.patch_size)
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo, {"content_key": key, "n_files": len(paths)})
            return key

    def load(self, records: pd.DataFrame, name: str = "patches", verify: bool = False) -> tuple[np.ndarray, str]:
        """``(patches, content_key)`` of ``records`` in row order, decoding only on the first call."""
        paths = records["path"].tolist()
        key = self._content_key(paths)
        found = self._valid(key, len(paths))
        if found is not None and verify and found[1].get("sha256") != _array_digest(found[0]):
            found = None
        if found is None:
            return self._build(key, paths, name), key
        array, meta = found
        converted = meta.get("converted")
        if isinstance(converted, dict) and converted.get("n"):  # said on every call, not only the one that decoded
            _warn_converted(int(converted["n"]), str(converted.get("example", "")))
        return array, key

    def _build(self, key: str, paths: list[str], name: str) -> np.ndarray:
        out = np.empty((len(paths), self.patch_size, self.patch_size, 3), dtype=np.uint8)
        converted: list[str] = []

        def work(i: int) -> None:
            out[i], note = read_patch(paths[i], self.patch_size)  # no warnings in threads: catch_warnings is global
            if note:
                converted.append(note)

        with ThreadPoolExecutor(self.workers) as pool, progress_bar(f"decode {name}", len(paths)) as advance:
            for _ in pool.map(work, range(len(paths))):
                advance(1)
        if converted:
            _warn_converted(len(converted), converted[0])
        array_path, meta_path = self._paths(key)
        atomic_save_npy(array_path, out)
        atomic_write_json(meta_path, {"format": CACHE_FORMAT, "shape": list(out.shape), "sha256": _array_digest(out),
                                      "bytes": array_path.stat().st_size, "files": paths,
                                      "converted": {"n": len(converted), "example": converted[0] if converted else ""}})
        return np.load(array_path, mmap_mode="r")
