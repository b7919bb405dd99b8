"""GPU embedding speed: Virchow2, UNI and H-optimus-0 (random weights, real architectures).

Times embedding extraction the fast way (batch 256 under autocast in the card's half dtype: float16 for
these three cards; bfloat16 when a card says float32) against the reference code's way (fp32, batch 1),
and prints images/s and the ratio (target: >= 20x).

    python benchmarks/gpu_embed.py                 # on a CUDA machine; --append writes RESULTS.md
    python benchmarks/gpu_embed.py --smoke --device cpu   # depth-2 replicas, tiny counts: checks the script

Inputs are uint8 128-px patches already on the device; the timed work is the card's preprocess
(resize to 224 + normalise) and forward, with ``torch.cuda.synchronize`` around each timing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

from mitobench.models.registry import Backbone, build_model, get_card, replace_card

KEYS = ("virchow2", "uni", "hoptimus0")
RESULTS = Path(__file__).with_name("RESULTS.md")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(key: str, device: torch.device, batch: int, n_big: int, n_single: int, smoke: bool,
        variants: bool = False) -> dict:
    card = get_card(key)
    if smoke:
        card = replace_card(card, build_kwargs={**card.build_kwargs, "depth": 2})
    half = getattr(torch, card.dtype) if card.dtype != "float32" else torch.bfloat16
    backbone = Backbone(build_model(card).eval(), card, "random-init", "benchmark").to(device)
    patches = torch.randint(0, 256, (batch, 128, 128, 3), dtype=torch.uint8, device=device)

    def embed(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return backbone(backbone.preprocess(x))

    # reference way: fp32, one image per call (TF32 off so it is really fp32)
    if device.type == "cuda":  # PyTorch's defaults, as the reference code ran: no TF32 in matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
    def images_per_s(step, calls: int, per_call: int):
        """Warm up once, then time ``calls`` calls of ``step(i)``; returns (images/s, last output)."""
        step(0)
        sync(device)
        start = time.perf_counter()
        for i in range(calls):
            out = step(i)
        sync(device)
        return calls * per_call / (time.perf_counter() - start), out

    single, _ = images_per_s(lambda i: embed(patches[i % batch:i % batch + 1], None), n_single, 1)
    # fast way: batch, half precision autocast
    batched, out = images_per_s(lambda i: embed(patches, half), n_big, batch)
    assert out.shape == (batch, card.embed_dim) and torch.isfinite(out.float()).all()
    result = {"key": key, "dtype": str(half).replace("torch.", ""), "single": single, "batched": batched,
              "ratio": batched / single}
    if variants:  # same batch, weights stored in the half dtype (no per-call casts), then also compiled
        backbone.to(half)

        def embed_half(model, x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(backbone.preprocess(x).to(half))

        for name, model in (("half_weights", backbone), ("half_compiled", torch.compile(backbone))):
            result[name], _ = images_per_s(lambda i: embed_half(model, patches), n_big, batch)
            print(f"{key:10s} {name}: {result[name]:8.1f} img/s | x{result[name] / single:.1f}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4, help="timed batches")
    ap.add_argument("--single", type=int, default=64, help="timed single images")
    ap.add_argument("--smoke", action="store_true", help="depth-2 replicas, tiny counts (script check only)")
    ap.add_argument("--variants", default="", help="comma-separated keys also timed with half weights and torch.compile")
    ap.add_argument("--append", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine (or --smoke --device cpu to check the script)")
    if args.smoke:
        args.batch, args.batches, args.single = min(args.batch, 4), 1, 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for key in KEYS:
        r = run(key, device, args.batch, args.batches, args.single, args.smoke, key in args.variants.split(","))
        rows.append(r)
        print(f"{key:10s} fp32 batch 1: {r['single']:8.1f} img/s | {r['dtype']} batch {args.batch}: "
              f"{r['batched']:8.1f} img/s | x{r['ratio']:.1f} {'OK' if r['ratio'] >= 20 else 'below 20x'}", flush=True)
    print(f"device: {name}, torch {torch.__version__}")
    if args.append and not args.smoke:
        lines = ["", f"### GPU embedding speed, {dt.datetime.now().astimezone().isoformat(timespec='seconds')}", "",
                 f"- command: `python {' '.join(sys.argv)}`", f"- GPU: {name}, torch {torch.__version__}", "",
                 f"| model | fp32 batch 1 (img/s) | half batch {args.batch} (img/s) | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['key']} ({r['dtype']}) | {r['single']:.1f} | {r['batched']:.1f} | {r['ratio']:.1f}x |"
                  for r in rows]
        with open(RESULTS, "a") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
