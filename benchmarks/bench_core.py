"""Issue 2 benchmark: the default job (EfficientNet-Lite0 linear probe) cold and warm, against the
reference code's way of running the same probe.

Usage: .venv/bin/python benchmarks/bench_core.py [--data-root ../shared/data] [--paper-folds 1]

1. Cold: ``mitobench run`` with an empty cache (decode PNGs, embed, fit 5 probes, evaluate).
2. Warm: the same command again (patch and embedding caches hit).
   Peak memory of each run: the whole process tree (the run plus its worker processes), sampled with psutil.
3. The paper's way, same backbone (EfficientNet-Lite0) and input size (224): inside every fold, the
   embeddings of train, validation and every hold-out image are re-extracted one image at a time
   through PIL transforms (Resize(224), ToTensor, Normalize), then the paper's head is trained
   (BCE, Adam 5e-5, batch 8, weighted sampler, early stopping on validation BA). ``--paper-folds``
   folds are measured; the 5-fold total is that time x 5 / folds measured (labelled as such).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], env: dict) -> tuple[float, dict, Path]:
    """Wall seconds, peak memory (GB) and run folder of one ``mitobench run``.

    Memory is sampled over the whole process tree (the run, its embedding workers, its forked
    probe workers): ``rss_sum`` adds the processes' RSS (shared libraries and copy-on-write pages counted
    once per process, so it overstates), ``pss_sum`` their proportional set sizes (shared pages split
    between the processes: the RAM the job really holds), ``rss_main`` the run's own process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(ROOT / ".venv/bin/mitobench"), "run", *args], env=env, stdout=out, stderr=err,
                                text=True)
        memory = _watch_memory(proc)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"mitobench run failed:\n{stdout}\n{stderr}")
    run_dir = Path(stdout.strip().splitlines()[-1].split("results:", 1)[1].strip())
    return wall, memory, run_dir


def _watch_memory(proc: subprocess.Popen) -> dict:
    """RSS every 0.1 s; PSS (reading smaps costs ~13 ms a process) every second, so the watcher itself
    takes a few percent of one core."""
    import psutil

    peak = {"rss_sum": 0, "pss_sum": 0, "rss_main": 0}
    root = psutil.Process(proc.pid)
    tick = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss = [p.memory_info().rss for p in tree]
            peak["rss_main"] = max(peak["rss_main"], rss[0])
            peak["rss_sum"] = max(peak["rss_sum"], sum(rss))
            if tick % 10 == 0:
                peak["pss_sum"] = max(peak["pss_sum"], sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:  # a process ended between listing and reading
            pass
        tick += 1
        time.sleep(0.1)
    return {k: v / 1e9 for k, v in peak.items()}


def paper_way(data_root: Path, folds_measured: int) -> dict:
    import torch
    from PIL import Image
    from torchvision import transforms

    from mitobench.config import RunConfig
    from mitobench.methods.probe import TorchProbe
    from mitobench.models.registry import create_backbone
    from mitobench.protocol import load_sets
    from mitobench.splits import paper_folds

    cfg = RunConfig(data_root=str(data_root))
    sets, _ = load_sets(cfg)
    train = sets["AMi-Br-train"]
    folds = paper_folds(train)
    backbone = create_backbone("efficientnet_lite0").eval()
    tf = transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                             transforms.Normalize(backbone.card.mean, backbone.card.std)])

    @torch.inference_mode()
    def embed_one_by_one(paths: list[str]) -> np.ndarray:
        out = []
        for p in paths:
            x = tf(Image.open(p).convert("RGB")).unsqueeze(0)
            out.append(backbone.model(x).numpy()[0])
        return np.stack(out)

    t0 = time.perf_counter()
    n_images = 0
    for fold in range(1, folds_measured + 1):
        tr, va = train[folds != fold], train[folds == fold]
        X_tr, X_va = embed_one_by_one(tr["path"].tolist()), embed_one_by_one(va["path"].tolist())
        head = TorchProbe().fit(X_tr, tr["label"].to_numpy(), X_va, va["label"].to_numpy())
        n_images += len(tr) + len(va)
        for name in [n for n in sets if n != "AMi-Br-train"]:
            head.predict_proba(embed_one_by_one(sets[name]["path"].tolist()))
            n_images += len(sets[name])
    seconds = time.perf_counter() - t0
    return {"folds_measured": folds_measured, "seconds_measured": seconds, "images_embedded": n_images,
            "five_fold_seconds": seconds * 5 / folds_measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("MITOBENCH_DATA", str(ROOT.parent / "shared/data")))
    parser.add_argument("--paper-folds", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="passed to `mitobench run --dtype` (default: auto = float32 on CPU)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MITOBENCH_CACHE": f"{tmp}/cache", "MITOBENCH_QUIET": "1"}
        common = ["--data-root", args.data_root, "--runs-dir", f"{tmp}/runs", *(["--dtype", args.dtype] if args.dtype else [])]
        cold, cold_mem, cold_dir = run_cli(common, env)
        warm, warm_mem, warm_dir = run_cli(common, env)
        timings = json.loads((cold_dir / "status.json").read_text())["timings"]
        metrics = (warm_dir / "report.txt").read_text()
        same = (cold_dir / "metrics.csv").read_text() == (warm_dir / "metrics.csv").read_text()
    paper = paper_way(Path(args.data_root), args.paper_folds)
    n = timings["n_images"]
    lines = [
        "| figure | value | target |", "|---|---|---|",
        f"| cold default run{' --dtype ' + args.dtype if args.dtype else ''}, {n} images (wall) | {cold:.1f} s | <= 240 s |",
        f"| - decode PNGs into the patch cache | {timings['decode_s']:.1f} s | |",
        f"| - embedding extraction | {timings['embed_s']:.1f} s ({n / timings['embed_s']:.0f} images/s) | |",
        f"| - probe fitting, 5 folds (C by inner grouped CV) | {timings['probe_fit_s']:.1f} s | |",
        f"| warm rerun (wall) | {warm:.1f} s | <= 20 s |",
        f"| peak memory cold / warm: PSS summed over the process tree (run + workers) | {cold_mem['pss_sum']:.2f} / {warm_mem['pss_sum']:.2f} GB | <= 3 GB |",
        f"| - RSS of the run's own process, cold / warm | {cold_mem['rss_main']:.2f} / {warm_mem['rss_main']:.2f} GB | |",
        f"| - RSS summed over the tree (shared pages counted per process) cold / warm | {cold_mem['rss_sum']:.2f} / {warm_mem['rss_sum']:.2f} GB | |",
        f"| warm metrics identical to cold | {same} | |",
        f"| paper's way, {paper['folds_measured']} fold(s) measured ({paper['images_embedded']} single-image PIL embeddings + paper head) | {paper['seconds_measured']:.1f} s | |",
        f"| paper's way, 5 folds (measured x 5 / {paper['folds_measured']}) | {paper['five_fold_seconds']:.0f} s | |",
        f"| speed-up cold | {paper['five_fold_seconds'] / cold:.1f}x | >= 10x |",
        f"| speed-up warm | {paper['five_fold_seconds'] / warm:.1f}x | >= 100x |",
    ]
    body = "\n".join(lines) + "\n\nDefault probe result (warm run's report):\n\n```\n" + metrics.strip() + "\n```"
    print(body)
    if not args.no_append:
        append_results("## Core: default probe, cold / warm / the paper's way (issue 2)", body)


if __name__ == "__main__":
    main()
