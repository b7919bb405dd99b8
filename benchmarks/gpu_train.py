"""Issue 4 GPU benchmark (needs CUDA): LoRA training steps on the Virchow2 architecture (ViT-H/14,
random weights, 224 px) with mitobench's engine pipeline against the reference way; plus a full
fine-tuning step of swin_base_patch4_window7_224 and of the
default EfficientNet-Lite0 (224 px).

- mitobench: uint8 128-px patches already on the GPU -> the engine's batched augmentation (the cpu
  preset's ``strong`` augmentation, resized to 224) -> normalise -> bf16 autocast, batch 64.
- reference (the paper's code): fp32, batch 8, peft's own LoRA layers, inputs already made (its per-image PIL
  pipeline is not even counted, which favours the reference).
- for LoRA also the engine step with peft's forward instead of the fused layers (``train.fused_lora=false``).

Usage: python benchmarks/gpu_train.py [--steps 10] [--batch 64] [--no-append] [--only virchow2]
                                     [--variants virchow2 [--profile] [--diagnostics] [--compile-mode MODE]]
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
from mitobench.methods.compile import compile_model  # noqa: E402
from mitobench.methods.engine import make_optimizer  # noqa: E402
from mitobench.methods.precision import prepare_model  # noqa: E402

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
    model = (lora if method == "lora" else finetune).prepare(model, cfg)
    # as the engine's TrainMethod.prepare: on CUDA the frozen weights are stored in bf16 (autocast's dtype)
    return prepare_model(model, "auto", device).to(device).train()


@contextmanager
def with_peft_forward(model: torch.nn.Module) -> Iterator[int]:
    """Within the block the LoRA layers run peft's own forward (as ``train.fused_lora=false``); yield how many."""
    from mitobench.methods.fused_lora import _FusedLoraForward

    swapped = [(m, type(m)) for m in model.modules() if isinstance(m, _FusedLoraForward)]
    for module, cls in swapped:
        module.__class__ = cls.__bases__[1]
    try:
        yield len(swapped)
    finally:
        for module, cls in swapped:
            module.__class__ = cls


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


def measure(model, device: torch.device, batch: int, steps: int, fast: bool, size: int = 224,
            input_grad: bool = False) -> tuple[float, float]:
    """Images/s and peak GB of training steps. ``fast``: the engine's step (GPU augmentation, bf16 autocast, fused
    AdamW, the non-finite-loss flag read every 16 steps); else the reference (fp32 inputs made beforehand).
    ``input_grad``: the input requires a gradient, so the backward pass runs through every block even when
    nothing in the backbone trains (a diagnostic: the backbone's forward and input-gradient work without adapters;
    on the H100 it was not faster than LoRA without dropout, so it does not bound the adapters' cost)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(torch.optim.AdamW, [{"params": params}], 1e-4) if fast else torch.optim.AdamW(params, 1e-4)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    n_steps = 0
    y = torch.randint(0, 2, (batch,), device=device).float()
    if fast:
        patches = torch.randint(0, 256, (batch, 128, 128, 3), dtype=torch.uint8, device=device)
        augment = BatchAugment(PRESETS["strong"], size, seed=0)
        mean, std = model.backbone._mean.to(device), model.backbone._std.to(device)
    else:
        x_ref = torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        nonlocal nonfinite, n_steps
        x = (augment(patches) - mean) / std if fast else x_ref
        if input_grad:
            x = x.detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
        n_steps += 1
        if fast:
            nonfinite |= ~torch.isfinite(loss)
            if n_steps % 16 == 0 and nonfinite:
                raise RuntimeError("non-finite loss")
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
    ``train.compile`` (regional, in place) at the batch and at twice it; for LoRA also with peft's forward instead
    of the fused layers (``train.fused_lora=false``), and, as diagnostics, without
    its dropout and with nothing trainable in the backbone (see ``measure``'s ``input_grad``)."""

    def show(label: str, batch: int, input_grad: bool = False) -> None:
        try:
            v, v_mem = measure(model, device, batch, args.steps, fast=True, input_grad=input_grad)
            print(f"| {key} {method} {label} | {v:.1f} | {v_mem:.1f} | {v / reference:.1f}x |", flush=True)
        except torch.OutOfMemoryError:
            print(f"| {key} {method} {label} | out of memory | | |", flush=True)
        except Exception as exc:  # noqa: BLE001 - a compile failure of one variant must not cost the others
            print(f"| {key} {method} {label} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]} | | |",
                  flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # each variant is a recompilation of the same block code
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 32)
    t0 = time.perf_counter()
    regions = compile_model(model, args.compile_mode)
    mode = f" mode {args.compile_mode}" if args.compile_mode else ""
    show(f"train.compile{mode} ({regions} regions), batch {args.batch}", args.batch)
    print(f"(compiled and timed in {time.perf_counter() - t0:.0f} s)", flush=True)
    if method == "lora":
        with with_peft_forward(model) as n_layers:
            if n_layers:
                show(f"train.compile{mode}, peft's LoRA forward (train.fused_lora false), batch {args.batch}", args.batch)
    if args.profile:
        try:
            profile(model, device, args.batch)
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            print(f"(profile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]})", flush=True)
    show(f"train.compile{mode}, batch {args.batch * 2}", args.batch * 2)
    if method == "lora" and args.diagnostics:
        with without_lora_dropout(model) as n_dropouts:
            if n_dropouts:
                show(f"train.compile, lora_dropout 0, batch {args.batch}", args.batch)
        adapters = [p for name, p in model.named_parameters() if "lora_" in name]
        for p in adapters:
            p.requires_grad_(False)
        show(f"train.compile, no adapter (input gradient only), batch {args.batch}", args.batch, input_grad=True)
        for p in adapters:
            p.requires_grad_(True)


def profile(model, device: torch.device, batch: int) -> None:
    """Print where the GPU time of a few engine steps goes: kernel classes, then the top kernels."""
    if device.type != "cuda":
        print("(profile: CUDA only)")
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        measure(model, device, batch, 3, fast=True)
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in events) or 1
    classes = {"matmul": ("gemm", "sm90", "cutlass", "nvjet", "cublas", "matmul"), "attention": ("flash", "fmha", "attention"),
               "triton (fused)": ("triton",)}
    spent = {name: 0.0 for name in [*classes, "other"]}
    for e in events:
        cls = next((c for c, keys in classes.items() if any(k in e.key.lower() for k in keys)), "other")
        spent[cls] += e.self_device_time_total
    print("GPU time by kernel class (profiled steps, incl. warm-up): " +
          ", ".join(f"{c} {t / total:.0%}" for c, t in spent.items()), flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:20]:
        print(f"  {e.self_device_time_total / total:6.1%} x{e.count:<5d} {e.key[:110]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="depth-reduced replicas, tiny counts (script check only)")
    parser.add_argument("--variants", default="", help="comma-separated keys also timed with frozen bf16 weights and "
                        "torch.compile (and, for LoRA, batch x2 and lora_dropout 0)")
    parser.add_argument("--only", default="", help="comma-separated keys: time only these workloads")
    parser.add_argument("--profile", action="store_true", help="with --variants: print where the compiled step's GPU time goes")
    parser.add_argument("--diagnostics", action="store_true", help="with --variants: LoRA without dropout, and the floor")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode of the variants (train.compile_mode)")
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
    workloads = [(k, m) for k, m in WORKLOADS if not args.only or k in args.only.split(",")]
    for key, method in workloads:
        model = build(key, method, device, args.smoke)
        fast, fast_mem = measure(model, device, args.batch, args.steps, fast=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if method == "lora":  # the same engine step with peft's LoRA forward (train.fused_lora=false)
            with with_peft_forward(model):
                unfused, unfused_mem = measure(model, device, args.batch, args.steps, fast=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        model.float()  # the reference trains in float32 throughout (the engine stored frozen weights in bf16)
        with with_peft_forward(model):  # and with peft's own LoRA layers, as the paper's code
            slow, slow_mem = measure(model, device, 8 if not args.smoke else 1, args.steps * 2, fast=False)
        references[key] = slow
        rows.append(f"| {key} {method} (batch {args.batch}) | {fast:.1f} | {fast_mem:.1f} | {slow:.1f} | {slow_mem:.1f} | {fast / slow:.1f}x |")
        print(rows[-1], flush=True)
        if method == "lora":
            rows.append(f"| {key} {method} (batch {args.batch}), peft's LoRA forward (train.fused_lora false) | {unfused:.1f} "
                        f"| {unfused_mem:.1f} | {slow:.1f} | {slow_mem:.1f} | {unfused / slow:.1f}x |")
            print(rows[-1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    body = f"GPU: {name}, torch {torch.__version__}\n\n" + "\n".join(rows)
    print(body)
    if not args.no_append:  # before the variants: their compilations are slow, and a time limit must not lose this table
        append_results("## Training engine: GPU LoRA / fine-tuning steps (issue 4)", body)
    for key, method in workloads:
        if key in args.variants.split(","):
            time_variants(build(key, method, device, args.smoke), key, method, device, args, references[key])


if __name__ == "__main__":
    main()
