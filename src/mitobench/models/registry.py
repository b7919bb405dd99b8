"""A timm-style registry of model cards and ``create_backbone``.

The cards (``mitobench.models.cards``) say everything needed to build a backbone offline and to
reproduce its authors' feature recipe; this module builds them. Adding a foundation model means adding
one card (see ``mitobench.models.zoo``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mitobench.errors import MitobenchError
from mitobench.models.cards import (  # noqa: F401  (re-exported: the registry's public names)
    IMAGENET_MEAN, IMAGENET_STD, RANDOM_INIT, ModelCard, backbone_identity, get_card, list_cards, register, replace_card,
)
from mitobench.models.lazy import resolve_lazy

log = logging.getLogger(__name__)


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
        return self.weights_id != RANDOM_INIT

    @property
    def embed_dim(self) -> int:
        if self.card.embed_dim:
            return self.card.embed_dim
        return int(getattr(self.model, "num_features", 0)) * (2 if self.card.embedding == "cls+mean" else 1)

    def preprocess(self, patches: torch.Tensor, size: int | None = None, card_crop: bool = True) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` or float ``(B, 3, H, W)`` in [0, 1] -> normalised model input.

        Batched tensor version of the card's Resize(resize) + CenterCrop(input_size) + Normalize (Resize as
        torchvision's: the shorter side, the aspect kept). ``card_crop=False``: the whole patch resized (bilinear) to
        ``size``, as the training engine's augmentation sees it.
        """
        x = patches
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).float().div_(255)
        size = size or self.card.input_size
        resize = self.card.resize if (card_crop and self.card.resize and size == self.card.input_size) else size
        h, w = x.shape[-2:]
        if h != w or h != resize:  # the shorter side to ``resize``, the aspect kept (a patch is square)
            shape = (resize, resize) if h == w else (max(resize, round(h * resize / min(h, w))),
                                                     max(resize, round(w * resize / min(h, w))))
            mode = "bicubic" if card_crop and self.card.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=shape, mode=mode, align_corners=False, antialias=True)
            if mode == "bicubic":
                x = x.clamp_(0, 1)
        h, w = x.shape[-2:]
        if h != size or w != size:
            top, left = (h - size) // 2, (w - size) // 2
            x = x[..., top:top + size, left:left + size]
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


def build_model(card: ModelCard, num_classes: int = 0, drop_path: float = 0.0) -> nn.Module:
    """The card's architecture with random weights, offline. ``drop_path``: stochastic depth (training)."""
    kwargs = {k: resolve_lazy(v) for k, v in card.build_kwargs.items()}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if card.builder is not None:
        return card.builder(**kwargs)
    import timm

    kwargs["num_classes"] = num_classes
    return timm.create_model(card.arch, pretrained=False, **kwargs)


def build_architecture(card: ModelCard, drop_path: float = 0.0) -> nn.Module:
    """``build_model``, with a model that takes no stochastic-depth rate named as such."""
    try:
        return build_model(card, drop_path=drop_path)
    except TypeError as exc:
        if not drop_path:
            raise
        raise MitobenchError(f"model {card.key!r} does not take a stochastic-depth rate (train.drop_path={drop_path}): "
                             "set train.drop_path to 0 for this model") from exc


def create_backbone(key: str, weights: str | Path | None = None, pretrained: bool = True,
                    allow_download: bool = False, drop_path: float = 0.0) -> Backbone:
    """Build ``key`` and load its weights.

    Order: ``weights`` (a file or a Hugging Face snapshot folder) -> weights shipped by a package ->
    the zoo's resolution (user mapping, HF cache, download when allowed). Without weights the model
    is random init, and ``Backbone.pretrained`` says so.
    """
    card = get_card(key)
    model = build_architecture(card, drop_path)
    weights_id, source = RANDOM_INIT, "random init (no weights file given)"
    if weights is not None:
        from mitobench.models.weights import load_weights_strict

        weights_id, source = load_weights_strict(model, Path(weights), card)
    elif pretrained and card.weights_loader is not None:
        path = card.weights_loader(model)
        from mitobench.io import sha256_file

        weights_id, source = sha256_file(path)[:16], f"package weights {path}"
    elif pretrained:  # the user's mapping file ($MITOBENCH_WEIGHTS), then the HF cache / download where a repo
        from mitobench.models.weights import resolve_weights, load_weights_strict

        found = resolve_weights(card, allow_download=allow_download)
        if found is not None:
            weights_id, source = load_weights_strict(model, found, card)
    if weights_id == RANDOM_INIT:
        log.warning("%s: RANDOM INIT, no pretrained weights loaded", key)
    model.eval()
    return Backbone(model, card, weights_id, source)
