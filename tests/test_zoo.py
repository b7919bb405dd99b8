"""The model zoo: every card builds at its real architecture (meta device) and as a depth-reduced
replica (real numbers, same code path), with the documented embedding dim, register offsets and
LoRA targets; transformers checkpoints convert exactly. Offline, CPU, a few seconds each."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from mitobench.errors import MitobenchError
from mitobench.models.registry import Backbone, build_model, get_card, list_cards, replace_card
from mitobench.models.weights import check_weights_fit, load_weights_strict

MY_KEYS = ["uni", "uni2_h", "virchow", "virchow2", "hoptimus0", "hoptimus1", "prov_gigapath", "h0_mini", "phikon",
           "phikon_v2", "kaiko_vits16", "kaiko_vitb16", "kaiko_vitl14", "lunit_vits8", "lunit_vits16", "gpfm",
           "hibou_b", "midnight_12k", "conch_v1", "efficientnetv2_m", "swin_base_patch4_window7_224",
           "vit_large_patch16_224", "efficientnet_lite1", "efficientnet_lite2"]
VIT_KEYS = [k for k in MY_KEYS if get_card(k).lora_target and "blocks\\.\\d+\\.(?:attn" in get_card(k).lora_target
            and not k.startswith("swin")]
PREFIX_TOKENS = {"uni": 1, "uni2_h": 9, "virchow": 1, "virchow2": 5, "hoptimus0": 5, "hoptimus1": 5,
                 "prov_gigapath": 1, "h0_mini": 5, "phikon": 1, "phikon_v2": 1, "kaiko_vits16": 1, "kaiko_vitb16": 1,
                 "kaiko_vitl14": 5, "lunit_vits8": 1, "lunit_vits16": 1, "gpfm": 1, "hibou_b": 5, "midnight_12k": 1,
                 "conch_v1": 1, "vit_large_patch16_224": 1}


def meta_model(card) -> nn.Module:
    with torch.device("meta"):
        return build_model(card)


def replica(card, depth: int = 2):
    """The card with fewer blocks: same block type, registers, SwiGLU, LayerScale and token layout."""
    if card.arch.startswith("swin"):
        return replace_card(card, build_kwargs={**card.build_kwargs, "depths": (1, 1, 1, 1)})
    if card.arch.startswith(("vit_", "deit")):
        return replace_card(card, build_kwargs={**card.build_kwargs, "depth": depth})
    return card


def patch(seed: int = 0, size: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, size, size, 3), dtype=torch.uint8, generator=g)


def test_all_entries_registered():
    keys = {c.key for c in list_cards()}
    assert set(MY_KEYS) <= keys
    assert "efficientnet_lite0" in keys


@pytest.mark.parametrize("key", [*MY_KEYS, "efficientnet_lite0"])
def test_real_architecture_on_meta(key):
    """Full size, no memory: parameter count of the sheet, documented dim, register offsets."""
    card = get_card(key)
    model = meta_model(card)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert n == pytest.approx(card.params_m, rel=0.01), f"{key}: {n:.1f}M params, card says {card.params_m}M"
    out = Backbone(model, card, "random-init", "meta").forward_features(
        torch.empty(2, 3, card.input_size, card.input_size, device="meta"))
    assert tuple(out.shape) == (2, card.embed_dim)
    if key in PREFIX_TOKENS:
        assert model.num_prefix_tokens == PREFIX_TOKENS[key]
    assert card.embedding in ("pooled", "cls", "cls+mean")
    assert card.license and card.family


@pytest.mark.parametrize("key", MY_KEYS)
def test_replica_embeds_real_patch(key):
    card = replica(get_card(key))
    backbone = Backbone(build_model(card).eval(), card, "random-init", "test")
    with torch.inference_mode():
        x = backbone.preprocess(patch())
        assert tuple(x.shape) == (1, 3, card.input_size, card.input_size)
        emb = backbone(x)
    assert tuple(emb.shape) == (1, card.embed_dim)
    assert torch.isfinite(emb).all()


@pytest.mark.parametrize("key,skip", [("virchow2", 5), ("uni2_h", 9), ("hoptimus0", 5), ("virchow", 1),
                                      ("midnight_12k", 1)])
def test_register_offsets(key, skip):
    card = replica(get_card(key), depth=1)
    model = build_model(card).eval()
    assert model.num_prefix_tokens == skip
    assert model.num_reg_tokens == skip - 1
    backbone = Backbone(model, card, "random-init", "test")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        tokens = model.forward_features(x)
        emb = backbone(x)
    assert tokens.shape[1] == skip + 256
    if card.embedding == "cls+mean":
        want = torch.cat([tokens[:, 0], tokens[:, skip:].mean(1)], -1)
        torch.testing.assert_close(emb, want)
        if skip > 1:  # registers really are skipped
            assert not torch.allclose(emb, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1))
    else:
        torch.testing.assert_close(emb, tokens[:, 0])


def _intended(model: nn.Module, swin: bool) -> set[str]:
    block = r"layers\.\d+\.blocks\.\d+\." if swin else r"blocks\.\d+\."
    rx = re.compile(block + r"(attn\.(qkv|proj)|mlp\.(fc1|fc2))")
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and rx.fullmatch(n)}


@pytest.mark.parametrize("key", [k for k in MY_KEYS if get_card(k).lora_target and "efficientnet" not in k]
                         + ["timm/vit_small_patch16_224", "timm/swin_tiny_patch4_window7_224"])  # any timm ViT / Swin
def test_lora_regex_matches_exactly_the_block_linears(key):
    card = get_card(key)
    model = meta_model(card)
    regex = re.compile(card.lora_target)
    hit = {n for n, _ in model.named_modules() if regex.fullmatch(n)}
    swin = "swin" in key
    intended = _intended(model, swin=swin)
    depth = sum(len(s.blocks) for s in model.layers) if swin else len(model.blocks)
    assert len(intended) == 4 * depth
    assert hit == intended
    assert "patch_embed.proj" not in hit
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in hit)
    wrapped = {n for n, _ in Backbone(model, card, "random-init", "x").named_modules() if regex.fullmatch(n)}
    assert wrapped == {f"model.{n}" for n in intended}


def test_peft_targets_with_card_regex():
    peft = pytest.importorskip("peft")
    card = replica(get_card("lunit_vits16"))
    model = build_model(card)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=4, target_modules=card.lora_target))
    names = {n.removeprefix("base_model.model.") for n in lora.targeted_module_names}
    assert names == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


def test_efficientnetv2_m_is_random_init_as_the_paper():
    card = get_card("efficientnetv2_m")
    assert card.hf_repo is None and card.weights_loader is None


# ------------------------------------------------------------------------- transformers checkpoints
HF_CASES = {
    # key: (transformers config, timm replica overrides, input px)
    "phikon": ({"model_type": "vit", "hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 384, "image_size": 64, "patch_size": 16, "qkv_bias": True,
                "layer_norm_eps": 1e-12}, {"embed_dim": 96, "num_heads": 4, "img_size": 64}, 64),
    "phikon_v2": ({"model_type": "dinov2", "hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "mlp_ratio": 4, "image_size": 64, "patch_size": 16, "use_swiglu_ffn": False, "layerscale_value": 0.5},
                  {"embed_dim": 96, "num_heads": 4, "img_size": 64}, 64),
    # trained at a larger size than evaluated: transformers interpolates pos_embed at run time,
    # mitobench once at load time; the numbers must agree
    "midnight_12k": ({"model_type": "dinov2", "hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "mlp_ratio": 4, "image_size": 98, "patch_size": 14, "use_swiglu_ffn": True,
                      "layerscale_value": 0.5},
                     {"embed_dim": 96, "num_heads": 4, "img_size": 56, "patch_size": 14, "mlp_ratio": 512 / 96}, 56),
    "hibou_b": ({"model_type": "dinov2_with_registers", "hidden_size": 96, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "mlp_ratio": 4, "image_size": 56, "patch_size": 14, "use_swiglu_ffn": True,
                 "num_register_tokens": 4, "layerscale_value": 0.5},
                {"embed_dim": 96, "num_heads": 4, "img_size": 56, "mlp_ratio": 512 / 96}, 56),
    # with registers, transformers resamples its position grid with antialiasing (without registers, without)
    "hibou_b@98px": ({"model_type": "dinov2_with_registers", "hidden_size": 96, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "mlp_ratio": 4, "image_size": 98, "patch_size": 14,
                      "use_swiglu_ffn": True, "num_register_tokens": 4, "layerscale_value": 0.5},
                     {"embed_dim": 96, "num_heads": 4, "img_size": 56, "mlp_ratio": 512 / 96}, 56),
}


@pytest.mark.parametrize("key", list(HF_CASES))
def test_transformers_checkpoint_converts_exactly(key, tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from mitobench.models.hf_builders import build_transformers_reference

    config, overrides, px = HF_CASES[key]
    torch.manual_seed(0)
    ref = build_transformers_reference(config)
    with torch.no_grad():  # non-trivial values everywhere (transformers inits some to zero/one)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    snap = tmp_path / "snapshot"
    snap.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps(config))
    card = get_card(key.split("@")[0])
    card = replace_card(card, build_kwargs={**card.build_kwargs, "depth": 2, **overrides})
    model = build_model(card).eval()
    assert check_weights_fit(snap, card)  # the conversion and resampling, on meta tensors
    load_weights_strict(model, snap, card)
    x = torch.randn(2, 3, px, px)
    with torch.inference_mode():
        want = ref(pixel_values=x).last_hidden_state
        got = model.forward_features(x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    emb = Backbone(model, card, "x", "x")(x)
    assert emb.shape[1] == (2 if card.embedding == "cls+mean" else 1) * 96


def test_transformers_config_conflict_is_caught(tmp_path):
    """A [U] fact wrong for the checkpoint (here the number of heads, invisible to a strict load) raises."""
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from mitobench.models.hf_builders import build_transformers_reference

    config, overrides, _ = HF_CASES["phikon_v2"]
    ref = build_transformers_reference(config)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_attention_heads": 8}))
    card = get_card("phikon_v2")
    card = replace_card(card, build_kwargs={**card.build_kwargs, "depth": 2, **overrides})
    with pytest.raises(MitobenchError, match="num_heads: config.json says 8, the card builds 4"):
        load_weights_strict(build_model(card), tmp_path, card)
    with pytest.raises(MitobenchError, match="num_heads: config.json says 8, the card builds 4"):
        check_weights_fit(tmp_path, card)


@pytest.mark.parametrize("key", ["swin_base_patch4_window7_224", "vit_large_patch16_224"])
def test_written_out_timm_configs_match_timm(key):
    """The baselines' preprocessing is written into the zoo (no timm import when cards are read): it must
    stay what timm's pretrained config says."""
    import timm

    from mitobench.models.zoo import TIMM_IMAGENET

    cfg, ours = timm.models.get_pretrained_cfg(key), TIMM_IMAGENET[key]
    assert (ours["input_size"], ours["crop_pct"], ours["interpolation"]) == (cfg.input_size[-1], cfg.crop_pct, cfg.interpolation)
    assert tuple(ours["mean"]) == tuple(cfg.mean) and tuple(ours["std"]) == tuple(cfg.std)
    assert ours["hf_repo"] == cfg.hf_hub_id and ours["license"] == cfg.license


def test_reading_cards_does_not_import_timm_or_torch():
    """A warm run only reads cards; importing timm (and torchvision) costs seconds, so it waits for a build."""
    import subprocess
    import sys

    code = ("import sys; from mitobench.models import get_card, list_cards; list_cards(); "
            "get_card('virchow2'); import mitobench.protocol, mitobench.methods.probe, mitobench.embed, mitobench.device; "
            "from mitobench.models.cards import backbone_identity; backbone_identity('efficientnet_lite0'); "
            "print('timm' in sys.modules, 'torchvision' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_lazy_swiglu_builds_timm_layer():
    from timm.layers import SwiGLUPacked

    card = replace_card(get_card("virchow2"), build_kwargs={**get_card("virchow2").build_kwargs, "depth": 1})
    model = build_model(card)
    assert repr(card.build_kwargs["mlp_layer"]) == repr(SwiGLUPacked)
    assert type(model.blocks[0].mlp).__name__ == "GluMlp"


def test_lazy_build_arguments_have_the_real_objects_repr():
    """Cache keys hold repr() of the build arguments: the stand-ins must not change a key."""
    from functools import partial

    from torch import nn

    from mitobench.models.lazy import Lazy, resolve_lazy
    from mitobench.models.zoo import LAYERNORM_EPS12, SILU

    assert repr(SILU) == repr(nn.SiLU) and resolve_lazy(SILU) is nn.SiLU
    real = partial(nn.LayerNorm, eps=1e-12)
    assert repr(LAYERNORM_EPS12) == repr(real) == repr(resolve_lazy(LAYERNORM_EPS12))
    assert LAYERNORM_EPS12(8).eps == 1e-12
    assert resolve_lazy(3) == 3 and isinstance(SILU, Lazy)
    model = build_model(replace_card(get_card("phikon"), build_kwargs={**get_card("phikon").build_kwargs, "depth": 1}))
    assert model.blocks[0].norm1.eps == 1e-12


@pytest.mark.parametrize("name, expected", [("flexivit_small", "vit"), ("tiny_vit_5m_224", "vit"), ("fastvit_t8", "vit"),
                                            ("swin_tiny_patch4_window7_224", "swin"), ("levit_128", None),
                                            ("mobilevit_xxs", None), ("resnet10t", None)])
def test_timm_cards_get_a_lora_regex_only_where_peft_can_adapt_what_it_matches(name, expected):
    """Judged on the built model, not the name: LeViT's matching layers are LinearNorm blocks peft rejects."""
    from mitobench.models.cards import SWIN_LORA, VIT_LORA

    assert get_card(f"timm/{name}").lora_target == {"vit": VIT_LORA, "swin": SWIN_LORA, None: None}[expected]
