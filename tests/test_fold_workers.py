"""fold_workers: folds trained side by side in worker processes give the serial run's results, and a worker
that fails is reported with its log, finished folds kept."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from mitobench.config import load_config
from mitobench.errors import MitobenchError
from mitobench.fold_workers import run_folds, thread_shares
from mitobench.protocol import run_benchmark
from mitobench.runs import RunDir


def make_config(root, tmp_path, name, **train):
    values = {"data_root": str(root), "cache_dir": str(tmp_path / "cache"), "runs_dir": str(tmp_path / name),
              "method": "finetune", "n_boot": 50, "train.epochs": 1, "train.img_size": 32, "train.batch_size": 8,
              "train.num_threads": 1, **{f"train.{k}": v for k, v in train.items()}}
    return load_config(None, values)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def test_a_resumed_fold_keeps_its_planned_round_and_threads():
    from mitobench.fold_workers import planned_rounds

    assert planned_rounds(5, 2, None, 2) == [[(1, 1), (2, 1)], [(3, 1), (4, 1)], [(5, 2)]]
    assert planned_rounds(5, 2, 3, 2) == [[(1, 3), (2, 3)], [(3, 3), (4, 3)], [(5, 3)]]
    assert planned_rounds(3, 4, None, 8) == [[(1, 3), (2, 3), (3, 2)]]


def test_thread_shares_split_the_cores():
    assert thread_shares(2, 2) == [1, 1]
    assert thread_shares(2, 1) == [2]
    assert thread_shares(8, 5) == [2, 2, 2, 1, 1]
    assert thread_shares(2, 5) == [1, 1, 1, 1, 1]


def test_parallel_folds_give_the_serial_results_and_resume(fixture_root, tmp_path):
    import shutil

    serial = run_benchmark(make_config(fixture_root, tmp_path, "serial"), console=quiet())
    data = shutil.copytree(fixture_root, tmp_path / "data_before")  # moved before the resume below
    config = make_config(data, tmp_path, "parallel")
    config.fold_workers = 2
    console = quiet()
    parallel = run_benchmark(config, console=console)
    out = console.file.getvalue()
    assert "folds 1, 2 training at once (threads: 1/1)" in out and "fold 5 training (threads: 1)" in out
    for fold in range(1, 6):
        log = (parallel / "folds" / f"fold_{fold}.log").read_text()
        assert f"fold {fold}/5 done in" in log  # the worker's own output (epoch lines too, unless MITOBENCH_QUIET)
    a, b = (pd.read_csv(run / "predictions.csv") for run in (serial, parallel))
    assert len(a) == len(b) and (a["image"] == b["image"]).all()
    # one thread per fold in both runs: the same arithmetic, so the same probabilities
    np.testing.assert_allclose(b["probability"], a["probability"], rtol=0, atol=1e-6)
    assert RunDir(parallel).status()["state"] == "complete"
    assert (parallel / "report.txt").read_text().splitlines()[0] == (serial / "report.txt").read_text().splitlines()[0]

    # an interrupted run: folds 2 and 4 missing, the data moved since; a resume trains only those, in workers
    # again, which read the new data root (and the evaluation batch size changed on the way) from config.yaml
    run = RunDir(parallel)
    kept = run.fold_file(1).stat().st_mtime_ns
    for fold in (2, 4):
        run.fold_file(fold).unlink()
    run.set_status("interrupted")
    moved = data.rename(tmp_path / "data_after")
    console = quiet()
    assert run_benchmark(resume=parallel, console=console, relocate={"data_root": str(moved)},
                         adjust={"train.eval_batch_size": 7}) == parallel
    # each in its place of an uninterrupted run's rounds (1+2, 3+4, 5) and with its thread count there
    assert "fold 2 training (threads: 1)" in console.file.getvalue()
    assert "fold 4 training (threads: 1)" in console.file.getvalue()
    saved = load_config(parallel / "config.yaml")
    assert saved.data_root == str(moved.resolve()) and saved.train.eval_batch_size == 7
    assert run.fold_file(1).stat().st_mtime_ns == kept
    np.testing.assert_allclose(pd.read_csv(parallel / "predictions.csv")["probability"], a["probability"], rtol=0, atol=1e-6)


def test_a_nan_fold_in_a_worker_is_failed_not_lost(fixture_root, tmp_path):
    config = make_config(fixture_root, tmp_path, "nan", epochs=2, lr=1e30, warmup_epochs=0)
    config.fold_workers = 2
    console = quiet()
    with pytest.raises(MitobenchError, match="every fold failed"):
        run_benchmark(config, console=console)
    assert "fold 1 FAILED" in console.file.getvalue() and "nan" in console.file.getvalue().lower()


def test_a_dead_worker_is_reported_with_its_log(tmp_path):
    run = RunDir(tmp_path / "dead-run")
    run.path.mkdir()
    (run.path / "config.yaml").write_text("model: [this is not a config\n")  # damaged: the worker cannot start
    with pytest.raises(MitobenchError, match=r"(?s)fold 3: its worker exited with code [1-9].*config\.yaml") as err:
        run_folds(run, [3, 4], 2, 1, quiet())
    assert "--resume" in str(err.value) and "config.yaml is not valid YAML at line 2" in str(err.value)
    assert "Traceback" not in str(err.value)
    assert run.load_fold(3) is None


@pytest.mark.parametrize("values, message", [({"fold_workers": 0}, "fold_workers=0"),
                                              ({"fold_workers": 2, "method": "probe"}, "probe.workers")])
def test_fold_workers_are_checked(values, message):
    with pytest.raises(MitobenchError, match=message):
        load_config(None, values)


def test_workers_take_turns_on_the_gpus():
    from mitobench.fold_workers import worker_gpus

    assert worker_gpus("cuda", 4, None) == ["0", "1", "2", "3"]
    assert worker_gpus("auto", 2, "GPU-aaa,GPU-bbb") == ["GPU-aaa", "GPU-bbb"]  # the user's own choice, in its order
    assert worker_gpus("auto", 2, "3,5") == ["3", "5"]
    assert worker_gpus("cuda", 1, None) is None  # one GPU: every worker shares it
    assert worker_gpus("cuda:1", 4, None) is None  # pinned by the user
    assert worker_gpus("cpu", 4, None) is None


def test_each_worker_gets_its_gpu(fixture_root, tmp_path, monkeypatch):
    """With two GPUs the folds of a round go one to each, in turn (on this CPU machine the workers still train on
    the CPU: only the hand-out is checked)."""
    import mitobench.fold_workers as fold_workers

    asked = []
    monkeypatch.setattr(fold_workers, "_gpu_plan", lambda device: asked.append(device) or ["0", "1", "2"])
    config = make_config(fixture_root, tmp_path, "gpus")
    config.fold_workers, config.device = 2, "cpu"
    console = quiet()
    run = run_benchmark(config, console=console)
    assert asked == ["cpu"]  # the run's own device setting reaches the hand-out
    assert "fold workers take turns on 2 GPUs (CUDA_VISIBLE_DEVICES 0, 1)" in console.file.getvalue()
    for fold, gpu in zip(range(1, 6), "01010"):
        assert f"fold {fold}: CUDA_VISIBLE_DEVICES={gpu}" in (run / "folds" / f"fold_{fold}.log").read_text()


def test_the_gpu_plan_asks_torch_how_many_gpus(monkeypatch):
    import torch

    import mitobench.device
    import mitobench.fold_workers as fold_workers

    monkeypatch.setattr(mitobench.device, "device_type", lambda name: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert fold_workers._gpu_plan("auto") == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert fold_workers._gpu_plan("cuda") == ["4", "6"]
    assert fold_workers._gpu_plan("cuda:1") is None and fold_workers._gpu_plan("cpu") is None
    monkeypatch.setattr(mitobench.device, "device_type", lambda name: "cpu")  # auto without a GPU
    assert fold_workers._gpu_plan("auto") is None
