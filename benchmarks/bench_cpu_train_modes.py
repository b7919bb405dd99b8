"""Lite0 training steps on this CPU in float32 eager, bf16 autocast of every operation with oneDNN's own
kernels, bf16 autocast as ``train.precision=bf16`` trains (the depthwise convolutions' fast backward pass of
methods/depthwise.py, out-of-place activations; methods/precision.py) and torch.compile (same model, input size,
batch; channels-last; random inputs; plain AdamW in every mode).

Usage: .venv/bin/python benchmarks/bench_cpu_train_modes.py [--size 128] [--batch 32] [--steps 8] [--no-append]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402


def images_per_s(mode: str, size: int, batch: int, steps: int) -> tuple[float, float]:
    from mitobench.methods.engine import Classifier
    from mitobench.methods.precision import prepare_model
    from mitobench.models.registry import create_backbone

    torch.manual_seed(0)
    model = Classifier(create_backbone("efficientnet_lite0")).to(memory_format=torch.channels_last).train()
    if mode == "bf16, train.precision=bf16":
        prepare_model(model, "bf16", torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    forward = torch.compile(model) if mode == "compile" else model
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,)).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0), warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    rows = ["| mode | img/s | first 3 steps (s) |", "|---|---|---|"]
    for mode in ("fp32", "bf16", "bf16, train.precision=bf16", "compile"):
        speed, warmup = images_per_s(mode, args.size, args.batch, args.steps)
        rows.append(f"| {mode} | {speed:.1f} | {warmup:.1f} |")
        print(rows[-1], flush=True)
    body = f"EfficientNet-Lite0 training, {args.size} px, batch {args.batch}, torch threads {torch.get_num_threads()}\n\n" + "\n".join(rows)
    print(body)
    if not args.no_append:
        append_results("## CPU training modes: float32 eager vs bf16 autocast vs torch.compile (issue 4)", body)


if __name__ == "__main__":
    main()
