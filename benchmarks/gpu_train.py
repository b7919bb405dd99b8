"""Issue 4 GPU benchmark (needs CUDA): LoRA training steps on the Virchow2 architecture (ViT-H/14,
random weights, 224 px) with mitobench's engine pipeline against the reference way; plus a full
fine-tuning step of swin_base_patch4_window7_224 and of the
default EfficientNet-Lite0 (224 px).

- mitobench: uint8 128-px patches already on the GPU -> the engine's batched augmentation (the cpu
  preset's ``strong`` augmentation, resized to 224) -> normalise -> bf16 autocast, batch 64.
- reference (the paper's code): fp32, batch 8, inputs already made (its per-image PIL pipeline is not
  even counted, which favours the reference).

Usage: python benchmarks/gpu_train.py [--steps 10] [--batch 64] [--no-append] [--variants virchow2]
       python benchmarks/gpu_train.py --smoke --device cpu   # depth-2 replicas: checks the script
Prints images/s, peak GPU memory and the ratio, and appends them with the GPU's name to RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

from mitobench.methods.augment import PRESETS, BatchAugment  # noqa: E402

WORKLOADS = (("virchow2", "lora"), ("swin_base_patch4_window7_224", "finetune"), ("efficientnet_lite0", "finetune"))


def build(key: str, method: str, device: torch.device, smoke: bool):
    from mitobench.config import RunConfig
    from mitobench.methods import finetune, lora
    from mitobench.methods.engine import Classifier
    from mitobench.models.registry import Backbone, build_model, get_card, replace_card

    card = get_card(key)
    if smoke and "efficientnet" not in key:
        depth = {"depths": (1, 1, 1, 1)} if "swin" in key else {"depth": 2}
        card = replace_card(card, build_kwargs={**card.build_kwargs, **depth})
    model = Classifier(Backbone(build_model(card), card, "random-init", "benchmark"))
    cfg = RunConfig(model=key, method=method)
    return (lora if method == "lora" else finetune).prepare(model, cfg).to(device).train()


@contextmanager
def without_lora_dropout(model: torch.nn.Module) -> Iterator[int]:
    """Within the block peft's LoRA dropout layers are identities (as ``train.lora_dropout=0``); yield how many."""
    saved = []
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name in dropouts:
                saved.append((dropouts, name, dropouts[name]))
                dropouts[name] = torch.nn.Identity()
    try:
        yield len(saved)
    finally:
        for dropouts, name, layer in saved:
            dropouts[name] = layer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, device: torch.device, batch: int, steps: int, fast: bool, size: int = 224) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-4)
    y = torch.randint(0, 2, (batch,), device=device).float()
    if fast:
        patches = torch.randint(0, 256, (batch, 128, 128, 3), dtype=torch.uint8, device=device)
        augment = BatchAugment(PRESETS["strong"], size, seed=0)
        mean, std = model.backbone._mean.to(device), model.backbone._std.to(device)
    else:
        x_ref = torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        x = (augment(patches) - mean) / std if fast else x_ref
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return steps * batch / (time.perf_counter() - t0), peak


def time_variants(model, key: str, method: str, device: torch.device, args, reference: float) -> None:
    """The engine's options, printed as they finish (with the ratio to ``reference``, the fp32 batch-8 img/s):
    frozen weights in bf16, then train.compile at the batch and at twice it, and for LoRA without its dropout."""

    def show(label: str, batch: int, compiled: bool = True) -> None:
        try:
            v, v_mem = measure(torch.compile(model, dynamic=False) if compiled else model, device, batch, args.steps, fast=True)
            print(f"| {key} {method} {label} | {v:.1f} | {v_mem:.1f} | {v / reference:.1f}x |", flush=True)
        except torch.OutOfMemoryError:
            print(f"| {key} {method} {label} | out of memory | | |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    show("frozen weights bf16", args.batch, compiled=False)
    show("frozen bf16 + torch.compile", args.batch)
    if method == "lora":  # LoRA dropout masks every adapted layer's input: memory-bound work, timed here
        with without_lora_dropout(model) as n_dropouts:
            if n_dropouts:
                show("frozen bf16 + torch.compile, lora_dropout 0", args.batch)
                show(f"frozen bf16 + torch.compile, lora_dropout 0, batch {args.batch * 2}", args.batch * 2)
    show(f"frozen bf16 + torch.compile, batch {args.batch * 2}", args.batch * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="depth-reduced replicas, tiny counts (script check only)")
    parser.add_argument("--variants", default="", help="comma-separated keys also timed with frozen bf16 weights and "
                        "torch.compile (and, for LoRA, batch x2 and lora_dropout 0)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this benchmark only runs on a GPU (the figure stays pending in RESULTS.md)")
    if args.smoke:
        args.steps, args.batch, args.no_append = 1, 2, True
    if device.type == "cuda":  # PyTorch's defaults, as the reference code ran: no TF32 in matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = ["| workload | mitobench (bf16, engine pipeline) img/s | peak GB | reference (fp32, batch 8) img/s | peak GB | ratio |",
            "|---|---|---|---|---|---|"]
    references = {}
    for key, method in WORKLOADS:
        model = build(key, method, device, args.smoke)
        fast, fast_mem = measure(model, device, args.batch, args.steps, fast=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        slow, slow_mem = measure(model, device, 8 if not args.smoke else 1, args.steps * 2, fast=False)
        references[key] = slow
        rows.append(f"| {key} {method} (batch {args.batch}) | {fast:.1f} | {fast_mem:.1f} | {slow:.1f} | {slow_mem:.1f} | {fast / slow:.1f}x |")
        print(rows[-1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    body = f"GPU: {name}, torch {torch.__version__}\n\n" + "\n".join(rows)
    print(body)
    if not args.no_append:  # before the variants: their compilations are slow, and a time limit must not lose this table
        append_results("## Training engine: GPU LoRA / fine-tuning steps (issue 4)", body)
    for key, method in WORKLOADS:
        if key in args.variants.split(","):
            time_variants(build(key, method, device, args.smoke), key, method, device, args, references[key])


if __name__ == "__main__":
    main()
