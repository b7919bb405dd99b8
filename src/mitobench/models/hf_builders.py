"""Hugging Face ``transformers`` checkpoints (Phikon, Phikon-v2, Hibou, Midnight) on timm architectures.

mitobench builds these models as timm ``VisionTransformer``s (one code path for every ViT: the same
embedding recipes, LoRA regex and fine-tuning), and converts the transformers checkpoint keys at load
time with :func:`convert_hf_vit_state_dict`. Both the Hub layout (``encoder.layer.N.attention.attention.query``,
``mlp.weights_in``) and the transformers 5 layout (``attention.q_proj``, ``mlp.gate_proj``) are handled.
The conversion is exact: the tests compare against transformers' own ``ViTModel`` / ``Dinov2Model`` /
``Dinov2WithRegistersModel`` when transformers is installed.

Mapping (timm <- transformers):
- ``cls_token`` <- ``embeddings.cls_token`` (plus ``position_embeddings[:, 0]`` folded in when the timm
  model keeps no position for prefix tokens, i.e. models with registers);
- ``pos_embed`` <- ``embeddings.position_embeddings`` (resampled to the built grid without antialias,
  as transformers' ``interpolate_pos_encoding`` does);
- ``reg_token`` <- ``embeddings.register_tokens``; ``patch_embed.proj`` <- ``embeddings.patch_embeddings.projection``;
- per block: ``attn.qkv`` <- cat(query, key, value); ``attn.proj`` <- attention output; ``mlp.fc1`` <-
  intermediate / fc1 / weights_in / cat(gate_proj, up_proj); ``mlp.fc2`` <- output / fc2 / weights_out /
  down_proj; ``ls1.gamma`` / ``ls2.gamma`` <- ``layer_scale{1,2}.lambda1``; ``norm1/2`` <- ``norm1/2`` or
  ``layernorm_before/after``;
- ``norm`` <- ``layernorm``; ``mask_token`` and the ViT ``pooler`` are dropped.

``transformers`` itself is optional (``pip install mitobench[hf]``); it is only needed for
:func:`build_transformers_reference`, which builds the authors' transformers model for cross-checks.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from mitobench.errors import MitobenchError

_LAYER = re.compile(r"^(?:encoder\.layer|encoder\.layers|layers)\.(\d+)\.(.+)$")
# (source prefix inside a layer, target); order matters: attention.output.dense before output.dense
_LAYER_RULES: tuple[tuple[str, str], ...] = (
    ("attention.attention.query.", "q."), ("attention.q_proj.", "q."), ("attention.query.", "q."),
    ("attention.attention.key.", "k."), ("attention.k_proj.", "k."), ("attention.key.", "k."),
    ("attention.attention.value.", "v."), ("attention.v_proj.", "v."), ("attention.value.", "v."),
    ("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),
    ("mlp.weights_in.", "mlp.fc1."), ("mlp.weights_out.", "mlp.fc2."), ("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2."),
    ("mlp.gate_proj.", "gate."), ("mlp.up_proj.", "up."), ("mlp.down_proj.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
    ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."), ("norm1.", "norm1."), ("norm2.", "norm2."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
)
_TOP_RULES = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.register_tokens": "reg_token",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HF_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.", "model.")


def is_hf_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state)


def convert_hf_vit_state_dict(state: dict[str, torch.Tensor], model: nn.Module,
                              notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """transformers ViT / DINOv2 (with or without registers) keys -> the timm ``model``'s keys."""
    notes = notes if notes is not None else []
    for prefix in _HF_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[int, str, str], torch.Tensor] = {}  # (layer, q|k|v|gate|up, weight|bias)
    dropped = []
    for key, value in state.items():
        if key in _TOP_RULES:
            out[_TOP_RULES[key]] = value
            continue
        if key == "embeddings.mask_token" or key.startswith("pooler."):
            dropped.append(key)
            continue
        m = _LAYER.match(key)
        if not m:
            out[key] = value  # unknown: the fit report will show it
            continue
        layer, rest = int(m.group(1)), m.group(2)
        for src, dst in _LAYER_RULES:
            if rest.startswith(src):
                tail = rest[len(src):]
                if dst in ("q.", "k.", "v.", "gate.", "up."):
                    parts[(layer, dst[:-1], tail)] = value
                else:
                    out[f"blocks.{layer}.{dst}{tail}"] = value
                break
        else:
            out[f"blocks.{layer}.{rest}"] = value
    for (layer, kind, tail), value in list(parts.items()):
        if kind == "q":
            k, v = parts.get((layer, "k", tail)), parts.get((layer, "v", tail))
            if k is None or v is None:
                raise MitobenchError(f"layer {layer}: query without key/value in a transformers checkpoint")
            out[f"blocks.{layer}.attn.qkv.{tail}"] = torch.cat([value, k, v], dim=0)
        elif kind == "gate":
            up = parts.get((layer, "up", tail))
            if up is None:
                raise MitobenchError(f"layer {layer}: mlp.gate_proj without mlp.up_proj")
            out[f"blocks.{layer}.mlp.fc1.{tail}"] = torch.cat([value, up], dim=0)  # timm: act(first half) * second
    if getattr(model, "no_embed_class", False) and "pos_embed" in out and "cls_token" in out:
        # transformers adds position_embeddings[:, 0] to the CLS token and none to the registers;
        # a no_embed_class timm model keeps positions for patches only, so fold the CLS one in (exact)
        pe = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pe[:, :1]
        out["pos_embed"] = pe[:, 1:]
        notes.append("folded the class position embedding into cls_token")
    if dropped:
        notes.append(f"dropped {len(dropped)} transformers-only tensors ({dropped[:2]})")
    notes.append("converted the transformers ViT/DINOv2 layout")
    return out


# ---------------------------------------------------------------------------- transformers (optional)
def require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MitobenchError("this needs the Hugging Face transformers package: `pip install mitobench[hf]` "
                             "(or `pip install transformers`).") from exc
    return transformers


def build_transformers_reference(config: dict[str, Any]) -> nn.Module:
    """The authors' transformers model (random init) for ``config`` (a config.json dict).

    ``model_type`` ``vit`` gives ``ViTModel(add_pooling_layer=False)`` (Phikon), ``dinov2`` a
    ``Dinov2Model`` (Phikon-v2, Midnight), ``dinov2_with_registers`` a ``Dinov2WithRegistersModel``
    (the public equivalent of Hibou's remote code). Used to cross-check the timm conversion.
    """
    tf = require_transformers()
    cfg = dict(config)
    kind = cfg.pop("model_type", "vit")
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(**cfg), add_pooling_layer=False).eval()
    if kind == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(**cfg)).eval()
    if kind == "dinov2_with_registers":
        return tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**cfg)).eval()
    raise MitobenchError(f"no transformers reference for model_type {kind!r}")
