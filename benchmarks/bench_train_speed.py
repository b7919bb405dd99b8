"""Issue 4 benchmark: CPU training images/s of EfficientNet-Lite0 with mitobench's pipeline against
the reference code's pipeline, same model, same machine, one run.

Usage: .venv/bin/python benchmarks/bench_train_speed.py [--data-root ../shared/data] [--rounds 4]
       [--images-per-round 96] [--steps 12] [--freeze 3] [--workers N] [--no-append]

Every mitobench column runs in float32 and in ``train.precision=bf16`` (bf16 autocast with the depthwise
convolutions' fast backward pass; methods/precision.py, methods/depthwise.py), except the frozen-stages one,
which runs in the preset's precision.

- mitobench: decoded uint8 patches held in memory, batched tensor augmentation (dihedral, rotation,
  centre-keeping crop, colour and HED jitter, blur, resize in one grid_sample), channels-last, fused AdamW, glibc
  keeping freed memory (methods/cpu_memory.py), the batch size of ``--preset cpu``: as the engine trains; once
  as the preset trains (every weight), once with ``train.freeze_stages`` (the stem and first stages frozen,
  ``--freeze``, default 3), and once as ``--fold-workers N`` trains: N one-thread processes side by side
  (default: one per core), images/s summed.
- reference: PIL transforms per image in a torch DataLoader (RandomResizedCrop, flips, rotation,
  ColorJitter, ToTensor, Normalize), batch 8, Adam, in a process of its own, as the reference code runs.

The in-process columns and the reference (in a process of its own, idle while the others run) are timed in
alternating rounds (``interleaved``), so that a slow spell of a shared machine does not fall on one of them only. Both at 128 px and 224 px. Full training steps
(forward, backward, optimiser).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def records(data_root: str, n: int):
    from mitobench.config import RunConfig
    from mitobench.protocol import load_sets

    sets, _ = load_sets(RunConfig(data_root=data_root))
    return sets["AMi-Br-train"].iloc[:n]


def in_memory(frame) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's in-memory cache: decoded uint8 patches and labels."""
    from mitobench.data.images import decode_patch

    images = torch.from_numpy(np.stack([decode_patch(p) for p in frame["path"]]))
    return images, torch.as_tensor(frame["label"].to_numpy(), dtype=torch.float32)


def ours(images: torch.Tensor, labels: torch.Tensor, size: int, freeze: int, precision: str):
    """One training step as the engine takes it with ``--preset cpu`` (batch, augmentation, memory format, fused
    AdamW), in ``precision`` (``train.precision``); returns (step, images per step)."""
    from mitobench.methods.augment import PRESETS, BatchAugment
    from mitobench.methods.engine import Classifier, make_optimizer
    from mitobench.methods.freeze import freeze_stages
    from mitobench.methods.precision import autocast, prepare_model
    from mitobench.methods.presets import PRESETS as TRAIN_PRESETS
    from mitobench.models.registry import create_backbone

    preset = TRAIN_PRESETS["cpu"]
    batch = preset["batch_size"]
    model = Classifier(create_backbone("efficientnet_lite0"))
    freeze_stages(model, freeze)
    model = model.to(memory_format=torch.channels_last).train()
    prepare_model(model, precision, torch.device("cpu"))
    opt = make_optimizer(torch.optim.AdamW, [p for p in model.parameters() if p.requires_grad], 1e-3)
    aug = BatchAugment(PRESETS[preset["augment"]], size, seed=0)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = (aug(images[idx]) - model.backbone._mean) / model.backbone._std
        with autocast(precision, torch.device("cpu")):
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, batch


def in_process(step, per_step: int):
    """A pipeline of this process: (timed, images per step), ``timed(n)`` taking one untimed step then n timed."""
    def timed(n_steps: int) -> float:
        step()
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        return time.perf_counter() - t0

    return timed, per_step


class ReferenceProcess:
    """The reference pipeline in a process of its own, as the reference code runs (the C library's default
    allocator, none of this process's settings), taking its steps when told to."""

    def __init__(self, size: int, data_root: str):
        self.proc = subprocess.Popen([sys.executable, __file__, "--reference-worker", str(size), "--data-root", data_root],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        reply = self.proc.stdout.readline().split()
        if not reply or reply[0] != "ready":
            raise SystemExit(f"the reference process failed to start (exit code {self.proc.wait()})")
        self.per_step = int(reply[1])

    def timed(self, n_steps: int) -> float:
        self.proc.stdin.write(f"{n_steps}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.write("0\n")
        self.proc.stdin.flush()
        self.proc.wait()


def reference_worker(size: int, data_root: str) -> None:
    step, batch = reference(records(data_root, 512), size)
    step()
    print("ready", batch, flush=True)
    timed, _ = in_process(step, batch)
    while (n_steps := int(sys.stdin.readline() or 0)) > 0:
        print(timed(n_steps), flush=True)


def interleaved(pipelines: dict[str, tuple], images_per_round: int, rounds: int) -> dict[str, float]:
    """images/s of each pipeline (``timed``, images per step), timed in ``rounds`` alternating rounds of
    ``images_per_round`` images each, so that a slow spell of a shared machine falls on all of them alike."""
    seconds = dict.fromkeys(pipelines, 0.0)
    done = dict.fromkeys(pipelines, 0)
    names = list(pipelines)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            timed, per_step = pipelines[name]
            n_steps = max(1, images_per_round // per_step)
            seconds[name] += timed(n_steps)
            done[name] += n_steps * per_step
    return {name: done[name] / seconds[name] for name in names}


def fold_workers(size: int, steps: int, data_root: str, workers: int, precision: str) -> float:
    """``fold_workers``: ``workers`` one-thread processes training side by side (as the folds of a run do);
    the sum of their images/s, timed from a common start."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(size), "--steps", str(steps), "--data-root",
                               data_root, "--precision", precision], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(workers)]
    for proc in procs:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"a worker failed to start (exit code {proc.wait()})")
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    rates = [float(proc.stdout.readline()) for proc in procs]
    for proc in procs:
        proc.wait()
    return sum(rates)


def worker(size: int, steps: int, data_root: str, precision: str) -> None:
    from mitobench.methods.cpu_memory import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()  # as the engine does in each fold worker
    images, labels = in_memory(records(data_root, 512))
    step, batch = ours(images, labels, size, freeze=0, precision=precision)
    step()
    print("ready", flush=True)  # wait until every worker is warm, so that they are timed side by side
    sys.stdin.readline()
    timed, _ = in_process(step, batch)
    print(steps * batch / timed(steps), flush=True)


def reference(frame, size: int, batch: int = 8):
    """One training step of the reference code's pipeline; returns (step, images per step)."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from mitobench.methods.engine import Classifier
    from mitobench.models.registry import create_backbone

    tf = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.8, 1.0)), transforms.RandomHorizontalFlip(),
                             transforms.RandomRotation(15), transforms.ColorJitter(0.1, 0.1, 0.1, 0.02),
                             transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    class Patches(Dataset):
        def __len__(self) -> int:
            return len(frame)

        def __getitem__(self, i: int):
            row = frame.iloc[i]
            return tf(Image.open(row["path"]).convert("RGB")), torch.tensor(float(row["label"]))

    loader = DataLoader(Patches(), batch_size=batch, shuffle=True, num_workers=0)
    model = Classifier(create_backbone("efficientnet_lite0")).train()
    opt = torch.optim.Adam(model.parameters(), 5e-5, weight_decay=1e-5)
    it = iter(loader)

    def step() -> None:
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, batch


def main() -> None:
    from mitobench.methods.presets import PRESETS as TRAIN_PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("MITOBENCH_DATA", str(ROOT.parent / "shared/data")))
    parser.add_argument("--rounds", type=int, default=4, help="alternating timed rounds of the in-process pipelines")
    parser.add_argument("--images-per-round", type=int, default=96)
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each fold worker")
    parser.add_argument("--freeze", type=int, default=3, help="train.freeze_stages for the second column")
    parser.add_argument("--workers", type=int, default=None, help="processes for the fold_workers column (default: the cores)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: one fold worker at this size
    parser.add_argument("--reference-worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: the reference
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)  # internal: the worker's train.precision
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.data_root, args.precision)
    if args.reference_worker:
        return reference_worker(args.reference_worker, args.data_root)
    from mitobench.methods.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as the engine trains; the reference runs in a process of its own
    from mitobench.fold_workers import cpu_cores

    workers = args.workers or cpu_cores()
    frame = records(args.data_root, 512)
    images, labels = in_memory(frame)
    freeze = args.freeze
    preset_precision = TRAIN_PRESETS["cpu"].get("precision", "auto")
    preset_freeze = TRAIN_PRESETS["cpu"].get("freeze_stages", 0)
    rows = ["| input | `--preset cpu`, fp32 | `--preset cpu`, bf16 | + `train.freeze_stages="
            f"{freeze}` ({preset_precision}) | `--fold-workers {workers}`, fp32 (summed) | `--fold-workers {workers}`, "
            "bf16 (summed) | reference pipeline | ratios, in this order | target |",
            "|---|---|---|---|---|---|---|---|---|"]
    for size in (128, 224):
        ref_proc = ReferenceProcess(size, args.data_root)
        pipelines = {"fp32": in_process(*ours(images, labels, size, freeze=preset_freeze, precision="fp32")),
                     "bf16": in_process(*ours(images, labels, size, freeze=preset_freeze, precision="bf16")),
                     "frozen": in_process(*ours(images, labels, size, freeze=freeze, precision=preset_precision)),
                     "reference": (ref_proc.timed, ref_proc.per_step)}
        timed = interleaved(pipelines, args.images_per_round, args.rounds)
        ref_proc.close()
        del pipelines
        rates = [timed["fp32"], timed["bf16"], timed["frozen"],
                 fold_workers(size, args.steps, args.data_root, workers, "fp32"),
                 fold_workers(size, args.steps, args.data_root, workers, "bf16")]
        ref = timed["reference"]
        rows.append(f"| {size} px | " + " | ".join(f"{r:.1f}" for r in rates) + f" | {ref:.1f} | "
                    + " / ".join(f"{r / ref:.1f}x" for r in rates) + " | >= 3x |")
        print(rows[-1], flush=True)
    rows.append(f"\nimages/s of full training steps (forward, backward, optimiser); `--preset cpu` trains in "
                f"`train.precision={preset_precision}`. The in-process columns and the reference are timed in "
                f"{args.rounds} alternating rounds of {args.images_per_round} images each.")
    body = "\n".join(rows)
    print(body)
    if not args.no_append:
        append_results("## Training engine: CPU training images/s, EfficientNet-Lite0 (issue 4)", body)


if __name__ == "__main__":
    main()
