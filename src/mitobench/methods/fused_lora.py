"""``train.fused_lora``: peft's LoRA Linear layers computed by one autograd function, same values, less memory traffic.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate operations: a full-width output of
``lora_B``, a scaled copy of it and the sum, each a pass over the (tokens x out_features) activation, the widest
tensors of a ViT block (fc1 of a ViT-H: 13,664 columns). Here the scaling folds into B (a rank x out matrix) and
the adapter's contribution joins the base product itself:

- where ``in_features + r < out_features`` (qkv, fc1): one matrix product over the concatenated inner dimension,
  ``[x, u] @ [W, s * B]^T`` with ``u = dropout(x) @ A^T``, writing the output once;
- elsewhere (proj, fc2): the base product, then ``out += u @ (s * B)^T`` in place (a GEMM that accumulates into
  its output).

The backward pass needs no gradient for the frozen base weight: the input gradient ``g @ W + dropout'(g @ s B @ A)``,
``grad B = s g^T u``, ``grad A = (g s B)^T dropout(x)``. On CUDA the dropout mask is the one ``F.dropout`` draws on
the layer's input in the compute dtype: peft's own mask where that input already is in it; where it is float32 under
bf16 autocast (a LayerNorm's output: qkv, fc1), peft draws over the float32 input and CUDA's kernel maps its random
numbers to elements differently per dtype, so the masks differ (same distribution, not the same run). On the CPU
the mask is drawn faster (see ``_dropout``), from the same distribution.

The layers keep their state-dict keys and peft's adapter saving (the class is swapped for a subclass, as
methods/precision.py does for depthwise convolutions); any case the fast path does not cover (several or merged
or disabled adapters, DoRA and other variants, a bias on B, a trainable base layer, extra forward arguments) runs
peft's own forward.
"""

from __future__ import annotations

import torch
from torch import nn

from mitobench.methods.class_swap import mix_in


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a Linear in on ``x``'s device, else ``x``'s own."""
    device = x.device.type
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    elif device == "cuda":
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    elif device == "cpu":
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    else:
        enabled, dtype = False, x.dtype
    return dtype if enabled else x.dtype


def _compiling() -> bool:
    """True while torch.compile traces: it cannot trace ``Tensor.random_`` (one graph break per adapted layer)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


_THRESHOLD_BITS = 15  # the CPU mask compares 15-bit uniforms with the rate: P(keep) within 2**-16 of 1 - p


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``dropout(x)`` and its mask for the backward pass: a bool keep-mask (CUDA) or the kept elements' scale in
    ``x``'s dtype, 0 where dropped (CPU, where a multiply-add with a bool tensor converts it at every use).

    On CUDA the fused kernel that ``F.dropout`` runs (peft's ``nn.Dropout`` draws the same numbers for an input of
    the same dtype; see the module docstring). On the CPU,
    where PyTorch draws random numbers one at a time on one thread (a fifth of a bf16 LoRA step went to drawing
    dropout masks), each 32-bit draw serves two elements: its two 16-bit halves, 15 uniform bits each, are
    compared with the rate, and the kept values are scaled by the exact inverse of the resulting keep probability.
    The same distribution up to the rate's rounding to 2**-15; half the draws of ``torch.rand(x.shape) >= p``, and
    1.7-2.9x faster than ``F.dropout`` (ATen's CPU ``bernoulli_``) on this project's 2-core CPU
    (``benchmarks/bench_lora_step.py --dropout-draw``).
    """
    if x.device.type in ("cuda", "xpu") or _compiling():  # traced (train.compile): the compiler's own RNG
        return torch.native_dropout(x, p, True)
    n = x.numel()
    draws = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_()  # 31 uniform bits each
    halves = draws.view(torch.int16)[:n].bitwise_and(2**_THRESHOLD_BITS - 1)
    threshold = min(round(p * 2**_THRESHOLD_BITS), 2**_THRESHOLD_BITS - 1)
    scale = 2**_THRESHOLD_BITS / (2**_THRESHOLD_BITS - threshold)
    mask = (halves >= threshold).view(x.shape).to(x.dtype).mul_(scale)
    return x * mask, mask


class LoraLinearFunction(torch.autograd.Function):
    """``x @ W^T + bias + scaling * dropout(x) @ A^T @ B^T`` with a frozen ``W``/``bias``; all inputs in one dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if p > 0:
            dropped, mask = _dropout(x2, p)
        else:
            dropped, mask = x2, None
        u = dropped @ lora_a.t()
        scaled_b = lora_b * scaling
        if x2.shape[1] + u.shape[1] < weight.shape[0]:
            inputs, weights = torch.cat([x2, u], 1), torch.cat([weight, scaled_b], 1)
            out = torch.addmm(bias, inputs, weights.t()) if bias is not None else inputs @ weights.t()
        else:
            out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
            out.addmm_(u, scaled_b.t())
        ctx.save_for_backward(dropped, mask, u, weight, lora_a, scaled_b)
        ctx.scaling, ctx.keep = scaling, 1.0 - p
        return out.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        dropped, mask, u, weight, lora_a, scaled_b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_a = grad_b = None
        grad_u = g @ scaled_b
        if ctx.needs_input_grad[3]:
            grad_a = grad_u.t() @ dropped
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ u) * ctx.scaling
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            grad_dropped = grad_u @ lora_a
            if mask is not None and mask.dtype == torch.bool:
                grad_x.addcmul_(grad_dropped, mask, value=1.0 / ctx.keep)
            elif mask is not None:  # the kept elements' scale
                grad_x.addcmul_(grad_dropped, mask)
            else:
                grad_x += grad_dropped
            grad_x = grad_x.view(*grad_out.shape[:-1], weight.shape[1])
        return grad_x, None, None, grad_a, grad_b, None, None


class _FusedLoraForward:
    """Mixed into a peft ``lora.Linear``'s class: the fast path of ``LoraLinearFunction`` where it applies."""

    def _fused_adapter(self) -> str | None:
        """The one active plain-LoRA adapter the fast path can compute, or None (peft's forward then)."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name):
            return None
        base = self.base_layer
        if type(base) is not nn.Linear or any(p.requires_grad for p in base.parameters()):
            return None
        if self.lora_B[name].bias is not None:  # peft's lora_bias
            return None
        dropout = self.lora_dropout[name]
        if not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and dropout.p < 1)):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else self._fused_adapter()
        if name is None:
            return super().forward(x, *args, **kwargs)
        dtype = _compute_dtype(x)
        base, dropout = self.base_layer, self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        bias = base.bias.to(dtype) if base.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return LoraLinearFunction.apply(x.to(dtype), base.weight.to(dtype), bias,
                                            self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype),
                                            float(self.scaling[name]), float(p))


def fuse_lora_layers(model: nn.Module) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the fused forward; returns how many. Idempotent; state dicts,
    deep copies and checkpoints are unchanged."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            mix_in(module, _FusedLoraForward, "Fused")
            count += 1
    return count
