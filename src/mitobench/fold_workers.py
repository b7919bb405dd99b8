"""Train several folds at once, each in its own process with a share of the CPU cores (``fold_workers``).

A small CNN parallelises badly inside one training step: on 2 cores, EfficientNet-Lite0 at 128 px in bf16 trains
at 114-118 images/s as one 2-thread process but at 127-142 (summed) as two 1-thread processes
(benchmarks/bench_train_speed.py, benchmarks/RESULTS.md 2026-11-27).
Folds are independent, so running them side by side changes nothing in the recipe. Folds go in rounds of
``workers``: a round's folds split the cores between them (the last, smaller round gets more threads each)
and the next round starts when the whole round is done.

Each worker is a plain ``python -c`` subprocess (as in ``embed_workers``: it never re-runs the caller's
``__main__`` and never inherits torch's thread pools) that reads the run folder's ``config.yaml``,
rebuilds the context from the patch cache, trains its fold and saves it in the run folder exactly as the
serial loop does. Its output goes to ``folds/fold_N.log``. A worker that dies is reported with that log's
end once its round has finished; finished folds are kept and ``--resume`` retries the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from mitobench.errors import MitobenchError
from mitobench.runs import RunDir, load_run_config


def cpu_cores() -> int:
    """Cores this process may use (the affinity mask where the OS has one, e.g. under taskset or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_shares(cores: int, n: int) -> list[int]:
    """Split ``cores`` between ``n`` processes as evenly as possible, at least one thread each."""
    return [max(1, cores // n + (1 if i < cores % n else 0)) for i in range(n)]


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def worker_gpus(device: str, n_gpus: int, visible: str | None) -> list[str] | None:
    """The GPUs fold workers take turns on, as ``CUDA_VISIBLE_DEVICES`` values: every GPU torch sees when the run's
    device is ``auto`` or ``cuda`` and there are several (each fold then trains alone on its GPU, with the code and
    numbers of a one-GPU run); None (every worker sees what this process sees) for one GPU, the CPU, or an explicit
    ``cuda:N``, which pins all workers to that GPU. ``visible``: this process's own ``CUDA_VISIBLE_DEVICES``, whose
    entries (indices or UUIDs) are handed out in its order."""
    if device not in ("auto", "cuda") or n_gpus < 2:
        return None
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else []
    return entries[:n_gpus] if len(entries) >= n_gpus else [str(i) for i in range(n_gpus)]


def _gpu_plan(device: str) -> list[str] | None:
    from mitobench.device import device_type

    if device_type(device) != "cuda":
        return None
    import torch

    return worker_gpus(device, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def planned_rounds(n_folds: int, workers: int, num_threads: int | None, cores: int) -> list[list[tuple[int, int]]]:
    """Rounds of ``(fold, threads)`` of a whole run: folds 1..n in order, ``workers`` at a time, the cores shared out
    within each round. A fold's thread count is part of its arithmetic, so a resumed fold keeps its planned one."""
    rounds = []
    for start in range(1, n_folds + 1, workers):
        batch = list(range(start, min(start + workers, n_folds + 1)))
        shares = [num_threads] * len(batch) if num_threads else thread_shares(cores, len(batch))
        rounds.append(list(zip(batch, shares)))
    return rounds


def run_folds(run: RunDir, folds: list[int], workers: int, num_threads: int | None, console: Console,
              n_folds: int | None = None, device: str = "cpu") -> None:
    """Train ``folds`` of ``run`` in the rounds of ``planned_rounds`` (only the given folds of each; a resumed run
    trains each fold as an uninterrupted run would, in its round's place, with its thread count); each worker saves
    its fold in the run folder. ``num_threads`` (``train.num_threads``) fixes each worker's threads; None shares
    out the cores."""
    failures: list[str] = []
    running: list[tuple[int, subprocess.Popen, Path]] = []
    plan = planned_rounds(n_folds or max(folds), workers, num_threads, cpu_cores())
    gpus = (_gpu_plan(device) or [])[:workers]  # as many as train at once
    if gpus:
        console.print(f"fold workers take turns on {len(gpus)} GPUs (CUDA_VISIBLE_DEVICES {', '.join(gpus)})",
                      markup=False, highlight=False)
    try:
        for planned in plan:
            batch = [fold for fold, _ in planned if fold in folds]
            shares = [threads for fold, threads in planned if fold in folds]
            if not batch:
                continue
            for slot, (fold, threads) in enumerate(zip(batch, shares)):
                gpu = gpus[slot % len(gpus)] if gpus else None
                running.append((fold, *_launch(run, fold, threads, gpu)))
            what = f"folds {', '.join(map(str, batch))} training at once" if len(batch) > 1 else f"fold {batch[0]} training"
            console.print(f"{what} (threads: {'/'.join(map(str, shares))}); progress in {run.path / 'folds'}/fold_N.log",
                          markup=False,
                          soft_wrap=True)
            for fold, proc, log in running:
                code = proc.wait()
                saved = run.load_fold(fold)
                if code != 0 or saved is None:
                    failures.append(f"fold {fold}: its worker exited with code {code}; the end of {log}:\n{_log_tail(log)}")
                elif saved[1].get("failed"):
                    console.print(f"[bold red]fold {fold} FAILED:[/] {escape(str(saved[1]['failed']))}")
                else:
                    console.print(f"fold {fold} done in {saved[1].get('seconds', 0):.1f}s")
            running = []
            if failures:
                break
    except BaseException:
        for _, proc, _ in running:  # interrupted: stop the workers; their last epoch checkpoints stay for --resume
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in running:
            proc.wait()
        raise
    if failures:
        raise MitobenchError("a fold worker failed; finished folds are kept, so fix the cause and continue with "
                             f"`mitobench run --resume {run.path}`.\n" + "\n".join(failures))


def _launch(run: RunDir, fold: int, threads: int, gpu: str | None = None) -> tuple[subprocess.Popen, Path]:
    log = run.scratch(fold).parent / f"fold_{fold}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if gpu is not None:  # the worker sees one GPU, as its cuda:0
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(log, "ab") as out:  # appended: a resumed fold's log keeps what came before
        proc = subprocess.Popen([sys.executable, "-c", "from mitobench.fold_workers import serve; serve()",
                                 str(run.path), str(fold), str(threads)], stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, log


def serve() -> None:
    """Worker entry point: ``RUN_DIR FOLD THREADS`` on the command line."""
    import torch

    from mitobench.protocol import build_context, fit_fold, load_sets, make_method
    from mitobench.splits import paper_folds

    run_path, fold, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        print(f"fold {fold}: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}", flush=True)
    try:
        config = load_run_config(run_path)
        config.train.num_threads = threads
        method = make_method(config)
        sets, _ = load_sets(config)
        folds = paper_folds(sets["AMi-Br-train"], config.n_folds, config.seed)
        ctx = build_context(config, sets, folds)
        method.prepare(ctx)
        fit_fold(method, ctx, RunDir(run_path), fold, Console(stderr=True))
    except MitobenchError as exc:  # a clear error needs no traceback; anything else keeps its own
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
