"""Embedding cache: extract once per dataset and backbone recipe, reuse across folds, methods and runs.

The key hashes the backbone key, its weights id (sha256 of the weights file, or ``random-init``),
the card's recipe (architecture, input size, resize, interpolation, normalisation, embedding
recipe), the dtype, the patch content key and the mitobench version. Any change makes a new entry.
An entry is ``<key>.npy`` (float32) plus ``<key>.json`` holding the array's sha256; a truncated or
corrupt entry fails that check and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from mitobench import __version__
from mitobench.io import atomic_save_npy, atomic_write_json
from mitobench.models.cards import ModelCard

if TYPE_CHECKING:  # pragma: no cover  (a warm run reads the cache without importing torch)
    import torch

    from mitobench.models.registry import Backbone

log = logging.getLogger(__name__)


def dtype_key(dtype: "torch.dtype | str") -> str:
    """``torch.float32`` for ``torch.float32`` or its name ``float32``: one spelling in every key."""
    if isinstance(dtype, str):
        from mitobench.device import DTYPES

        return f"torch.{DTYPES.get(dtype.removeprefix('torch.'), dtype)}"
    return str(dtype)


def embedding_key(backbone: "Backbone | ModelCard", patch_key: str, dtype: "torch.dtype | str",
                  weights_id: str | None = None) -> str:
    """Cache key: the card's recipe, the weights' digest, dtype, the patches' content key, mitobench's version.

    ``backbone`` may be a bare card with ``weights_id`` given (a warm run finds its entries without a build)."""
    card = backbone if isinstance(backbone, ModelCard) else backbone.card
    weights_id = weights_id if weights_id is not None else backbone.weights_id
    spec = {"recipe": card.recipe(), "weights": weights_id, "dtype": dtype_key(dtype),
            "patches": patch_key, "mitobench": __version__, "format": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:32]


def default_batch_size(device: "torch.device") -> int:
    """Small batches on CPU: at 224 px a batch of 64 spills the caches and runs ~2x slower than 8."""
    return 8 if device.type == "cpu" else 128


def extract(backbone: "Backbone", patches: np.ndarray, batch_size: int | None = None,
            device: "torch.device | None" = None, dtype: "torch.dtype | None" = None, name: str = "embed") -> np.ndarray:
    """Batched embeddings of uint8 ``(N, H, W, 3)`` patches, float32 ``(N, D)``."""
    import torch

    with torch.inference_mode():
        return _extract(backbone, patches, batch_size, device or torch.device("cpu"), dtype or torch.float32, name)


def _extract(backbone, patches, batch_size, device, dtype, name) -> np.ndarray:
    import torch

    from mitobench.progress import progress_bar

    batch_size = batch_size or default_batch_size(device)
    backbone = backbone.to(device).eval()
    channels_last = device.type == "cpu"  # oneDNN runs convolutions much faster in NHWC on CPU
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    out: list[np.ndarray] = []
    autocast = dtype != torch.float32
    with progress_bar(name, len(patches)) as advance:
        for start in range(0, len(patches), batch_size):
            batch = torch.from_numpy(np.array(patches[start:start + batch_size])).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                x = backbone.preprocess(batch)
                feats = backbone(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
            out.append(feats.float().cpu().numpy())
            advance(len(batch))
    return np.concatenate(out) if out else np.zeros((0, backbone.embed_dim), np.float32)


class EmbeddingCache:
    def __init__(self, root: str | Path):
        self.root = Path(root) / "embeddings"

    def _paths(self, card: ModelCard, key: str) -> tuple[Path, Path]:
        folder = self.root / card.key.replace("/", "--")
        return folder / f"{key}.npy", folder / f"{key}.json"

    def lookup(self, card: ModelCard, weights_id: str, patch_key: str, n: int, dtype: "torch.dtype | str") -> np.ndarray | None:
        """The cached, verified embeddings of ``n`` patches, or ``None`` (then ``get`` extracts them)."""
        return self._load(*self._paths(card, embedding_key(card, patch_key, dtype, weights_id)), n)

    def get(self, backbone: "Backbone", patches: np.ndarray, patch_key: str, *, batch_size: int | None = None,
            device: "torch.device | None" = None, dtype: "torch.dtype | str" = "float32", name: str = "embed") -> np.ndarray:
        from mitobench.device import pick_dtype

        if isinstance(dtype, str):
            dtype = pick_dtype(dtype, device or "cpu")
        key = embedding_key(backbone, patch_key, dtype)
        array_path, meta_path = self._paths(backbone.card, key)
        cached = self._load(array_path, meta_path, len(patches))
        if cached is not None:
            return cached
        feats = extract(backbone, patches, batch_size, device, dtype, f"embed {name} ({backbone.card.key})")
        atomic_save_npy(array_path, feats)
        atomic_write_json(meta_path, {"sha256": hashlib.sha256(feats.tobytes()).hexdigest(), "shape": list(feats.shape),
                                      "model": backbone.card.key, "weights": backbone.weights_id,
                                      "weights_source": backbone.weights_source, "dataset": name,
                                      "recipe": backbone.card.recipe(), "dtype": str(dtype)})
        return feats

    @staticmethod
    def _load(array_path: Path, meta_path: Path, n: int) -> np.ndarray | None:
        if not (array_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            feats = np.load(array_path)
        except (ValueError, OSError, EOFError, json.JSONDecodeError):
            log.warning("embedding cache entry %s is unreadable; rebuilding it", array_path)
            return None
        if feats.shape[0] != n or hashlib.sha256(feats.tobytes()).hexdigest() != meta.get("sha256"):
            log.warning("embedding cache entry %s is corrupt or stale; rebuilding it", array_path)
            return None
        return feats
