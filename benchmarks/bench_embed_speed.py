"""CPU embedding speed: EfficientNet-Lite0, a ViT-S/16 and a ViT-B/16 at 224 px, batched vs one at a time.

Usage: .venv/bin/python benchmarks/bench_embed_speed.py [--threads 1] [--batch 16] [--single 6] [--no-append]

Random weights (speed does not depend on them). Each image is a uint8 128-px patch going through the
card's preprocess (resize to 224 + normalise) and forward, as ``mitobench`` embeds patches. Figures are
appended to benchmarks/RESULTS.md with the command, date and machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mitobench.models.registry import Backbone, build_model, get_card

MODELS = [("efficientnet_lite0", "EfficientNet-Lite0"), ("kaiko_vits16", "ViT-S/16 (kaiko_vits16 arch)"),
          ("kaiko_vitb16", "ViT-B/16 (kaiko_vitb16 arch)")]
RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Model zoo: CPU embedding speed (issue 3)"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench(key: str, batch: int, single: int) -> tuple[float, float]:
    card = get_card(key)
    backbone = Backbone(build_model(card).eval(), card, "random-init", "benchmark")
    patches = torch.randint(0, 256, (batch, 128, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return backbone(backbone.preprocess(x))

    embed(patches[:1])  # warm-up
    start = time.perf_counter()
    for i in range(single):
        embed(patches[i:i + 1])
    one = single / (time.perf_counter() - start)
    from mitobench.embed import extract  # the pipeline's batched path (channels-last on CPU)

    extract(backbone, patches.numpy()[:2], batch_size=batch)
    start = time.perf_counter()
    extract(backbone, patches.numpy(), batch_size=batch)
    batched = batch / (time.perf_counter() - start)
    return one, batched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--single", type=int, default=6, help="images embedded one at a time")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for key, label in MODELS:
        one, batched = bench(key, args.batch, args.single)
        rows.append((label, one, batched))
        print(f"{label:32s} one-at-a-time {one:7.2f} img/s   batch {args.batch}: {batched:7.2f} img/s   "
              f"x{batched / one:.2f}", flush=True)
    if args.no_append:
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from common import append_results

    body = "\n".join([f"torch threads {args.threads}; batched = mitobench.embed.extract (channels-last on CPU, "
                      f"batch {args.batch}); one at a time = preprocess + forward per image.", "",
                      f"| model | one at a time (img/s) | batch {args.batch} (img/s) | speed-up |", "|---|---|---|---|",
                      *[f"| {label} | {one:.2f} | {batched:.2f} | {batched / one:.2f}x |" for label, one, batched in rows]])
    append_results(HEADING, body)
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
