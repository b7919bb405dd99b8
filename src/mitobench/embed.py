"""Embedding cache: extract once per dataset and backbone recipe, reuse across folds, methods and runs.

The key hashes the backbone key, its weights id (sha256 of the weights file),
the card's recipe (architecture, input size, resize, interpolation, normalisation, embedding
recipe), the dtype, the patch content key and the mitobench version. Any change makes a new entry.
An entry is ``<key>.npy`` (float32) plus ``<key>.json`` holding the array's sha256; a truncated or
corrupt entry fails that check and is rebuilt. Random-init backbones are never cached: each build draws other
weights, so features cached from one would be mixed with another's.
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
from mitobench.models.cards import RANDOM_INIT, ModelCard

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
            device: "torch.device | None" = None, dtype: "torch.dtype | None" = None, name: str = "embed",
            freeze: bool = True, workers: int = 1) -> np.ndarray:
    """Batched embeddings of uint8 ``(N, H, W, 3)`` patches, float32 ``(N, D)``.

    ``freeze``: on CPU in float32, run a frozen TorchScript graph (``frozen_for_cpu``); its embeddings equal
    eager mode's to float32 rounding (relative difference ~1e-6), so the cache key does not depend on it.
    ``workers``: on CPU, embed in that many single-threaded worker processes (see ``_extract_in_workers``)."""
    import torch

    with torch.inference_mode():
        return _extract(backbone, patches, batch_size, device or torch.device("cpu"), dtype or torch.float32, name,
                        freeze, workers)


def frozen_for_cpu(backbone: "Backbone", example: "torch.Tensor"):
    """``backbone``'s forward as a frozen TorchScript graph optimised for CPU inference (BatchNorm folded into
    the convolutions, oneDNN kernels): EfficientNet-Lite0 embeds ~1.5x faster here in float32.

    Checked against eager on ``example``; if tracing fails or the outputs differ beyond float32 rounding,
    the eager module is returned. The graph is traced at ``example``'s batch size: feed it that size only.
    """
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(backbone, example, check_trace=False)))
            expected, got = backbone(example), frozen(example)
    except Exception as exc:  # noqa: BLE001  (any tracing failure: eager is always correct)
        log.info("%s: TorchScript freezing failed (%s); embedding in eager mode", backbone.card.key, exc)
        return backbone
    scale = float(expected.abs().max()) + 1e-6
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * scale):
        log.info("%s: the frozen graph disagrees with eager mode; embedding in eager mode", backbone.card.key)
        return backbone
    return frozen


def _extract(backbone, patches, batch_size, device, dtype, name, freeze: bool = True, workers: int = 1) -> np.ndarray:
    from mitobench.progress import progress_bar

    if device.type == "cpu" and workers > 1:
        from mitobench import embed_workers

        if len(patches) >= embed_workers.MIN_IMAGES_PER_WORKER * workers:
            try:
                with progress_bar(name, len(patches)) as advance:
                    return embed_workers.extract_in_workers(backbone, patches, batch_size, dtype, freeze, workers, advance)
            except embed_workers.WorkerError as exc:
                log.warning("%s: embedding in worker processes failed (%s); embedding in this process",
                            backbone.card.key, exc)
                embed_workers.shutdown()
    with progress_bar(name, len(patches)) as advance:
        return _embed_batches(backbone, patches, batch_size or default_batch_size(device), device, dtype, freeze, advance)[0]


def _embed_batches(backbone, patches, batch_size, device, dtype, freeze, advance, network=None):
    """The extraction loop: ``(embeddings, network)``; ``network`` (eager or frozen) is reused when given."""
    import torch

    batch_size = min(batch_size, max(len(patches), 1)) if network is None else batch_size
    backbone = backbone.to(device).eval()
    on_cpu = device.type == "cpu"
    if on_cpu:  # oneDNN runs convolutions much faster in NHWC on CPU
        backbone = backbone.to(memory_format=torch.channels_last)
    autocast = dtype != torch.float32
    out: list[np.ndarray] = []
    for start in range(0, len(patches), batch_size):
        batch = torch.from_numpy(np.array(patches[start:start + batch_size])).to(device)
        n = len(batch)
        if n < batch_size:  # a frozen graph is traced at batch_size: pad with the last image, drop its outputs
            batch = torch.cat([batch, batch[-1:].expand(batch_size - n, *batch.shape[1:])])
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            x = backbone.preprocess(batch)
            x = x.contiguous(memory_format=torch.channels_last) if on_cpu else x
            if network is None:
                network = frozen_for_cpu(backbone, x) if (freeze and on_cpu and not autocast) else backbone
            feats = network(x)[:n]
        out.append(feats.float().cpu().numpy())
        advance(n)
    feats = np.concatenate(out) if out else np.zeros((0, backbone.embed_dim), np.float32)
    return feats, network


def shutdown_workers() -> None:
    """Stop the embedding worker processes (the probe calls this once every dataset is embedded)."""
    from mitobench.embed_workers import shutdown

    shutdown()


class EmbeddingCache:
    def __init__(self, root: str | Path):
        self.root = Path(root) / "embeddings"

    def _paths(self, card: ModelCard, key: str) -> tuple[Path, Path]:
        folder = self.root / card.key.replace("/", "--")
        return folder / f"{key}.npy", folder / f"{key}.json"

    def lookup(self, card: ModelCard, weights_id: str, patch_key: str, n: int, dtype: "torch.dtype | str") -> np.ndarray | None:
        """The cached, verified embeddings of ``n`` patches, or ``None`` (then ``get`` extracts them)."""
        if weights_id == RANDOM_INIT:
            return None
        return self._load(*self._paths(card, embedding_key(card, patch_key, dtype, weights_id)), n)

    def get(self, backbone: "Backbone", patches: np.ndarray, patch_key: str, *, batch_size: int | None = None,
            device: "torch.device | None" = None, dtype: "torch.dtype | str" = "float32", name: str = "embed",
            workers: int = 1) -> np.ndarray:
        from mitobench.device import pick_dtype

        if isinstance(dtype, str):
            dtype = pick_dtype(dtype, device or "cpu")
        if not backbone.pretrained:  # every build draws other weights: one run's features, never reused
            return extract(backbone, patches, batch_size, device, dtype, f"embed {name} ({backbone.card.key})",
                           workers=workers)
        key = embedding_key(backbone, patch_key, dtype)
        array_path, meta_path = self._paths(backbone.card, key)
        cached = self._load(array_path, meta_path, len(patches))
        if cached is not None:
            return cached
        feats = extract(backbone, patches, batch_size, device, dtype, f"embed {name} ({backbone.card.key})",
                        workers=workers)
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
            if not isinstance(meta, dict):
                raise ValueError("metadata is not a JSON object")
        except (ValueError, OSError, EOFError, json.JSONDecodeError):
            log.warning("embedding cache entry %s is unreadable; rebuilding it", array_path)
            return None
        if feats.shape[0] != n or hashlib.sha256(feats.tobytes()).hexdigest() != meta.get("sha256"):
            log.warning("embedding cache entry %s is corrupt or stale; rebuilding it", array_path)
            return None
        return feats
