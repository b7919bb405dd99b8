"""methods/depthwise.py: the depthwise convolution whose backward pass avoids oneDNN's slow bf16 kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mitobench.methods import depthwise
from mitobench.methods.depthwise import depthwise_conv2d

# (channels, height, width, kernel, stride): every kind of depthwise layer in EfficientNet-Lite0, plus odd sizes
# and non-square kernels and strides, strides above 2 and a kernel smaller than the stride, so both the stride-1 regrid of the input gradient and both weight-gradient routes run
CASES = [(3, 7, 8, 5, 2), (4, 6, 6, 3, 2), (2, 5, 5, 5, 1), (3, 8, 9, 3, 1), (2, 9, 7, 5, 2), (2, 6, 6, (5, 3), (2, 1)),
         (2, 7, 6, 3, 3), (2, 6, 7, 1, 2), (2, 8, 8, (1, 5), (3, 2))]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


@pytest.mark.parametrize("pixels_per_call", [2048, 7])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("channels,height,width,kernel,stride", CASES)
def test_gradients_are_exact_in_float64(channels, height, width, kernel, stride, channels_last, pixels_per_call,
                                        monkeypatch):
    monkeypatch.setattr(depthwise, "_PIXELS_PER_CALL", pixels_per_call)  # 7: the images' pairs in several calls
    kernel, stride = _pair(kernel), _pair(stride)
    padding = (kernel[0] // 2, kernel[1] // 2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, channels, height, width, dtype=torch.float64, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, 1, *kernel, dtype=torch.float64, generator=gen)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: depthwise_conv2d(a, b, stride, padding), (x, w))
    out = depthwise_conv2d(x, w, stride, padding)
    expected = F.conv2d(x, w, None, stride, padding, 1, channels)
    assert torch.equal(out, expected)  # the forward pass is the ordinary convolution
    grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    for mine, theirs in zip(torch.autograd.grad(out, (x, w), grad), torch.autograd.grad(expected, (x, w), grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 1), (5, 2)])
def test_bf16_gradients_match_float32_within_bf16_rounding(kernel, stride):
    """In bf16 the gradients are those of the float32 convolution, up to bf16 rounding of the inputs and outputs."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, 12, 12, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 1, kernel, kernel, generator=gen)
    x16, w16 = x.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    out = depthwise_conv2d(x16, w16, (stride, stride), (kernel // 2, kernel // 2))
    grad = torch.randn(out.shape, generator=gen)
    gx, gw = torch.autograd.grad(out, (x16, w16), grad.bfloat16())
    assert gx.dtype == gw.dtype == torch.bfloat16
    x32, w32 = x16.float().requires_grad_(True), w16.float().requires_grad_(True)
    ref = F.conv2d(x32, w32, None, stride, kernel // 2, 1, 16)
    rx, rw = torch.autograd.grad(ref, (x32, w32), grad.bfloat16().float())
    torch.testing.assert_close(gx.float(), rx, rtol=2e-2, atol=2e-2 * rx.abs().max().item())
    torch.testing.assert_close(gw.float(), rw, rtol=2e-2, atol=2e-2 * rw.abs().max().item())
