"""A timm-style registry of model cards and ``create_backbone``.

A card says everything needed to build a backbone offline and to reproduce its authors' feature
recipe: architecture and build kwargs, normalisation, resize/crop, embedding recipe, weights source,
licence and the LoRA target regex. Adding a foundation model means adding one card
(see ``mitobench.models.zoo``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mitobench.errors import MitobenchError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelCard:
    """Everything mitobench knows about one backbone."""

    key: str
    family: str
    arch: str  # timm architecture name (or a builder's name when ``builder`` is set)
    build_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int = 224
    resize: int | None = None  # resize shorter side to this, then centre-crop ``input_size``; None = input_size
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    embedding: str = "pooled"  # pooled | cls | cls+mean
    embed_dim: int = 0
    hf_repo: str | None = None
    weight_files: tuple[str, ...] = ()
    license: str = "see source"
    gated: bool = False
    params_m: float | None = None
    dtype: str = "float32"  # recommended inference dtype on GPU
    lora_target: str | None = None  # regex over module names (peft target_modules)
    description: str = ""
    builder: Callable[..., nn.Module] | None = None  # non-timm architectures
    weights_loader: Callable[[nn.Module], Path | str] | None = None  # weights shipped by a package
    weights_path: Callable[[], Path | str] | None = None  # where weights_loader reads from (no model needed)
    state_dict_filter: Callable[[dict], dict] | None = None  # key fixes known to be needed

    def recipe(self) -> dict[str, Any]:
        """The parts of the card that change the embedding; they go into the cache key."""
        return {"key": self.key, "arch": self.arch, "build_kwargs": {k: repr(v) for k, v in self.build_kwargs.items()},
                "input_size": self.input_size, "resize": self.resize, "interpolation": self.interpolation,
                "mean": self.mean, "std": self.std, "embedding": self.embedding}


_REGISTRY: dict[str, ModelCard] = {}


def register(card: ModelCard) -> ModelCard:
    if card.key in _REGISTRY:
        raise ValueError(f"model key {card.key!r} registered twice")
    _REGISTRY[card.key] = card
    return card


def _ensure_zoo() -> None:
    import mitobench.models.zoo  # noqa: F401  (registers the cards)


def list_cards() -> list[ModelCard]:
    _ensure_zoo()
    return list(_REGISTRY.values())


def get_card(key: str) -> ModelCard:
    """The card for ``key``; ``timm/<name>`` makes a card for any timm model on the fly."""
    _ensure_zoo()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key.startswith("timm/"):
        import timm

        name = key.split("/", 1)[1]
        if not timm.is_model(name):
            raise MitobenchError(f"unknown timm model {name!r}. `python -c \"import timm; print(timm.list_models('*{name[:6]}*'))\"` lists close names.")
        cfg = timm.models.get_pretrained_cfg(name)
        size = int(cfg.input_size[-1]) if cfg is not None else 224
        return ModelCard(key=key, family="timm", arch=name, build_kwargs={"num_classes": 0}, input_size=size,
                         interpolation=getattr(cfg, "interpolation", "bilinear") or "bilinear",
                         mean=tuple(getattr(cfg, "mean", IMAGENET_MEAN)), std=tuple(getattr(cfg, "std", IMAGENET_STD)),
                         embedding="pooled", lora_target=r".*\.(qkv|proj|fc1|fc2)$" if "vit" in name else None,
                         description=f"any timm model ({name})")
    close = [k for k in _REGISTRY if key.lower()[:3] in k.lower()][:8]
    raise MitobenchError(f"unknown model {key!r}. Known keys: {sorted(_REGISTRY)}{' (close: ' + str(close) + ')' if close else ''}; "
                         "any timm model works as 'timm/<name>'. `mitobench models list` shows them all.")


class Backbone(nn.Module):
    """A built model plus its card: ``preprocess`` uint8 patches, ``forward`` to embeddings.

    ``weights_id`` names the weights (sha256 of the file, package version or ``random-init``), so the
    embedding cache can never mix features of different weights.
    """

    def __init__(self, model: nn.Module, card: ModelCard, weights_id: str, weights_source: str):
        super().__init__()
        self.model = model
        self.card = card
        self.weights_id = weights_id
        self.weights_source = weights_source
        self.register_buffer("_mean", torch.tensor(card.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(card.std).view(1, 3, 1, 1), persistent=False)

    @property
    def pretrained(self) -> bool:
        return self.weights_id != "random-init"

    @property
    def embed_dim(self) -> int:
        if self.card.embed_dim:
            return self.card.embed_dim
        return int(getattr(self.model, "num_features", 0)) * (2 if self.card.embedding == "cls+mean" else 1)

    def preprocess(self, patches: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` or float ``(B, 3, H, W)`` in [0, 1] -> normalised model input.

        Batched tensor version of the card's Resize(resize) + CenterCrop(input_size) + Normalize.
        """
        x = patches
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).float().div_(255)
        size = size or self.card.input_size
        resize = self.card.resize if (self.card.resize and size == self.card.input_size) else size
        if x.shape[-1] != resize or x.shape[-2] != resize:
            mode = "bicubic" if self.card.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=(resize, resize), mode=mode, align_corners=False, antialias=True)
            if mode == "bicubic":
                x = x.clamp_(0, 1)
        if resize != size:
            top = (resize - size) // 2
            x = x[..., top:top + size, top:top + size]
        return (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        recipe = self.card.embedding
        if recipe == "pooled":
            return self.model(x)
        if hasattr(self.model, "last_hidden_state_fn"):
            tokens = self.model.last_hidden_state_fn(x)
        elif hasattr(self.model, "forward_features"):
            tokens = self.model.forward_features(x)
        else:
            tokens = self.model(x)
        if tokens.ndim == 2:  # already pooled
            return tokens
        if recipe == "cls":
            return tokens[:, 0]
        if recipe == "cls+mean":
            skip = int(getattr(self.model, "num_prefix_tokens", 1))
            return torch.cat([tokens[:, 0], tokens[:, skip:].mean(1)], dim=-1)
        raise MitobenchError(f"{self.card.key}: unknown embedding recipe {recipe!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def build_model(card: ModelCard, num_classes: int = 0) -> nn.Module:
    """The card's architecture with random weights, offline."""
    if card.builder is not None:
        return card.builder(**card.build_kwargs)
    import timm

    kwargs = dict(card.build_kwargs)
    kwargs["num_classes"] = num_classes
    return timm.create_model(card.arch, pretrained=False, **kwargs)


def create_backbone(key: str, weights: str | Path | None = None, pretrained: bool = True,
                    allow_download: bool = False) -> Backbone:
    """Build ``key`` and load its weights.

    Order: ``weights`` (a file or a Hugging Face snapshot folder) -> weights shipped by a package ->
    the zoo's resolution (user mapping, HF cache, download when allowed). Without weights the model
    is random init, and ``Backbone.pretrained`` says so.
    """
    card = get_card(key)
    model = build_model(card)
    weights_id, source = "random-init", "random init (no weights file given)"
    if weights is not None:
        from mitobench.models.weights import load_weights_strict

        weights_id, source = load_weights_strict(model, Path(weights), card)
    elif pretrained and card.weights_loader is not None:
        path = card.weights_loader(model)
        from mitobench.io import sha256_file

        weights_id, source = sha256_file(path)[:16], f"package weights {path}"
    elif pretrained and card.hf_repo is not None:
        from mitobench.models.weights import resolve_weights, load_weights_strict

        found = resolve_weights(card, allow_download=allow_download)
        if found is not None:
            weights_id, source = load_weights_strict(model, found, card)
    if weights_id == "random-init":
        log.warning("%s: RANDOM INIT, no pretrained weights loaded", key)
    model.eval()
    return Backbone(model, card, weights_id, source)


def backbone_identity(key: str, weights: str | Path | None = None, pretrained: bool = True) -> str | None:
    """The ``weights_id`` that ``create_backbone`` would give, without building the model or loading weights.

    A warm run needs only this (with the card) to find its cached embeddings. ``None`` when it cannot be
    known without building (weights to be downloaded, a loader without a path): then build.
    """
    card = get_card(key)
    try:
        if weights is not None:
            from mitobench.models.weights import _weight_files, weights_digest

            return weights_digest(_weight_files(Path(weights).expanduser(), card)[0])
        if pretrained and card.weights_loader is not None:
            if card.weights_path is None:
                return None
            from mitobench.io import sha256_file

            return sha256_file(Path(card.weights_path()))[:16]
        if pretrained and card.hf_repo is not None:
            from mitobench.models.weights import _weight_files, resolve_weights, weights_digest

            found = resolve_weights(card, allow_download=False)
            return None if found is None else weights_digest(_weight_files(found, card)[0])
    except MitobenchError:
        return None  # the build reports it properly
    return "random-init"


def replace_card(card: ModelCard, **changes: Any) -> ModelCard:
    return dataclasses.replace(card, **changes)
