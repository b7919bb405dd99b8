"""LoRA training step: peft's forward against ``train.fused_lora`` (methods/fused_lora.py), same model, same step;
under CPU bf16 autocast also the fused layers with PyTorch's attention kernel instead of the explicit attention the
engine uses there (``explicit_attention`` in methods/precision.py); with ``--options`` also the settings the CPU
policy leaves off, timed to show why. ``--dropout-draw`` times only the CPU dropout mask of the fused layers
(``fused_lora._dropout``) against ``F.dropout`` (ATen's ``bernoulli_``) on the inputs of a ViT-S/B's adapted layers.

Usage: .venv/bin/python benchmarks/bench_lora_step.py [--models kaiko_vits16,kaiko_vitb16] [--batch 8] [--steps 4]
                                                      [--rounds 3] [--device cpu|cuda] [--precision auto|bf16|fp32]
                                                      [--options] [--no-append]
       .venv/bin/python benchmarks/bench_lora_step.py --dropout-draw [--rounds 3] [--no-append]

Random weights, LoRA r=8, alpha=16, dropout 0.3 on the card's targets, 224-px inputs made beforehand, AdamW;
``--precision`` as ``train.precision`` (default ``auto``: float32 on the CPU, bf16 autocast on CUDA), with the
engine's precision policy (``prepare_model``) and, on the CPU, glibc keeping freed memory as the engine does.
The forms alternate for ``--rounds`` rounds and each keeps its best round (this VM's speed drifts). Figures are
appended to benchmarks/RESULTS.md with the command, date and machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

HEADING = "## Training engine: fused LoRA layers (issue 4)"


def build(key: str, fused: bool, device: torch.device, precision: str) -> torch.nn.Module:
    """The LoRA classifier as the engine prepares it for ``precision`` on ``device``."""
    from mitobench.config import RunConfig
    from mitobench.methods import lora
    from mitobench.methods.engine import Classifier
    from mitobench.methods.precision import prepare_model
    from mitobench.models.registry import Backbone, build_model, get_card

    card = get_card(key)
    torch.manual_seed(0)
    model = Classifier(Backbone(build_model(card), card, "random-init", "benchmark"))
    cfg = RunConfig(model=key, method="lora")
    cfg.train.fused_lora = fused
    return prepare_model(lora.prepare(model, cfg), precision, device).to(device).train()


def sdpa_attention(model: torch.nn.Module) -> None:
    """Attention back on ``F.scaled_dot_product_attention`` where the precision policy made it explicit."""
    for module in model.modules():
        if getattr(module, "fused_attn", None) is False:
            module.fused_attn = True


def frozen_bf16(model: torch.nn.Module) -> None:
    from mitobench.methods.precision import cast_frozen_weights

    cast_frozen_weights(model, torch.bfloat16)


def compiled(model: torch.nn.Module) -> None:
    from mitobench.methods.compile import compile_model

    compile_model(model)  # compiled in the first (untimed) step of each round's first call


def explicit(model: torch.nn.Module) -> None:
    from mitobench.methods.precision import explicit_attention

    explicit_attention(model)


def forms(autocast_cpu: bool, options: bool) -> dict:
    """Column name -> (fused, change made after the engine's preparation)."""
    chosen = {"peft forward": (False, None)}
    if autocast_cpu:  # the engine computes attention explicitly there (methods/precision.py): also timed without
        chosen["fused, SDPA attention"] = (True, sdpa_attention)
    chosen["fused"] = (True, None)
    if options:
        if autocast_cpu:
            chosen["fused, frozen weights bf16"] = (True, frozen_bf16)
        else:
            chosen["fused, explicit attention"] = (True, explicit)
        chosen["fused, train.compile"] = (True, compiled)
    return chosen


def images_per_second(model: torch.nn.Module, device: torch.device, batch: int, steps: int, precision: str) -> float:
    from mitobench.methods.precision import autocast

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, 1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 2, (batch,), device=device).float()

    def step() -> None:
        with autocast(precision, device):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - t0)


def dropout_draw_table(rounds: int) -> str:
    """Milliseconds per draw (best of ``rounds`` x 10) of ``fused_lora._dropout`` and ``F.dropout`` at p = 0.3 on one
    batch of 8 ViT inputs (197 tokens), float32 and bf16: the mask work a LoRA layer with dropout adds on the CPU."""
    from mitobench.methods.fused_lora import _dropout

    rows = ["| input (8 x 197 x width) | dtype | F.dropout ms | fused_lora._dropout ms | speed-up |", "|---|---|---|---|---|"]
    for width in (384, 768):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(8 * 197, width).to(dtype)
            timings = {}
            for name, draw in (("F.dropout", lambda: torch.nn.functional.dropout(x, 0.3, True)),
                               ("_dropout", lambda: _dropout(x, 0.3))):
                draw()
                best = float("inf")
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    for _ in range(10):
                        draw()
                    best = min(best, (time.perf_counter() - t0) / 10)
                timings[name] = best * 1e3
            rows.append(f"| width {width} | {str(dtype).removeprefix('torch.')} | {timings['F.dropout']:.3f} | "
                        f"{timings['_dropout']:.3f} | {timings['F.dropout'] / timings['_dropout']:.1f}x |")
    return f"CPU dropout mask draw, torch threads {torch.get_num_threads()}, p = 0.3\n\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="kaiko_vits16,kaiko_vitb16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", help="train.precision: auto (fp32 on the CPU, bf16 autocast on "
                        "CUDA), bf16, fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    parser.add_argument("--options", action="store_true", help="also the fused step with torch.compile, and with the "
                        "frozen weights in bf16 (autocast) or explicit attention (float32): options the CPU policy "
                        "does not take")
    parser.add_argument("--dropout-draw", action="store_true", help="time only the CPU dropout mask draw")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dropout_draw:
        body = dropout_draw_table(args.rounds)
        print(body)
        if not args.no_append:
            append_results(HEADING, body)
        return
    device = torch.device(args.device)
    if device.type == "cpu":
        from mitobench.methods.cpu_memory import keep_freed_memory

        keep_freed_memory()  # as the engine trains on the CPU
    from mitobench.methods.precision import autocast_dtype

    dtype = "bf16 autocast" if autocast_dtype(args.precision, device) is not None else "float32"
    columns = forms(dtype != "float32" and device.type == "cpu", args.options)
    rows = [f"| model (LoRA, batch {args.batch}, {dtype}) | " + " | ".join(f"{f} img/s" for f in columns)
            + " | fused / peft |", "|---" * (len(columns) + 2) + "|"]
    for key in args.models.split(","):
        models = {}
        for form, (fused, change) in columns.items():
            models[form] = build(key, fused, device, args.precision)
            if change is not None:
                change(models[form])
        best = dict.fromkeys(columns, 0.0)
        for _ in range(args.rounds):
            for form, model in models.items():
                best[form] = max(best[form], images_per_second(model, device, args.batch, args.steps, args.precision))
        rows.append(f"| {key} | " + " | ".join(f"{v:.2f}" for v in best.values())
                    + f" | {best['fused'] / best['peft forward']:.2f}x |")
        print(rows[-1], flush=True)
    body = f"device: {device.type}, torch threads {torch.get_num_threads()}\n\n" + "\n".join(rows)
    print(body)
    if not args.no_append:
        append_results(HEADING, body)


if __name__ == "__main__":
    main()
