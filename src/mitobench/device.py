"""Device and dtype choice in one place."""

from __future__ import annotations

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, card_dtype: str = "float32") -> torch.dtype:
    """``auto``: the card's recommended dtype on CUDA, float32 on CPU (bf16 on CPU is slower here)."""
    if name == "auto":
        name = card_dtype if device.type == "cuda" else "float32"
    known = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in known:
        from mitobench.errors import MitobenchError

        raise MitobenchError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return known[name]
