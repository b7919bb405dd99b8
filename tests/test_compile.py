"""train.compile: regional (block by block), in place, so checkpoints keep their keys."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from safetensors.torch import load_file

from mitobench.methods.compile import compile_model, repeated_blocks
from test_engine import TINY_VIT, fit_fold, make_config, tiny_vit_card  # noqa: F401 (a fixture)


@pytest.mark.parametrize("arch,kwargs,n_blocks,block_class", [
    ("vit_tiny_patch16_224", {"depth": 3}, 3, "Block"),
    ("swin_tiny_patch4_window7_224", {}, 12, "SwinTransformerBlock"),  # the blocks inside layers.N, not the stages
    ("convnext_atto", {}, 12, "ConvNeXtBlock"),
    ("resnet18", {}, 0, None),  # no repeated-block container: the whole model is compiled
])
def test_repeated_blocks_finds_the_innermost_repeated_blocks(arch, kwargs, n_blocks, block_class):
    blocks = repeated_blocks(timm.create_model(arch, pretrained=False, **kwargs))
    assert len(blocks) == n_blocks
    assert {type(b).__name__ for b in blocks} == ({block_class} if block_class else set())


def test_compile_in_place_keeps_keys_and_values():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=1).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        assert compile_model(model) == 2
        compiled = model(x)
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefix: checkpoints and resume see the same names
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


class _Widening(nn.Module):
    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.fc = nn.Linear(width_in, width_out)

    def forward(self, x):
        return torch.relu(self.fc(x))


def test_every_distinct_block_stays_compiled_in_training_and_evaluation(monkeypatch):
    """Blocks of one class that differ (Swin-B's stage widths and shifted windows, a CNN's stages) are each a cache
    entry of the one shared code object, in training and again under inference_mode: 10 distinct blocks need 20,
    and past dynamo's default limit of 8 the rest would silently run eagerly (Swin-B: 16 of its 24 blocks)."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend="eager"))  # same guards, no codegen
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=8):  # the default, whatever an earlier test set; restored after
        model = nn.Module()
        model.blocks = nn.Sequential(*[_Widening(4 + i, 5 + i) for i in range(10)])
        assert compile_model(model) == 10
        model.blocks(torch.randn(2, 4)).sum().backward()
        with torch.inference_mode():
            model.blocks(torch.randn(2, 4))
        assert counters["stats"]["unique_graphs"] == 20  # every block compiled, in training and in evaluation
    torch._dynamo.reset()


def test_lora_with_compile_saves_adapters_and_head(fixture_root, tmp_path, tiny_vit_card):  # noqa: F811
    config = make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT,
                         train={"img_size": 32, "epochs": 1, "augment": "none", "compile": True})
    method, _, va, result = fit_fold(config, tmp_path / "scratch")
    keys = load_file(str(tmp_path / "scratch" / "adapter_and_head.safetensors")).keys()
    assert "head.weight" in keys and any(".lora_A." in k for k in keys)
    assert all(("lora_" in k or k.startswith("head.")) and "_orig_mod" not in k for k in keys)
    assert len(result.probs["validation"]) == len(va)
