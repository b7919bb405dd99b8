"""train.precision: bf16 autocast on the CPU, with depthwise convolutions on the fast backward path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mitobench.errors import MitobenchError
from mitobench.methods.engine import Classifier
from mitobench.methods import precision as precision_mod
from mitobench.methods.precision import autocast, autocast_dtype, fast_depthwise, prepare_model, resolve_precision
from mitobench.models.registry import create_backbone
from test_engine import fit_fold, make_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("name,device,expected", [("auto", CPU, None), ("auto", CUDA, torch.bfloat16), ("fp32", CPU, None),
                                                  ("fp32", CUDA, None), ("bf16", CPU, torch.bfloat16),
                                                  ("bf16", CUDA, torch.bfloat16)])
def test_autocast_dtype_follows_the_setting(name, device, expected):
    assert autocast_dtype(name, device) == expected


@pytest.mark.parametrize("name,enabled", [("auto", False), ("fp32", False), ("bf16", True)])
def test_autocast_context_on_the_cpu(name, enabled):
    with autocast(name, CPU):
        assert torch.is_autocast_enabled("cpu") is enabled
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if enabled else torch.float32)


@pytest.mark.parametrize("native_cpu", [True, False])
def test_native_is_bf16_only_where_the_device_has_it(monkeypatch, native_cpu):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: native_cpu)
    assert resolve_precision("native", CUDA) == "bf16"
    assert resolve_precision("native", CPU) == ("bf16" if native_cpu else "fp32")
    assert autocast_dtype("native", CPU) == (torch.bfloat16 if native_cpu else None)
    assert [resolve_precision(name, CPU) for name in ("auto", "fp32", "bf16")] == ["auto", "fp32", "bf16"]


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_an_avx512_cpu_without_bf16_units_is_not_native(monkeypatch, avx512_bf16, amx, expected):
    """oneDNN says bf16 is supported on any AVX-512 CPU (it emulates it there): native needs AVX512-BF16 or AMX."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(precision_mod.platform, "machine", lambda: "x86_64")
    assert precision_mod.cpu_has_native_bf16() is expected
    monkeypatch.setattr(precision_mod.platform, "machine", lambda: "aarch64")  # Arm: oneDNN's check is the answer
    assert precision_mod.cpu_has_native_bf16() is True


def test_unknown_precision_is_a_clear_error(fixture_root, tmp_path):
    with pytest.raises(MitobenchError, match="train.precision 'fp16'.*auto.*fp32.*bf16"):
        make_config(fixture_root, tmp_path, train={"precision": "fp16"})


def test_depthwise_convolutions_take_the_fast_path_under_cpu_autocast():
    model = Classifier(create_backbone("efficientnet_lite0")).eval()
    names = list(model.state_dict())
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert fast_depthwise(model) == len(depthwise) == 16
    assert fast_depthwise(model) == 16  # idempotent
    assert list(model.state_dict()) == names  # checkpoints are unchanged
    conv = depthwise[3]
    x = torch.randn(2, conv.in_channels, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    expected = F.conv2d(x.bfloat16(), conv.weight.bfloat16(), None, conv.stride, conv.padding, 1, conv.groups)
    assert torch.equal(out, expected)  # the same bf16 convolution autocast would run
    assert out.grad_fn.name().endswith("_DepthwiseConv2dBackward")
    out.float().sum().backward()
    assert x.grad is not None and conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32
    plain = conv.forward(x)  # outside autocast: the ordinary float32 convolution
    assert plain.dtype == torch.float32
    assert torch.equal(plain, F.conv2d(x, conv.weight, None, conv.stride, conv.padding, 1, conv.groups))
    twin = copy.deepcopy(model)  # EMA copies the model: the copy keeps the policy
    assert all(type(a) is type(b) for a, b in zip(model.modules(), twin.modules()))


def test_dynamic_padding_convolutions_are_left_alone():
    """A Conv2d subclass with its own forward (timm's "same" padding) keeps it."""
    from timm.layers import Conv2dSame

    model = torch.nn.Sequential(Conv2dSame(8, 8, 5, stride=2, groups=8), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8))
    assert fast_depthwise(model) == 1
    assert type(model[0]) is Conv2dSame


def test_activations_become_out_of_place_under_bf16_only():
    model = Classifier(create_backbone("efficientnet_lite0"))
    acts = [m for m in model.modules() if isinstance(m, torch.nn.ReLU6)]
    assert acts and all(a.inplace for a in acts)
    prepare_model(model, "fp32", CPU)
    assert all(a.inplace for a in acts)
    prepare_model(model, "bf16", CPU)
    assert not any(a.inplace for a in acts)


def test_policy_applies_only_to_cpu_autocast():
    model = Classifier(create_backbone("efficientnet_lite0"))
    classes = [type(m) for m in model.modules()]
    prepare_model(model, "auto", CPU)
    prepare_model(model, "fp32", CPU)
    assert [type(m) for m in model.modules()] == classes
    prepare_model(model, "bf16", CPU)
    assert [type(m) for m in model.modules()] != classes


def test_bf16_fold_trains_and_predicts_close_to_float32(fixture_root, tmp_path):
    """A bf16 fold follows the float32 one closely (same seed): same shapes, finite, probabilities within bf16 noise."""
    results = {}
    for precision in ("fp32", "bf16"):
        scratch = tmp_path / precision
        config = make_config(fixture_root, tmp_path, train={"epochs": 1, "img_size": 32, "precision": precision})
        method, ctx, va, result = fit_fold(config, scratch)
        results[precision] = result
    for name, p32 in results["fp32"].probs.items():
        p16 = results["bf16"].probs[name]
        assert p16.shape == p32.shape and np.isfinite(p16).all()
        assert np.abs(p16 - p32).max() < 0.1  # one epoch of bf16 arithmetic, not another model
        assert not np.array_equal(p16, p32)  # bf16 really ran


def test_explicit_attention_under_cpu_autocast_only():
    """Under CPU bf16 autocast timm's attention takes its explicit (matrix-product) form: the same function."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=1).eval()
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(attention) == 2 and all(m.fused_attn for m in attention)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x)
    keys = list(model.state_dict())
    prepare_model(model, "fp32", CPU)
    prepare_model(model, "auto", CUDA)  # CUDA autocast: flash attention stays (only casts; nothing moves)
    model.float()
    assert all(m.fused_attn for m in attention)
    prepare_model(model, "bf16", CPU)
    assert not any(m.fused_attn for m in attention) and list(model.state_dict()) == keys
    assert precision_mod.explicit_attention(model) == 0  # idempotent
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        explicit = model(x)
    torch.testing.assert_close(explicit.float(), fused.float(), rtol=2e-2, atol=2e-2)


# -- frozen weights in the autocast dtype (CUDA training, e.g. LoRA) ----------------------------------

def test_frozen_weights_in_bf16_give_the_same_autocast_outputs():
    """Autocast casts a Linear's or a convolution's weight to bf16 at every use: storing the frozen ones in bf16
    changes no value, while trainable layers and norms stay float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LayerNorm(8 * 6 * 6),
                                torch.nn.Linear(8 * 6 * 6, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    for p in [*model[0].parameters(), *model[2].parameters(), *model[3].parameters()]:
        p.requires_grad_(False)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)
    assert precision_mod.cast_frozen_weights(model, torch.bfloat16) == 2
    assert model[0].weight.dtype == model[3].bias.dtype == torch.bfloat16
    assert model[2].weight.dtype == model[5].weight.dtype == torch.float32  # a norm; a trainable layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(x)
    assert torch.equal(before, after)
    assert precision_mod.cast_frozen_weights(model, torch.bfloat16) == 0  # idempotent


def test_prepare_model_casts_frozen_weights_only_for_cuda_autocast():
    layer = torch.nn.Linear(4, 4).requires_grad_(False)
    prepare_model(layer, "auto", CPU)
    assert layer.weight.dtype == torch.float32
    prepare_model(layer, "fp32", CUDA)
    assert layer.weight.dtype == torch.float32
    prepare_model(layer, "auto", CUDA)  # only casts; nothing is moved to the GPU here
    assert layer.weight.dtype == torch.bfloat16


def test_finetune_checkpoint_is_float32_when_frozen_weights_were_bf16(tmp_path):
    from safetensors.torch import load_file

    from mitobench.methods import finetune

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    precision_mod.cast_frozen_weights(model, torch.bfloat16)
    held = model[0].weight.detach().clone()
    state = load_file(str(finetune.save(model, tmp_path)))
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert torch.equal(state["0.weight"], held.float())
