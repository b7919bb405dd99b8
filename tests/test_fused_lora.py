"""train.fused_lora: the fused LoRA Linear gives peft's values and gradients, with the same dropout mask."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from mitobench.methods.fused_lora import LoraLinearFunction, _dropout, fuse_lora_layers
from test_engine import TINY_VIT, make_config, tiny_vit_card  # noqa: F401 (a fixture)


class FusedDraw(nn.Module):
    """The fused layer's CPU dropout draw as a module, so that peft's forward sees the fused layer's mask (on CUDA
    both use ``F.dropout``'s own draw)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(x, self.p)[0] if self.training else x


def peft_pair(in_features: int, out_features: int, bias: bool, dropout: float,
              device: str = "cpu") -> tuple[nn.Module, nn.Module]:
    """The same peft-adapted two-layer model twice: as peft computes it, and fused. B is non-zero (peft starts it
    at zero, which would hide any error in the adapter's path)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=bias), nn.GELU(),
                          nn.Linear(out_features, in_features, bias=bias))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"])
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:
            nn.init.normal_(p)
    for module in model.modules():  # as methods/lora.py prepares the layers: no float32 cast of the adapter's input
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    fused = copy.deepcopy(model)
    assert fuse_lora_layers(fused) == 2
    if device == "cpu" and dropout > 0:
        for layer in (model[0], model[2]):
            layer.lora_dropout["default"] = FusedDraw(dropout)
    return model.to(device), fused.to(device)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def step(model: nn.Module, x: torch.Tensor, seed: int = 1, autocast: bool = False):
    """Output and gradients (input, adapters) of one forward/backward pass on ``x``'s device."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=x.device)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, x.grad, grads


@pytest.mark.parametrize("in_features,out_features", [(12, 40), (40, 12)])  # concatenated product / in-place add
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_matches_peft_in_float32(in_features, out_features, bias, dropout, device):
    model, fused = peft_pair(in_features, out_features, bias, dropout, device)
    x = torch.randn(3, 7, in_features, device=device)
    out, grad_x, grads = step(model.train(), x)
    f_out, f_grad_x, f_grads = step(fused.train(), x)
    torch.testing.assert_close(f_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_grad_x, grad_x, rtol=1e-5, atol=1e-5)
    assert grads.keys() == f_grads.keys() and len(grads) == 4
    for name in grads:
        assert grads[name].abs().sum() > 0
        torch.testing.assert_close(f_grads[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.05])
def test_cpu_dropout_draw_keeps_one_minus_p_and_rescales(p):
    torch.manual_seed(0)
    x = torch.full((401, 500), 2.0)  # an odd number of elements: the last draw's second half is unused
    dropped, mask = _dropout(x, p)
    keep = mask > 0
    assert mask.dtype == x.dtype and mask.shape == x.shape
    scale = mask[keep].unique()
    assert len(scale) == 1 and scale.item() == pytest.approx(1 / (1 - p), rel=1e-4)
    # each 32-bit draw gives two elements: both halves must keep 1 - p of their elements, independently
    flat = keep.flatten().float()
    for half in (flat[0::2], flat[1::2]):
        assert abs(half.mean().item() - (1 - p)) < 0.005
    pairs = flat[: flat.numel() // 2 * 2].view(-1, 2)
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item() - (1 - p) ** 2) < 0.005
    assert torch.equal(dropped, x * mask) and (dropped[~keep] == 0).all()
    assert abs(dropped.mean().item() - 2.0) < 0.02  # unbiased
    torch.manual_seed(0)
    assert torch.equal(_dropout(x, p)[1], mask)  # seeded


def test_dropout_is_live_seeded_and_off_in_evaluation():
    model, fused = peft_pair(12, 40, True, 0.5)
    x = torch.randn(4, 12)
    a, b = step(fused.train(), x, seed=1)[0], step(fused.train(), x, seed=2)[0]
    assert not torch.allclose(a, b)  # the dropout is live
    torch.testing.assert_close(step(model.train(), x, seed=2)[0], b, rtol=1e-5, atol=1e-5)
    # evaluation: no dropout, the same output whatever the seed
    torch.testing.assert_close(step(fused.eval(), x, seed=1)[0], step(fused.eval(), x, seed=2)[0])
    torch.testing.assert_close(step(fused.eval(), x)[0], step(model.eval(), x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)  # on CUDA: the fused dropout kernel's bool mask, as the engine trains
def test_fused_under_bf16_autocast_is_close_to_peft(device):
    model, fused = peft_pair(32, 96, True, 0.3, device)
    # on CUDA a bf16 input, as from a bf16 layer under autocast: peft then draws its mask over the same dtype (CUDA's
    # dropout kernel maps random numbers to elements differently for float32 and bf16 inputs)
    x = torch.randn(2, 5, 32, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    out, grad_x, grads = step(model.train(), x, autocast=True)
    f_out, f_grad_x, f_grads = step(fused.train(), x, autocast=True)
    assert f_out.dtype == out.dtype == torch.bfloat16
    # bf16 rounding: peft rounds B's output and the sum separately, the fused product accumulates in float32
    def close(a, b, msg=""):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-2 * b.abs().max().item(), msg=msg)

    close(f_out, out)
    close(f_grad_x, grad_x)
    for name in grads:
        assert f_grads[name].dtype == torch.float32  # the adapters stay float32 for the optimiser
        close(f_grads[name], grads[name], name)


def test_cases_outside_the_fast_path_run_pefts_forward():
    model, fused = peft_pair(12, 40, True, 0.0)
    x = torch.randn(4, 12)
    layer = fused[0]
    calls = []
    original = LoraLinearFunction.apply
    LoraLinearFunction.apply = lambda *a: calls.append(1) or original(*a)
    try:
        fused.eval()(x)
        assert len(calls) == 2
        layer.merge()  # merged weights: the base layer already holds the adapter
        torch.testing.assert_close(fused(x), model.eval()(x), rtol=1e-5, atol=1e-5)
        assert len(calls) == 3  # only the unmerged layer took the fused path
        layer.unmerge()
        layer.base_layer.weight.requires_grad_(True)  # a trainable base layer needs its own gradient
        fused(x)
        assert len(calls) == 4
        layer.base_layer.weight.requires_grad_(False)
        layer.lora_B["default"].bias = nn.Parameter(torch.ones(40))  # peft's lora_bias: peft's forward adds it
        with_bias = layer(x)
        assert len(calls) == 4
        layer.lora_B["default"].bias = None
        without = layer(x)
        assert len(calls) == 5
        torch.testing.assert_close(with_bias - without, torch.full_like(without, 2.0))  # scaling (8 / 4) x bias
    finally:
        LoraLinearFunction.apply = original


def test_fused_layers_with_dropout_trace_without_graph_breaks():
    """train.compile: the CPU mask draw (Tensor.random_) cannot be traced, so a traced layer draws with the
    compiler's own dropout; otherwise every adapted layer would split the compiled block."""
    import torch._dynamo

    _, fused = peft_pair(12, 40, bias=True, dropout=0.3)
    fused.train()
    explained = torch._dynamo.explain(fused)(torch.randn(3, 12))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()


def test_fusing_keeps_keys_and_is_idempotent():
    model, fused = peft_pair(12, 40, False, 0.1)
    assert list(fused.state_dict()) == list(model.state_dict())
    cls = type(fused[0])
    assert fuse_lora_layers(fused) == 2 and type(fused[0]) is cls  # a second call changes nothing
    assert cls.__bases__[1] is type(model[0])  # one subclass of peft's layer


def test_engine_lora_uses_the_fused_layers_unless_turned_off(fixture_root, tmp_path, tiny_vit_card):  # noqa: F811
    from mitobench.methods.engine import TrainMethod
    from mitobench.methods.fused_lora import _FusedLoraForward

    for fused in (True, False):
        method = TrainMethod(make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT,
                                         train={"img_size": 32, "fused_lora": fused}))
        method.device = torch.device("cpu")
        layers = [m for m in method._build().modules() if hasattr(m, "lora_A")]
        assert layers and all(isinstance(m, _FusedLoraForward) is fused for m in layers)


def test_gpu_benchmark_peft_forward_switch_restores_the_fused_layers(fixture_root, tmp_path, tiny_vit_card):  # noqa: F811
    """benchmarks/gpu_train.py times the engine with peft's forward too: same values, and the switch must undo."""
    from mitobench.methods.engine import TrainMethod
    from mitobench.methods.fused_lora import _FusedLoraForward
    from test_engine import load_benchmark_script

    gpu_train = load_benchmark_script("gpu_train")
    method = TrainMethod(make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT, train={"img_size": 32}))
    method.device = torch.device("cpu")
    model = method._build().eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    classes = [type(m) for m in model.modules()]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        with gpu_train.with_peft_forward(model) as n:
            assert n == 4 * 12 and not any(isinstance(m, _FusedLoraForward) for m in model.modules())
            peft_out = model(x)
    assert [type(m) for m in model.modules()] == classes
    torch.testing.assert_close(fused, peft_out, rtol=1e-5, atol=1e-5)


def test_engine_lora_fold_in_cpu_bf16(fixture_root, tmp_path, tiny_vit_card):  # noqa: F811
    """A LoRA fold under CPU bf16 autocast: fused layers, explicit attention, adapters saved in float32."""
    from safetensors.torch import load_file

    from test_engine import fit_fold

    config = make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT, device="cpu",
                         train={"img_size": 32, "epochs": 2, "augment": "none", "precision": "bf16"})
    method, _, va, result = fit_fold(config, tmp_path / "scratch")
    model = method._build()
    assert not any(getattr(m, "fused_attn", False) for m in model.modules())
    probs = result.probs["validation"]
    assert len(probs) == len(va) and ((probs >= 0) & (probs <= 1)).all() and len(set(probs.round(6))) > 1
    saved = load_file(str(tmp_path / "scratch" / "adapter_and_head.safetensors"))
    assert any(".lora_A." in k for k in saved) and {v.dtype for v in saved.values()} == {torch.float32}
