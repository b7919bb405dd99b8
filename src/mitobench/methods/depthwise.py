"""Depthwise convolution with a backward pass that avoids oneDNN's slow bf16 CPU kernels.

oneDNN computes a bf16 depthwise convolution's forward pass and its stride-1 input gradient quickly, but on this
project's CPU (AVX512-BF16, no AMX) it has no fast kernel for two other parts of the backward pass, which it then
runs tens to hundreds of times slower than the forward pass (benchmarks/bench_depthwise.py: over EfficientNet-Lite0's 16 depthwise
layers this module's backward is 9.9x (128 px) and 6.7x (224 px) faster):

- the input gradient of a strided convolution. Split by the phase of the input pixel (row and column modulo the
  stride), it is ``stride**2`` stride-1 correlations of the output gradient with a subset of the kernel taps,
  which the forward kernel runs fast.
- the weight gradient of a kernel larger than 3x3. It is itself a depthwise convolution: the input of each
  (image, channel) pair correlated with its output gradient as the kernel (dilated by the stride), whose
  ``k x k`` outputs summed over the images are the gradient. oneDNN's forward kernel runs that fast, given the
  pairs of a few images at a time.

Both are the exact gradient; only the order of the floating-point sums differs from oneDNN's. Used for the
depthwise convolutions of a model trained with ``train.precision=bf16`` on the CPU (methods/precision.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_Pair = tuple[int, int]
# output-gradient pixels per call of the weight-gradient convolution; ~2048 was fastest on 4x4 to 56x56 maps
_PIXELS_PER_CALL = 2048


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: _Pair, padding: _Pair) -> torch.Tensor:
    """``F.conv2d(x, weight, stride=stride, padding=padding, groups=channels)`` with the fast backward pass.

    ``weight`` has shape ``(channels, 1, kh, kw)``; dilation 1, zero padding, no bias.
    """
    return _DepthwiseConv2d.apply(x, weight, tuple(stride), tuple(padding))


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: _Pair, padding: _Pair) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=_memory_format(x))
        grad_x = _grad_input(grad, x, weight, ctx.stride, ctx.padding) if ctx.needs_input_grad[0] else None
        grad_w = _grad_weight(grad, x, weight, ctx.stride, ctx.padding) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _aten_backward(grad, x, weight, stride, padding, mask):
    return torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride), list(padding), [1, 1], False,
                                               [0, 0], weight.shape[0], mask)


def _grad_input(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: _Pair, padding: _Pair) -> torch.Tensor:
    if stride == (1, 1):
        return _aten_backward(grad, x, weight, stride, padding, [True, False, False])[0]
    # Polyphase: the input pixels of one phase (row % stride, column % stride) receive only the kernel taps of one
    # phase, so each phase of the input gradient is a stride-1 correlation of the output gradient with those taps.
    grad_x = torch.empty_like(x, memory_format=_memory_format(x))
    rows = _phases(x.shape[2], grad.shape[2], weight.shape[2], stride[0], padding[0])
    cols = _phases(x.shape[3], grad.shape[3], weight.shape[3], stride[1], padding[1])
    for row, tap_row, taps_y, n_y, start_y, pad_y in rows:
        for col, tap_col, taps_x, n_x, start_x, pad_x in cols:
            dst = grad_x[:, :, row :: stride[0], col :: stride[1]]
            if taps_y == 0 or taps_x == 0:  # a kernel smaller than the stride never reaches this phase
                dst.zero_()
                continue
            kernel = weight[:, :, tap_row :: stride[0], tap_col :: stride[1]].flip(2, 3)
            out = F.conv2d(grad, kernel, None, 1, (pad_y, pad_x), 1, weight.shape[0])
            dst.copy_(out[:, :, start_y : start_y + n_y, start_x : start_x + n_x])
    return grad_x


def _phases(size: int, out_size: int, kernel: int, stride: int, padding: int) -> list[tuple[int, ...]]:
    """Per phase ``r`` of one axis: (r, first tap, taps, input pixels, first output to keep, padding).

    Input pixel ``stride * m + r`` receives taps ``first + stride * t`` from output pixel ``m + q - t``, with
    ``first = (r + padding) % stride`` and ``q = (r + padding) // stride``: a correlation with the taps reversed,
    computed with enough zero padding and cropped to the phase's pixels.
    """
    phases = []
    for r in range(stride):
        first, q = (r + padding) % stride, (r + padding) // stride
        taps = max(0, -(-(kernel - first) // stride))
        pixels = -(-(size - r) // stride)
        offset = q - taps + 1
        pad = max(0, -offset, offset + pixels + taps - 1 - out_size)
        phases.append((r, first, taps, pixels, offset + pad, pad))
    return phases


def _grad_weight(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: _Pair, padding: _Pair) -> torch.Tensor:
    kh, kw = weight.shape[2:]
    if kh * kw <= 9:  # oneDNN's own kernel is fast up to 3x3
        return _aten_backward(grad, x, weight, stride, padding, [False, True, False])[1]
    n, c, h, w = x.shape
    ho, wo = grad.shape[2:]
    sum_dtype = torch.promote_types(x.dtype, torch.float32)  # the images' bf16 terms are summed in float32
    total = torch.zeros((c, kh, kw), dtype=sum_dtype, device=x.device)
    chunk = max(1, min(n, _PIXELS_PER_CALL // (ho * wo)))  # enough (image, channel) pairs per call, not too many
    for start in range(0, n, chunk):
        xs, gs = x[start : start + chunk], grad[start : start + chunk]
        m = xs.shape[0]
        pairs = xs.permute(2, 3, 0, 1).reshape(1, h, w, m * c).permute(0, 3, 1, 2)  # (image, channel) pairs as channels
        out = F.conv2d(pairs, gs.reshape(m * c, 1, ho, wo), None, 1, padding, stride, m * c)
        total += out[0, :, :kh, :kw].reshape(m, c, kh, kw).sum(0, dtype=sum_dtype)
    return total.unsqueeze(1).to(weight.dtype)
