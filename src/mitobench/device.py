"""Device and dtype choice in one place.

``device_type`` and ``dtype_name`` answer without importing torch where they can (no GPU driver on the
machine means no CUDA device), so a warm run that only reads cached embeddings never loads torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mitobench.errors import MitobenchError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
#: present on any machine where torch can see a GPU (NVIDIA, ROCm, WSL2)
_GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def gpu_driver_present() -> bool:
    """False when torch cannot possibly see a GPU: no driver files, or ``CUDA_VISIBLE_DEVICES`` hides them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return any(Path(p).exists() for p in _GPU_DRIVER_FILES)


def cpu_workers(requested: int | None = None) -> int:
    """``requested``, or one per CPU core this process may use (worker processes for CPU work)."""
    if requested is not None:
        return max(1, int(requested))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def device_type(name: str = "auto") -> str:
    """``cuda`` or ``cpu`` (or the type of an explicit device such as ``cuda:1``)."""
    if name != "auto":
        return name.split(":", 1)[0]
    if not gpu_driver_present():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(name: str = "auto") -> "torch.device":
    """The torch device for ``--device``; one that this machine does not have is an error saying so."""
    import torch

    try:
        device = torch.device(device_type(name) if name == "auto" else name)
    except RuntimeError as exc:
        raise MitobenchError(f"--device {name!r} is unknown: use auto, cpu, cuda, cuda:N, xpu or mps.") from exc
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise MitobenchError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here. Use --device "
                             "cpu (or auto, which picks a GPU when there is one).")
    if device.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        count = xpu.device_count() if xpu is not None and xpu.is_available() else 0
        if (device.index or 0) >= count:
            raise MitobenchError(f"--device {name}: torch sees {count} Intel GPU(s) (XPU) here. Use --device cpu "
                                 "(or auto).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MitobenchError(f"--device {name}: no Apple GPU (MPS) here. Use --device cpu or auto.")
    return device


def dtype_name(name: str, device: "str | torch.device", card_dtype: str = "float32") -> str:
    """``auto``: the card's recommended dtype on CUDA, float32 on CPU (bf16 on CPU is slower here)."""
    kind = getattr(device, "type", device)
    if name == "auto":
        name = card_dtype if kind == "cuda" else "float32"
    if name not in DTYPES:
        raise MitobenchError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def pick_dtype(name: str, device: "str | torch.device", card_dtype: str = "float32") -> "torch.dtype":
    import torch

    return getattr(torch, dtype_name(name, device, card_dtype))
