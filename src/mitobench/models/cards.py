"""Model cards: the registry's data, readable without importing torch or timm.

A card says everything needed to build a backbone offline and to reproduce its authors' feature
recipe: architecture and build kwargs, normalisation, resize/crop, embedding recipe, weights source,
licence and the LoRA target regex. Adding a foundation model means adding one card
(see ``mitobench.models.zoo``). A warm run reads only cards (its embeddings are cached), so this
module imports neither torch nor timm; ``mitobench.models.registry`` builds the models.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mitobench.errors import MitobenchError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"  # the weights id of a backbone built without pretrained weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# LoRA targets (peft target_modules regex): attention qkv/proj and MLP fc1/fc2 of the transformer blocks only,
# as the paper; never the patch embedding's `proj` convolution or a head.
VIT_LORA = r"^(?:.*\.)?blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))$"
SWIN_LORA = r"^(?:.*\.)?layers\.\d+\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))$"

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
    builder: "Callable[..., nn.Module] | None" = None  # non-timm architectures
    weights_loader: "Callable[[nn.Module], Path | str] | None" = None  # weights shipped by a package
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


@functools.lru_cache(maxsize=64)
def timm_lora_target(name: str) -> str | None:
    """The ViT or Swin LoRA regex where it fits timm model ``name``: it matches at least one of the model's layers and
    only layers peft can adapt (Linear, Conv2d), judged on the model built on the meta device (no memory, no weights).
    None otherwise (CNNs; LeViT, whose matching layers peft rejects; mobilevit, whose names do not match): LoRA on
    such a model then asks for ``train.lora_targets`` before any run folder exists."""
    import re

    import timm
    import torch
    from torch import nn

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: judge by its name
        return VIT_LORA if name.startswith(("vit_", "deit", "eva", "beit")) else SWIN_LORA if name.startswith("swin") else None
    for regex in (SWIN_LORA, VIT_LORA) if "swin" in name else (VIT_LORA, SWIN_LORA):
        matched = [m for key, m in model.named_modules() if re.fullmatch(regex, key)]
        if matched and all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in matched):
            return regex
    return None


def get_card(key: str) -> ModelCard:
    """The card for ``key``; ``timm/<name>`` makes a card for any timm model on the fly."""
    _ensure_zoo()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key.startswith("timm/"):
        import timm

        from mitobench.models.zoo import drop_head

        name = key.split("/", 1)[1]
        if not timm.is_model(name):
            raise MitobenchError(f"unknown timm model {name!r}. `python -c \"import timm; print(timm.list_models('*{name[:6]}*'))\"` lists close names.")
        cfg = timm.models.get_pretrained_cfg(name)
        size = int(cfg.input_size[-1]) if cfg is not None else 224
        return ModelCard(key=key, family="timm", arch=name, build_kwargs={"num_classes": 0}, input_size=size,
                         interpolation=getattr(cfg, "interpolation", "bilinear") or "bilinear",
                         mean=tuple(getattr(cfg, "mean", IMAGENET_MEAN)), std=tuple(getattr(cfg, "std", IMAGENET_STD)),
                         embedding="pooled", lora_target=timm_lora_target(name),
                         state_dict_filter=drop_head,  # a timm/ImageNet checkpoint carries its classifier
                         description=f"any timm model ({name})")
    close = [k for k in _REGISTRY if key.lower()[:3] in k.lower()][:8]
    raise MitobenchError(f"unknown model {key!r}. Known keys: {sorted(_REGISTRY)}{' (close: ' + str(close) + ')' if close else ''}; "
                         "any timm model works as 'timm/<name>'. `mitobench models list` shows them all.")


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
        if pretrained:  # the mapping file for any card; the HF cache where the card has a repo
            from mitobench.models.weights import _weight_files, resolve_weights, weights_digest

            found = resolve_weights(card, allow_download=False)
            if found is not None:
                return weights_digest(_weight_files(found, card)[0])
            return None if card.hf_repo is not None else RANDOM_INIT  # no repo, nothing mapped: random init
    except (MitobenchError, OSError):
        return None  # the build reports it properly
    return RANDOM_INIT


def replace_card(card: ModelCard, **changes: Any) -> ModelCard:
    return dataclasses.replace(card, **changes)
