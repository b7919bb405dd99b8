"""End-to-end fine-tuning: every weight trains; the checkpoint is the full model (safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def prepare(model: nn.Module, config) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model: nn.Module, folder: Path) -> Path:
    from safetensors.torch import save_file

    from mitobench.io import atomic_write

    path = folder / "model.safetensors"
    # float32 throughout, as the model was built: frozen stages trained on CUDA are held in bf16 (exactly, so the
    # widening is lossless), and a checkpoint should not depend on the device it was trained on
    state = {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p)))
    return path
