"""Per layer: the bf16 depthwise convolutions of EfficientNet-Lite0 on this CPU, oneDNN's own backward pass
against methods/depthwise.py's (polyphase input gradient for strides above 1, chunked weight gradient for
kernels above 3x3), batch 32, channels-last, at 128 and 224 px input.

Columns: forward; oneDNN's input gradient and weight gradient (``aten.convolution_backward``, one output each);
methods/depthwise.py's input and weight gradients; the backward-pass speed-up of the layer (both gradients).

Usage: .venv/bin/python benchmarks/bench_depthwise.py [--batch 32] [--repeats 4] [--no-append]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402


def lite0_depthwise_layers(size: int) -> list[tuple[int, int, int, int]]:
    """(channels, input side, kernel, stride) of every depthwise convolution of Lite0 at ``size`` px input."""
    from mitobench.models.registry import create_backbone

    model = create_backbone("efficientnet_lite0")
    layers, shapes = [], {}
    hooks = [m.register_forward_hook(lambda m, inp, out: shapes.__setitem__(m, inp[0].shape[-1]))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    for module, side in shapes.items():
        layers.append((module.in_channels, side, module.kernel_size[0], module.stride[0]))
    return layers


def ms(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    from mitobench.methods.depthwise import _grad_input, _grad_weight

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    rows = ["| input | layer (channels @ side, kernel, stride) | forward (ms) | oneDNN input grad | oneDNN weight grad | "
            "mitobench input grad | mitobench weight grad | backward speed-up |", "|---|---|---|---|---|---|---|---|"]
    for size in (128, 224):
        totals = [0.0, 0.0, 0.0]
        layers = lite0_depthwise_layers(size)
        for channels, side, k, s in layers:
            p = k // 2
            x = torch.randn(args.batch, channels, side, side, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            w = torch.randn(channels, 1, k, k, dtype=torch.bfloat16)
            out = F.conv2d(x, w, None, s, p, 1, channels)
            g = torch.randn_like(out)

            def onednn(mask):
                return lambda: torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0],
                                                                   channels, mask)

            times = [ms(lambda: F.conv2d(x, w, None, s, p, 1, channels), args.repeats),
                     ms(onednn([True, False, False]), args.repeats), ms(onednn([False, True, False]), args.repeats),
                     ms(lambda: _grad_input(g, x, w, (s, s), (p, p)), args.repeats),
                     ms(lambda: _grad_weight(g, x, w, (s, s), (p, p)), args.repeats)]
            totals[0] += times[0]
            totals[1] += times[1] + times[2]
            totals[2] += times[3] + times[4]
            rows.append(f"| {size} px | {channels} @ {side}, {k}x{k}, /{s} | " + " | ".join(f"{t:.2f}" for t in times)
                        + f" | {(times[1] + times[2]) / (times[3] + times[4]):.1f}x |")
            print(rows[-1], flush=True)
        rows.append(f"| {size} px | **all {len(layers)} layers** | {totals[0]:.1f} | {totals[1]:.1f} (both) | | {totals[2]:.1f} (both) "
                    f"| | **{totals[1] / totals[2]:.1f}x** |")
        print(rows[-1], flush=True)
    body = (f"bf16, batch {args.batch}, channels-last, torch threads {torch.get_num_threads()}, mean of {args.repeats} calls "
            "after one warm-up\n\n" + "\n".join(rows))
    print(body)
    if not args.no_append:
        append_results("## bf16 depthwise convolutions of EfficientNet-Lite0: oneDNN's backward vs methods/depthwise.py (issue 4)",
                       body)


if __name__ == "__main__":
    main()
