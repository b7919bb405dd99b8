"""Training and evaluation precision (``train.precision``).

``auto`` keeps what the engine always did: bf16 autocast on CUDA, float32 on the CPU. ``bf16`` asks for bf16
autocast on the CPU too. ``native`` is bf16 where the device computes it natively (CUDA, or a CPU with
AVX512-BF16 or AMX) and float32 elsewhere; a new run resolves it to ``bf16`` or ``fp32`` and saves that in its
``config.yaml``, so a resume or ``mitobench predict`` uses the precision the run trained in.

oneDNN runs 1x1 convolutions and matrix products about twice as fast in bf16 on a CPU with native bf16, but
parts of its bf16 depthwise-convolution backward are tens of times slower than the forward pass, so under CPU
autocast the depthwise convolutions take the exact-gradient backward of methods/depthwise.py, and in-place
activations become out-of-place ones (an in-place one on a bf16 tensor costs a copy). Net effect for
EfficientNet-Lite0 on this project's 2-core CPU, with the engine's other CPU settings (fused AdamW, glibc keeping
freed memory): about 1.4x (128 px) and 1.6x (224 px) the training images/s of float32
(benchmarks/bench_train_speed.py).
"""

from __future__ import annotations

import contextlib
import platform

import torch
from torch import nn

from mitobench.config import check_precision
from mitobench.methods.class_swap import mix_in
from mitobench.methods.depthwise import depthwise_conv2d


def resolve_precision(name: str, device: torch.device) -> str:
    """``native`` -> ``bf16`` or ``fp32`` for ``device``; any other value unchanged."""
    check_precision(name)
    if name != "native":
        return name
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``, or None for plain float32."""
    name = resolve_precision(name, device)
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``train.precision`` ``name`` on ``device`` (a no-op for float32)."""
    dtype = autocast_dtype(name, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (without it bf16 is emulated and slow). oneDNN's own check says yes on
    any AVX-512 x86 CPU, where it emulates bf16; so on x86 the CPU must also have AVX512-BF16 or AMX."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    x86_checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not onednn or platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686") or None in x86_checks:
        return onednn  # Arm: oneDNN checks the bf16 extension itself
    return any(check() for check in x86_checks)


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype in force, or None (torch >= 2.4 has the device-type API; 2.2-2.3 the CPU one)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


class _FastDepthwiseForward:
    """Mixed into a depthwise convolution's class: under CPU autocast, run it in the autocast dtype with the
    backward pass of methods/depthwise.py."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _cpu_autocast_dtype()
        if dtype is None or x.device.type != "cpu":
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            out = depthwise_conv2d(x.to(dtype), self.weight.to(dtype), self.stride, self.padding)
            return out if self.bias is None else out + self.bias.to(dtype).view(1, -1, 1, 1)


def _plain_depthwise(module: nn.Module) -> bool:
    """A depthwise nn.Conv2d whose forward is nn.Conv2d's own, with zero padding given in pixels and no dilation
    (a subclass with its own forward, e.g. timm's dynamic "same" padding, is left alone)."""
    return (isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
            and type(module).forward in (nn.Conv2d.forward, _FastDepthwiseForward.forward)
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and tuple(module.dilation) == (1, 1) and module.out_channels == module.in_channels)


def fast_depthwise(model: nn.Module) -> int:
    """Give every plain depthwise convolution of ``model`` the fast CPU autocast path; returns how many.

    The class of each such module is swapped for a subclass, so parameter names, state dicts, deep copies
    and checkpoints are unchanged. Idempotent; outside CPU autocast the modules behave as before.
    """
    count = 0
    for module in model.modules():
        if _plain_depthwise(module):
            mix_in(module, _FastDepthwiseForward, "FastDepthwise")
            count += 1
    return count


def out_of_place_activations(model: nn.Module) -> int:
    """Make in-place ReLU/ReLU6/Hardtanh activations out of place; returns how many.

    Same values; under CPU autocast an in-place activation on a bf16 tensor costs an extra copy of it.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, (nn.ReLU, nn.Hardtanh)) and module.inplace:
            module.inplace = False
            count += 1
    return count


def explicit_attention(model: nn.Module) -> int:
    """Make timm's attention layers compute ``softmax(q k^T) v`` with plain matrix products instead of
    ``F.scaled_dot_product_attention``; returns how many.

    Under CPU bf16 autocast PyTorch's CPU flash-attention kernel (its backward above all) is the slowest part of a
    ViT step; at ViT sequence lengths (197-261 tokens) the explicit form, whose products run on oneDNN's bf16
    kernels, trained a fused-LoRA ViT-S/16 1.31x and a ViT-B/16 1.23x as fast on this project's 2-core CPU
    (``benchmarks/bench_lora_step.py --precision bf16``; float32: no gain, so it is left alone there). The same
    function; it keeps each attention matrix for the backward pass.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "fused_attn", None) is True:
            module.fused_attn = False
            count += 1
    return count


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights and biases of Linear and convolution layers in ``dtype``; returns how many layers.

    Autocast casts these to its dtype at every use, so under autocast to ``dtype`` the arithmetic is unchanged,
    while the copy per step (for LoRA on a ViT-H: 1.2 GB read, 0.6 GB written, forward and backward) is gone and
    the model takes half the memory. Trainable parameters stay float32 for the optimiser.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            params = [p for p in (module.weight, module.bias) if p is not None]
            if params and not any(p.requires_grad for p in params) and module.weight.dtype != dtype:
                for p in params:
                    p.data = p.data.to(dtype)
                count += 1
    return count


def prepare_model(model: nn.Module, name: str, device: torch.device) -> nn.Module:
    """Apply the precision policy to a model that will train or predict on ``device``."""
    dtype = autocast_dtype(name, device)
    if dtype is not None and device.type == "cpu":
        fast_depthwise(model)
        out_of_place_activations(model)
        explicit_attention(model)
    if dtype is not None and device.type == "cuda":
        cast_frozen_weights(model, dtype)
    return model
