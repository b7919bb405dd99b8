"""Issue 4 GPU benchmark (needs CUDA): LoRA training steps on the Virchow2 architecture (ViT-H/14,
random weights, 224 px) with mitobench's engine settings (bf16 autocast, batch 64) against the
reference way (fp32, batch 8); plus a full fine-tuning step of swin_base_patch4_window7_224.

Usage: python benchmarks/gpu_train.py [--steps 10] [--batch 64] [--no-append]
Prints images/s, peak GPU memory and the ratio, and appends them with the GPU's name to RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402


def build(key: str, method: str):
    from mitobench.config import RunConfig
    from mitobench.methods import finetune, lora
    from mitobench.methods.engine import Classifier
    from mitobench.models.registry import Backbone, build_model, get_card

    card = get_card(key)
    model = Classifier(Backbone(build_model(card), card, "random-init", "benchmark"))
    cfg = RunConfig(model=key, method=method)
    return (lora if method == "lora" else finetune).prepare(model, cfg).cuda().train()


def measure(model, batch: int, steps: int, bf16: bool, size: int = 224) -> tuple[float, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-4)
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, 2, (batch,), device="cuda").float()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this benchmark only runs on a GPU (the figure stays pending in RESULTS.md)")
    rows = ["| workload | mitobench (bf16) img/s | peak GB | reference (fp32, batch 8) img/s | peak GB | ratio |",
            "|---|---|---|---|---|---|"]
    for key, method in (("virchow2", "lora"), ("swin_base_patch4_window7_224", "finetune")):
        model = build(key, method)
        fast, fast_mem = measure(model, args.batch, args.steps, bf16=True)
        torch.cuda.empty_cache()
        slow, slow_mem = measure(model, 8, args.steps * 2, bf16=False)
        rows.append(f"| {key} {method} (batch {args.batch}) | {fast:.1f} | {fast_mem:.1f} | {slow:.1f} | {slow_mem:.1f} | {fast / slow:.1f}x |")
        print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    body = f"GPU: {torch.cuda.get_device_name(0)}\n\n" + "\n".join(rows)
    print(body)
    if not args.no_append:
        append_results("## Training engine: GPU LoRA / fine-tuning steps (issue 4)", body)


if __name__ == "__main__":
    main()
