"""LoRA (peft): low-rank adapters on the card's target Linear layers; the head trains too.

The checkpoint is adapters + head only: megabytes, not gigabytes. ``adapter_and_head.safetensors`` is what
``mitobench predict`` loads; ``adapter/`` holds the same adapters in peft's own layout (``adapter_config.json`` +
``adapter_model.safetensors``, as ``save_pretrained`` writes them), so ``PeftModel.from_pretrained(backbone, folder)``
loads them into the card's backbone without mitobench.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from mitobench.errors import MitobenchError
from mitobench.methods.fused_lora import fuse_lora_layers


def _targets_error(target: str, backbone: nn.Module, key: str, exc: Exception) -> str:
    """Why peft refused the targets: the regex matches nothing, or it matches layers peft cannot adapt."""
    advice = ("Set train.lora_targets to a regex over its module names (`mitobench models show KEY` prints the "
              "card's).")
    try:
        matched = [(name, type(m).__name__) for name, m in backbone.named_modules() if re.fullmatch(target, name)]
    except re.error:
        matched = []
    if not matched:
        return f"LoRA targets {target!r} match no layer of {key}: {exc}. {advice}"
    kinds = sorted({kind for _, kind in matched})
    return (f"LoRA targets {target!r} match {len(matched)} module(s) of {key} (e.g. {matched[0][0]}), of kind "
            f"{', '.join(kinds)}, which LoRA cannot adapt: {exc}. Target Linear or Conv2d layers. {advice}")


def prepare(model: nn.Module, config) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    card = model.backbone.card
    target = config.train.lora_targets or card.lora_target
    if not target:
        raise MitobenchError(f"model {card.key!r} has no LoRA target regex in its card. Set train.lora_targets, a regex "
                             "over module names (e.g. --set 'train.lora_targets=.*blocks\\.\\d+\\.attn\\.qkv$'), "
                             "or use --method finetune.")
    lora = LoraConfig(r=config.train.lora_r, lora_alpha=config.train.lora_alpha, lora_dropout=config.train.lora_dropout,
                      target_modules=target, bias="none")
    try:
        model.backbone.model = inject_adapter_in_model(lora, model.backbone.model)
    except (ValueError, re.error) as exc:
        raise MitobenchError(_targets_error(target, model.backbone.model, card.key, exc)) from exc
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("head."))
    # The backbone is frozen, BatchNorm statistics included: the checkpoint (adapters + head) does not hold them, so
    # statistics updated in training would make `mitobench predict` score with other ones than the run did.
    model.frozen_norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in model.modules():
        # peft casts each adapted layer's input to the adapter's float32 before the adapter's dropout and matrices;
        # under autocast those matrices run in bf16 anyway, so the cast only costs a float32 copy of every adapted
        # activation (and of its gradient). Outside autocast input and adapter are both float32: no cast either way.
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    if config.train.fused_lora:
        fuse_lora_layers(model)
    return model


def save(model: nn.Module, folder: Path) -> Path:
    from safetensors.torch import save_file

    from mitobench.io import atomic_write

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if "lora_" in k or k.startswith("head.")}
    path = folder / "adapter_and_head.safetensors"
    atomic_write(path, lambda p: save_file(state, str(p)))
    save_peft_adapter(model, folder / "adapter")
    return path


def save_peft_adapter(model: nn.Module, folder: Path) -> Path:
    """The adapters of the backbone (``model.backbone.model``) in the layout of peft's ``save_pretrained``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from mitobench.io import atomic_write, atomic_write_json

    backbone = model.backbone.model
    config = backbone.peft_config["default"].to_dict()
    config["base_model_name_or_path"] = model.backbone.card.key
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # JSON has no sets
    # keys as PeftModel.save_pretrained writes them: under the wrapper's "base_model.model." prefix
    weights = {f"base_model.model.{k}": v.detach().float().contiguous().cpu()
               for k, v in get_peft_model_state_dict(backbone).items()}
    atomic_write(folder / "adapter_model.safetensors", lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    atomic_write_json(folder / "adapter_config.json", config)
    return folder
