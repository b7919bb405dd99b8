"""The protocol end to end: run folder contents, never overwriting, absent sets named, resume after a kill."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from rich.console import Console

import mitobench.methods.probe as probe_mod
from mitobench.config import load_config
from mitobench.data.records import discover, evaluation_sets
from mitobench.errors import MitobenchError
from mitobench.evaluation.metrics import METRICS, NO_CI
from mitobench.protocol import run_benchmark
from mitobench.runs import RunDir
from mitobench.splits import paper_folds

HOLDOUTS = ["AMi-Br-test", "AtNorM-Br", "AtNorM-MD"]
VALIDATION = "AMi-Br-train (validation fold)"


def quiet() -> Console:
    return Console(file=io.StringIO())


def config(root: Path, tmp_path: Path, **overrides):
    values = {"data_root": str(root), "cache_dir": str(tmp_path / "cache"), "runs_dir": str(tmp_path / "runs"),
              "n_boot": 200, **overrides}
    return load_config(None, values)


def interrupt_probe_at(monkeypatch, stop: int):
    """Make the probe raise Ctrl-C when it reaches fold ``stop``; return the real ``fit_predict``."""
    real = probe_mod.ProbeMethod.fit_predict

    def interrupting(self, fold, *args, **kwargs):
        if fold == stop:
            raise KeyboardInterrupt
        return real(self, fold, *args, **kwargs)

    monkeypatch.setattr(probe_mod.ProbeMethod, "fit_predict", interrupting)
    return real


@pytest.fixture(scope="module")
def probe_run(fixture_root, tmp_path_factory):
    """One default probe run on the synthetic root (efficientnet_lite0, default recipe)."""
    tmp = tmp_path_factory.mktemp("probe_run")
    path = run_benchmark(config(fixture_root, tmp), console=quiet())
    return path, tmp


def test_run_folder_contents(probe_run, fixture_root):
    path, tmp = probe_run
    assert path.parent == tmp / "runs"
    for name in ("config.yaml", "environment.json", "folds.csv", "predictions.csv", "metrics.csv", "report.txt",
                 "status.json"):
        assert (path / name).is_file(), name
    status = json.loads((path / "status.json").read_text())
    assert status["state"] == "complete"
    env = json.loads((path / "environment.json").read_text())
    for key in ("python", "platform", "cpu", "packages", "git_commit", "gpu"):
        assert key in env
    assert env["packages"]["scikit-learn"] == "1.9.1"
    # the saved config is the resolved one, and loads back to the same options
    saved = load_config(path / "config.yaml")
    # ... with dtype auto resolved for this CPU, so predict elsewhere embeds as the run did
    assert saved.to_dict() == {**config(fixture_root, tmp).to_dict(), "dtype": "float32"}
    assert yaml.safe_load((path / "config.yaml").read_text())["model"] == "efficientnet_lite0"


def test_folds_csv(probe_run, fixture_root):
    path, _ = probe_run
    folds = pd.read_csv(path / "folds.csv")
    train = evaluation_sets(discover(fixture_root))["AMi-Br-train"]
    assert folds["image"].tolist() == train["image"].tolist()
    assert (folds["fold"].to_numpy() == paper_folds(train)).all()
    assert {"image", "group", "label", "fold"} <= set(folds.columns)


def test_predictions_csv(probe_run, fixture_root):
    path, _ = probe_run
    preds = pd.read_csv(path / "predictions.csv", dtype={"fold": str})
    assert list(preds.columns) == ["image", "dataset", "fold", "probability", "label"]
    assert preds["probability"].between(0, 1).all()
    sets = evaluation_sets(discover(fixture_root))
    for name in HOLDOUTS:
        part = preds[preds["dataset"] == name]
        assert sorted(part["fold"].unique()) == ["1", "2", "3", "4", "5", "ensemble"], name
        for fold, rows in part.groupby("fold"):
            assert sorted(rows["image"]) == sorted(sets[name]["image"]), (name, fold)
        # the ensemble is the mean probability of the 5 fold models
        wide = part.pivot(index="image", columns="fold", values="probability")
        np.testing.assert_allclose(wide["ensemble"], wide[["1", "2", "3", "4", "5"]].mean(axis=1), rtol=1e-6)
        labels = part.drop_duplicates("image").set_index("image")["label"]
        assert (labels.loc[sets[name]["image"]].to_numpy() == sets[name]["label"].to_numpy()).all()
    val = preds[preds["dataset"] == VALIDATION]
    folds = pd.read_csv(path / "folds.csv").set_index("image")["fold"]
    assert len(val) == len(sets["AMi-Br-train"]) and val["image"].is_unique
    assert (val["fold"].astype(int).to_numpy() == folds.loc[val["image"]].to_numpy()).all()


def test_metrics_csv(probe_run):
    path, _ = probe_run
    metrics = pd.read_csv(path / "metrics.csv", dtype={"fold": str})
    for col in ("dataset", "model", "method", "fold", "metric", "value", "ci_low", "ci_high"):
        assert col in metrics.columns
    assert set(metrics["metric"]) == set(METRICS)
    assert (metrics["model"] == "efficientnet_lite0").all() and (metrics["method"] == "probe").all()
    for name in HOLDOUTS:
        part = metrics[metrics["dataset"] == name]
        assert {"1", "2", "3", "4", "5", "ensemble", "mean", "sd"} <= set(part["fold"])
        ens = part[part["fold"] == "ensemble"]
        assert len(ens) == len(METRICS) and ens["ci_low"].notna().sum() == len(METRICS) - len(NO_CI)
        assert (ens["ci_unit"] == "figure").all()  # the default: figures, stratified by class
    report = (path / "report.txt").read_text()
    for name in HOLDOUTS:
        assert name in report
    assert "ABSENT" not in report
    assert "threshold 0.5 (the paper's)" in report


def test_second_run_makes_a_new_folder(probe_run, fixture_root, monkeypatch):
    path, tmp = probe_run
    before = (path / "metrics.csv").read_bytes()

    def no_build(*args, **kwargs):
        raise AssertionError("a warm run must find its embeddings without building the backbone")

    monkeypatch.setattr("mitobench.models.registry.create_backbone", no_build)
    second = run_benchmark(config(fixture_root, tmp), console=quiet())
    assert second != path and second.parent == path.parent
    assert (path / "metrics.csv").read_bytes() == before  # untouched
    # warm cache, same config: same numbers
    pd.testing.assert_frame_equal(pd.read_csv(second / "metrics.csv"), pd.read_csv(path / "metrics.csv"))


def test_warm_run_never_imports_torch(probe_run, fixture_root):
    """A warm probe run (cached embeddings, no GPU driver) needs no torch: importing it costs ~2 s of a
    ~5 s run. Checked in a fresh interpreter, since this test process has torch loaded already."""
    path, tmp = probe_run
    code = ("import sys, io; from rich.console import Console; from mitobench.config import load_config; "
            "from mitobench.protocol import run_benchmark; "
            f"c = load_config(None, {{'data_root': {str(fixture_root)!r}, 'cache_dir': {str(tmp / 'cache')!r}, "
            f"'runs_dir': {str(tmp / 'runs')!r}, 'n_boot': 200}}); "
            "out = run_benchmark(c, console=Console(file=io.StringIO())); "
            "print(out); print('torch' in sys.modules, 'timm' in sys.modules)")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the GPU-driver check then skips torch on any machine
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    run_dir, loaded = out.stdout.strip().splitlines()[-2:]
    assert loaded.split() == ["False", "False"]
    pd.testing.assert_frame_equal(pd.read_csv(Path(run_dir) / "metrics.csv"), pd.read_csv(path / "metrics.csv"))
    env_json = json.loads((Path(run_dir) / "environment.json").read_text())
    assert env_json["torch_threads"] is None and env_json["gpu"] is None
    assert json.loads((path / "environment.json").read_text())["torch_threads"] >= 1  # the cold run loaded torch


def test_parallel_probe_fits_equal_serial(probe_run, fixture_root, tmp_path):
    """Fold models fitted in forked workers give exactly the serial fits' probabilities."""
    path, tmp = probe_run
    serial = run_benchmark(config(fixture_root, tmp, **{"probe.workers": 1}), console=quiet())
    parallel = run_benchmark(config(fixture_root, tmp, **{"probe.workers": 3}), console=quiet())
    for run in (serial, parallel):
        pd.testing.assert_frame_equal(pd.read_csv(run / "predictions.csv"), pd.read_csv(path / "predictions.csv"))
    fold_info = json.loads((parallel / "fold_info.json").read_text())
    assert all(fold_info[str(f)]["fitted_in_parallel"] and fold_info[str(f)]["fit_seconds"] > 0 for f in range(1, 6))
    assert [fold_info[str(f)]["C"] for f in range(1, 6)] == [
        json.loads((serial / "fold_info.json").read_text())[str(f)]["C"] for f in range(1, 6)]


def _never_returns(fold: int) -> None:
    time.sleep(3600)


def test_a_stuck_probe_worker_falls_back_to_serial_fits(probe_run, fixture_root, monkeypatch, caplog):
    """A forked worker that never returns costs a delay, not a hung run: the pool is given up, the folds fitted
    one by one, with the same results."""
    path, tmp = probe_run
    monkeypatch.setattr(probe_mod, "PARALLEL_FIT_TIMEOUT_S", 2.0)
    monkeypatch.setattr(probe_mod, "_fit_fold_in_worker", _never_returns)
    with caplog.at_level("WARNING", logger=probe_mod.log.name):
        run = run_benchmark(config(fixture_root, tmp, **{"probe.workers": 2}), console=quiet())
    assert "stuck worker" in caplog.text
    pd.testing.assert_frame_equal(pd.read_csv(run / "predictions.csv"), pd.read_csv(path / "predictions.csv"))


_REAL_FIT_IN_WORKER = probe_mod._fit_fold_in_worker


def _fit_if_sigterm_is_default(fold: int):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        raise RuntimeError("the worker kept the parent's Python SIGTERM handler")
    return _REAL_FIT_IN_WORKER(fold)


def test_probe_workers_die_on_sigterm_whatever_the_parent_installed(probe_run, fixture_root, monkeypatch, caplog):
    """The CLI takes SIGTERM with a Python handler; forked probe workers reset it, since a worker blocked on the
    pool's queue lock may never run a Python handler and the pool would then wait for it forever."""
    from mitobench import cli

    path, tmp = probe_run
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cli._stop_on_signals(os.getpid())
    try:
        monkeypatch.setattr(probe_mod, "_fit_fold_in_worker", _fit_if_sigterm_is_default)
        with caplog.at_level("WARNING", logger=probe_mod.log.name):
            run = run_benchmark(config(fixture_root, tmp, **{"probe.workers": 2}), console=quiet())
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert "parallel probe fitting failed" not in caplog.text
    assert all(v["fitted_in_parallel"] for v in json.loads((run / "fold_info.json").read_text()).values())
    pd.testing.assert_frame_equal(pd.read_csv(run / "predictions.csv"), pd.read_csv(path / "predictions.csv"))


def test_absent_holdout_is_named(fixture_root_no_md, tmp_path):
    out = io.StringIO()
    path = run_benchmark(config(fixture_root_no_md, tmp_path), console=Console(file=out, width=200))
    report = (path / "report.txt").read_text()
    assert "AtNorM-MD" in report and "ABSENT" in report
    assert "AtNorM-MD" in out.getvalue()
    preds = pd.read_csv(path / "predictions.csv")
    assert "AtNorM-MD" not in set(preds["dataset"])
    assert {"AMi-Br-test", "AtNorM-Br"} <= set(preds["dataset"])


def test_dedup_run_reports_each_holdout_set_without_its_copies(tmp_path):
    from fixtures import make_data_root
    from test_check import reencode

    root = make_data_root(tmp_path / "root", duplicates=True)  # a byte copy, and a byte copy with another label
    br = root / "AtNorM-Br"
    reencode(br / "Normal" / "6.png", br / "Atypical" / "99.png")  # a re-encoded copy with another label
    path = run_benchmark(config(root, tmp_path, dedup=True), console=quiet())
    metrics = pd.read_csv(path / "metrics.csv")
    counts = metrics[metrics["fold"] == "ensemble"].groupby("dataset")["n"].first()
    # 16 images; dropped: the byte copy of Normal/5.png, both conflicting groups whole (3 + 2 files)
    assert counts["AtNorM-Br"] == 16 and counts["AtNorM-Br (dedup)"] == 10
    assert "AMi-Br-test (dedup)" not in counts  # a set without copies is not repeated
    preds = pd.read_csv(path / "predictions.csv")
    deduped = set(preds.loc[preds["dataset"] == "AtNorM-Br (dedup)", "image"])
    assert not deduped & {"Normal/90.png", "Normal/91.png", "Atypical/1.png", "Normal/6.png", "Atypical/99.png"}
    assert "AtNorM-Br (dedup)" in (path / "report.txt").read_text()


def test_validation_threshold_is_chosen_on_validation_fold(fixture_root, tmp_path):
    path = run_benchmark(config(fixture_root, tmp_path, threshold="validation"), console=quiet())
    info = json.loads((path / "fold_info.json").read_text())
    thresholds = [info[str(k)]["threshold"] for k in range(1, 6)]
    assert all(0 <= t <= 1 for t in thresholds)
    preds = pd.read_csv(path / "predictions.csv", dtype={"fold": str})
    from mitobench.protocol import best_threshold

    for k in range(1, 6):
        val = preds[(preds["dataset"] == VALIDATION) & (preds["fold"] == str(k))]
        assert thresholds[k - 1] == pytest.approx(best_threshold(val["label"].to_numpy(), val["probability"].to_numpy()))


def test_interrupted_probe_run_resumes_to_the_same_numbers(fixture_root, tmp_path, monkeypatch):
    reference = run_benchmark(config(fixture_root, tmp_path / "a"), console=quiet())

    real = interrupt_probe_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(config(fixture_root, tmp_path / "b"), console=quiet())
    (run,) = list((tmp_path / "b" / "runs").iterdir())
    assert RunDir(run).status()["state"] == "interrupted"
    assert not (run / "metrics.csv").exists() and not (run / "report.txt").exists()
    assert sorted(p.name for p in (run / "folds").glob("*.npz")) == ["fold_1.npz", "fold_2.npz"]

    fitted = []

    def counting(self, fold, *args, **kwargs):
        fitted.append(fold)
        return real(self, fold, *args, **kwargs)

    monkeypatch.setattr(probe_mod.ProbeMethod, "fit_predict", counting)
    resumed = run_benchmark(resume=run, console=quiet())
    assert resumed == run
    assert fitted == [3, 4, 5]  # finished folds are not redone
    assert RunDir(run).status()["state"] == "complete"
    pd.testing.assert_frame_equal(pd.read_csv(run / "metrics.csv"), pd.read_csv(reference / "metrics.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(run / "predictions.csv"), pd.read_csv(reference / "predictions.csv"))
    with pytest.raises(MitobenchError, match="already complete"):
        run_benchmark(resume=run, console=quiet())


def test_resume_refuses_folds_that_finished_on_other_data(fixture_root, fixture_root_no_md, tmp_path, monkeypatch):
    """A run started while AtNorM-MD was absent, resumed after it was fetched: its finished folds never predicted
    AtNorM-MD and their models are gone, so the resume is refused, clearly, and the run stays resumable."""
    interrupt_probe_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(config(fixture_root_no_md, tmp_path), console=quiet())
    (run,) = list((tmp_path / "runs").iterdir())
    saved = (run / "config.yaml").read_text()
    with pytest.raises(MitobenchError, match=r"fold 1 finished on other data .*new now: AtNorM-MD.*--data-root"):
        run_benchmark(resume=run, console=quiet(), relocate={"data_root": str(fixture_root)})
    assert RunDir(run).status()["state"] == "interrupted"
    assert (run / "config.yaml").read_text() == saved  # the refused --data-root is not recorded as the run's
    info = RunDir(run).load_fold(1)[1]
    assert set(info["sets"]) == {"validation", "AMi-Br-test", "AtNorM-Br"}

    # a run saved before fold signatures existed is checked on set names and sizes
    probs, info = RunDir(run).load_fold(1)
    del info["sets"]
    probs["AtNorM-Br"] = probs["AtNorM-Br"][:-1]
    RunDir(run).save_fold(1, probs, info)
    with pytest.raises(MitobenchError, match="different figures or labels now: AtNorM-Br"):
        run_benchmark(resume=run, console=quiet())


def test_resume_refuses_folds_trained_on_other_backbone_weights(fixture_root, tmp_path, monkeypatch):
    """Fold 1 finished on weights other than those the model builds with now (a mapping changed, a file replaced,
    weights gone): the resume is refused before anything trains, and the run stays resumable."""
    interrupt_probe_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(config(fixture_root, tmp_path), console=quiet())
    (run,) = list((tmp_path / "runs").iterdir())
    probs, info = RunDir(run).load_fold(1)
    assert info["backbone_weights"] not in (None, "random-init")  # the package's ImageNet weights
    RunDir(run).save_fold(1, probs, {**info, "backbone_weights": "0123456789abcdef"})
    with pytest.raises(MitobenchError, match=r"fold\(s\) 1 trained on backbone weights '0123456789abcdef', but "
                                             r"efficientnet_lite0 now builds with '[0-9a-f]{16}'"):
        run_benchmark(resume=run, console=quiet())
    assert RunDir(run).status()["state"] == "interrupted"
    RunDir(run).save_fold(1, probs, info)  # the weights as they were: the resume goes on
    monkeypatch.undo()
    assert RunDir(run_benchmark(resume=run, console=quiet())).status()["state"] == "complete"


def test_a_run_folder_one_cannot_write_in_is_one_clear_error(tmp_path, monkeypatch):
    """(Tests run as root here, so the read-only folder is simulated at the lock file's open.)"""
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("mitobench.runs.open", refuse, raising=False)
    with pytest.raises(MitobenchError, match=r"cannot write in this run folder \(Permission denied\).*write permission"):
        RunDir(tmp_path).lock()


def test_slide_bootstrap_resamples_the_slides_of_sets_that_name_them(probe_run, fixture_root, tmp_path):
    """bootstrap=slide: the ensemble's CI on AMi-Br test (every figure has its slide) resamples slides; AtNorM-Br
    names none and stays per figure; the point figures are the default run's; the report says which is which."""
    from mitobench.evaluation.metrics import cluster_bootstrap_ci
    from test_engine import load_benchmark_script

    default, _ = probe_run
    path = run_benchmark(config(fixture_root, tmp_path, bootstrap="slide"), console=quiet())
    metrics = pd.read_csv(path / "metrics.csv", dtype={"fold": str})
    ens = metrics[metrics["fold"] == "ensemble"].set_index(["dataset", "metric"])
    assert set(ens.loc["AMi-Br-test", "ci_unit"]) == {"slide"} and set(ens.loc["AtNorM-Br", "ci_unit"]) == {"figure"}
    preds = pd.read_csv(path / "predictions.csv", dtype={"fold": str})
    part = preds[(preds["dataset"] == "AMi-Br-test") & (preds["fold"] == "ensemble")]
    test = evaluation_sets(discover(fixture_root))["AMi-Br-test"]
    slides = part["image"].map(dict(zip(test["image"], test["group"]))).to_numpy()
    threshold = json.loads((path / "fold_info.json").read_text())
    threshold = float(np.mean([info["threshold"] for info in threshold.values()]))
    expected = cluster_bootstrap_ci(part["label"].to_numpy(), part["probability"].to_numpy(), slides, threshold, 200, 42)
    assert tuple(ens.loc[("AMi-Br-test", "balanced_accuracy"), ["ci_low", "ci_high"]]) == pytest.approx(
        expected["balanced_accuracy"])
    before = pd.read_csv(default / "metrics.csv", dtype={"fold": str})
    pd.testing.assert_series_equal(before["value"], metrics["value"])  # only the CIs of AMi-Br test change
    assert "95% bootstrap CI over slides (AMi-Br-test), stratified over figures (AtNorM-Br" in " ".join(
        (path / "report.txt").read_text().split())
    # benchmarks/slide_ci.py rescores a finished default run both ways: its slide CI is this run's
    rows = {(r["dataset"], r["metric"]): r for r in load_benchmark_script("slide_ci").score_run(default)}
    assert set(rows) == {("AMi-Br-test", "balanced_accuracy"), ("AMi-Br-test", "auroc")}
    row = rows[("AMi-Br-test", "balanced_accuracy")]
    assert row["slide_ci"] == pytest.approx(expected["balanced_accuracy"])
    assert row["figure_ci"] == pytest.approx(tuple(before.set_index(["dataset", "fold", "metric"]).loc[
        ("AMi-Br-test", "ensemble", "balanced_accuracy"), ["ci_low", "ci_high"]]))


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(MitobenchError, match="not a mitobench run folder"):
        run_benchmark(resume=tmp_path, console=quiet())


def test_half_written_fold_file_is_redone(tmp_path):
    run = RunDir(tmp_path)
    run.save_fold(1, {"validation": np.array([0.1, 0.9])}, {"threshold": 0.5})
    probs, info = run.load_fold(1)
    assert info == {"threshold": 0.5} and (probs["validation"] == [0.1, 0.9]).all()
    data = run.fold_file(1).read_bytes()
    run.fold_file(1).write_bytes(data[: len(data) // 2])
    assert run.load_fold(1) is None
    assert run.load_fold(2) is None


FINETUNE_YAML = {"method": "finetune", "n_boot": 200,
                 "train": {"epochs": 3, "img_size": 64, "batch_size": 8, "tta": False, "num_threads": 1}}


def finetune_config_file(fixture_root, tmp_path) -> Path:
    cfg_path = tmp_path / "ft.yaml"
    cfg_path.write_text(yaml.safe_dump({**FINETUNE_YAML, "data_root": str(fixture_root),
                                        "cache_dir": str(tmp_path / "cache")}))
    return cfg_path


def signal_run_once(cfg_path, runs: Path, tmp_path, ready: str, sig: int) -> tuple[int, str]:
    """Start `mitobench run` in a subprocess, send ``sig`` once a file matching ``ready`` (under ``runs``)
    exists; return the exit code and stderr."""
    env = {**os.environ, "MITOBENCH_QUIET": "1", "MITOBENCH_CACHE": str(tmp_path / "cache")}
    # a test runner started in the background of a non-interactive shell has SIGINT ignored, and the run (rightly)
    # keeps it so; the run under test starts with the default disposition, as from a terminal
    proc = subprocess.Popen([sys.executable, "-m", "mitobench.cli", "run", "--config", str(cfg_path),
                             "--runs-dir", str(runs)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not list(runs.glob(ready)):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, f"no {ready} in 300 s"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr.decode()


@pytest.mark.slow
def test_sigkilled_finetune_run_resumes_to_the_same_numbers(fixture_root, tmp_path, cli):
    cfg_path = finetune_config_file(fixture_root, tmp_path)
    # uninterrupted reference, in this process
    reference = run_benchmark(load_config(cfg_path, {"runs_dir": str(tmp_path / "ref")}), console=quiet())

    runs = tmp_path / "killed"
    returncode, _ = signal_run_once(cfg_path, runs, tmp_path, "*/folds/fold_*.npz", signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    (run,) = list(runs.iterdir())
    done = sorted(p.name for p in (run / "folds").glob("fold_*.npz"))
    assert done and "fold_5.npz" not in done
    assert not (run / "metrics.csv").exists() and not (run / "predictions.csv").exists()
    assert RunDir(run).status()["state"] != "complete"

    result = cli("run", "--resume", str(run), env={"MITOBENCH_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert RunDir(run).status()["state"] == "complete"
    for k in range(1, 6):
        assert (run / "folds" / f"fold_{k}" / "model.safetensors").is_file()
        assert not list((run / "folds" / f"fold_{k}").glob("*.pt"))  # resume checkpoints go once the fold is done
    ours, ref = pd.read_csv(run / "metrics.csv"), pd.read_csv(reference / "metrics.csv")
    pd.testing.assert_frame_equal(ours, ref)
    pd.testing.assert_frame_equal(pd.read_csv(run / "predictions.csv"), pd.read_csv(reference / "predictions.csv"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_marks_the_run_interrupted_and_says_how_to_resume(fixture_root, tmp_path, sig):
    """A scheduler's stop (SIGTERM) or Ctrl-C mid-fold: exit 128 + signal, status 'interrupted', the resume
    command printed."""
    runs = tmp_path / "runs"
    returncode, stderr = signal_run_once(finetune_config_file(fixture_root, tmp_path), runs, tmp_path,
                                         "*/folds/fold_1/last.pt", sig)
    (run,) = list(runs.iterdir())
    assert returncode == 128 + sig, stderr
    assert RunDir(run).status()["state"] == "interrupted"
    assert f"run folder: {run}\n" in stderr  # whole paths on one line, whatever the width
    assert f"continue with `mitobench run --resume {run}`" in stderr
    assert not (run / "metrics.csv").exists()


@pytest.mark.slow
def test_real_data_default_run(real_data, tmp_path):
    """The main job on the real data: the default probe, cold cache. Minutes; run once per test session."""
    path = run_benchmark(load_config(None, {"data_root": str(real_data), "cache_dir": str(tmp_path / "cache"),
                                            "runs_dir": str(tmp_path / "runs")}), console=quiet())
    assert RunDir(path).status()["state"] == "complete"
    folds = pd.read_csv(path / "folds.csv")
    assert folds["fold"].value_counts().sort_index().tolist() == [563, 564, 632, 571, 564]
    preds = pd.read_csv(path / "predictions.csv", dtype={"fold": str})
    ens = preds[preds["fold"] == "ensemble"]
    assert ens.groupby("dataset").size().to_dict() == {"AMi-Br-test": 826, "AtNorM-Br": 746}
    report = (path / "report.txt").read_text()
    assert "AtNorM-MD" in report and "ABSENT" in report
    metrics = pd.read_csv(path / "metrics.csv", dtype={"fold": str}).set_index(["dataset", "fold", "metric"])
    for name in ("AMi-Br-test", "AtNorM-Br"):
        # ImageNet features are a weak floor, but far above chance
        assert metrics.loc[(name, "ensemble", "auroc"), "value"] > 0.65
        assert metrics.loc[(name, "mean", "balanced_accuracy"), "value"] > 0.55
        lo, hi = metrics.loc[(name, "ensemble", "balanced_accuracy"), ["ci_low", "ci_high"]]
        assert lo < metrics.loc[(name, "ensemble", "balanced_accuracy"), "value"] < hi


def test_a_dataset_named_like_a_builtin_set_is_refused(fixture_root, tmp_path):
    """It would replace that set silently (the training split itself, or a hold-out set the paper reports)."""
    records = discover(fixture_root)["AtNorM-Br"].head(3)
    for name in ("AtNorM-Br", "AMi-Br-train", "AMi-Br-test"):
        csv = tmp_path / name / f"{name}.csv"
        csv.parent.mkdir()
        records[["path", "label"]].assign(label=records["label"].map({1: "Atypical", 0: "Normal"})).to_csv(csv, index=False)
        with pytest.raises(MitobenchError, match=f"{name!r} is already taken by a built-in set"):
            run_benchmark(config(fixture_root, tmp_path, datasets=[str(csv)]), console=quiet())
    mine = tmp_path / "a" / "mine.csv"
    mine.parent.mkdir()
    (tmp_path / "AtNorM-Br" / "AtNorM-Br.csv").rename(mine)
    twin = tmp_path / "b" / "mine.csv"
    twin.parent.mkdir()
    twin.write_bytes(mine.read_bytes())
    with pytest.raises(MitobenchError, match="already taken by another --dataset"):
        run_benchmark(config(fixture_root, tmp_path, datasets=[str(mine), str(twin)]), console=quiet())
    assert not (tmp_path / "runs").exists()  # refused before a run folder exists


def test_a_dataset_holding_copies_of_training_images_is_refused(fixture_root, tmp_path):
    from fixtures import make_custom_folder
    from test_check import reencode

    train = discover(fixture_root)["AMi-Br"].query("split == 'train'")
    mine = make_custom_folder(tmp_path / "mine")
    (mine / "Atypical" / "copy.png").write_bytes(Path(train["path"].iloc[0]).read_bytes())  # the same bytes
    reencode(Path(train["path"].iloc[3]), mine / "Normal" / "resaved.png")  # the same pixels, other bytes
    with pytest.raises(MitobenchError) as refused:
        run_benchmark(config(fixture_root, tmp_path, datasets=[str(mine)]), console=quiet())
    message = str(refused.value)
    assert "--dataset mine: 2 image(s) are copies of AMi-Br training images" in message
    assert f"copy.png = AMi-Br-train:{train['image'].iloc[0]}" in message
    assert f"resaved.png = AMi-Br-train:{train['image'].iloc[3]}" in message
    assert not (tmp_path / "runs").exists()  # refused before a run folder exists
    # without the copies the set is evaluated
    (mine / "Atypical" / "copy.png").unlink()
    (mine / "Normal" / "resaved.png").unlink()
    path = run_benchmark(config(fixture_root, tmp_path, datasets=[str(mine)]), console=quiet())
    assert "mine" in set(pd.read_csv(path / "predictions.csv")["dataset"])


def test_saved_paths_are_absolute_so_a_run_resumes_from_anywhere(fixture_root, tmp_path, monkeypatch):
    monkeypatch.chdir(fixture_root.parent)
    values = {"data_root": fixture_root.name, "cache_dir": str(tmp_path / "cache"), "runs_dir": str(tmp_path / "runs"),
              "n_boot": 50}
    real = interrupt_probe_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(load_config(None, values), console=quiet())
    (run,) = list((tmp_path / "runs").iterdir())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data_root"] == str(fixture_root.resolve()) and saved["cache_dir"] == str((tmp_path / "cache").resolve())
    monkeypatch.setattr(probe_mod.ProbeMethod, "fit_predict", real)
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative data root given at the start would not resolve here
    assert run_benchmark(resume=run, console=quiet()) == run
    assert RunDir(run).status()["state"] == "complete"


def test_environment_records_mitobench_s_own_commit_only(tmp_path, monkeypatch):
    """A package inside some other git repository (a user's project) must not record that repository's commit."""
    import shutil

    import mitobench.runs as runs_mod

    own, dirty = runs_mod.source_commit()
    package_root = Path(runs_mod.__file__).resolve().parents[2]
    if (package_root / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=package_root).stdout
        assert own == head.strip() and isinstance(dirty, bool)
    other = tmp_path / "project"
    copy = other / "vendored" / "mitobench"
    shutil.copytree(Path(runs_mod.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=other, check=True, capture_output=True)
    monkeypatch.setattr(runs_mod, "__file__", str(copy / "runs.py"))
    assert runs_mod.source_commit() == (None, None)


def test_the_run_scores_figures_by_expert_agreement(probe_run, fixture_root):
    """AMi-Br's 3 and AtNorM-MD's 5 experts' votes, read here from the label files themselves, split each set into
    unanimous and split-vote figures; AtNorM-Br has no votes and is left out."""
    from mitobench.evaluation.metrics import binary_metrics

    path, _ = probe_run
    by_agreement = pd.read_csv(path / "metrics_by_agreement.csv", dtype={"fold": str})
    assert set(by_agreement["dataset"]) == {VALIDATION, "AMi-Br-test", "AtNorM-MD"}
    assert set(by_agreement["agreement"]) == {"unanimous", "split"}
    labels = pd.read_csv(fixture_root / "AMI-BR.csv")
    experts = labels[["expert1_atypical", "expert2_atypical", "expert3_atypical"]].astype(str)
    fraction = (experts.apply(lambda c: c.str.lower() == "true")).mean(axis=1)
    fraction.index = labels["dataset"] + "_" + labels["uid"].astype(str) + ".png"
    preds = pd.read_csv(path / "predictions.csv", dtype={"fold": str})
    ens = preds[(preds["dataset"] == "AMi-Br-test") & (preds["fold"] == "ensemble")]
    threshold = np.mean([v["threshold"] for v in json.loads((path / "fold_info.json").read_text()).values()])
    split = ens["image"].map(fraction).between(0.01, 0.99)
    for group, part in (("unanimous", ens[~split]), ("split", ens[split])):
        row = by_agreement[(by_agreement["dataset"] == "AMi-Br-test") & (by_agreement["agreement"] == group)
                           & (by_agreement["fold"] == "ensemble") & (by_agreement["metric"] == "balanced_accuracy")]
        assert row["n"].item() == len(part) > 0
        assert row["value"].item() == pytest.approx(
            binary_metrics(part["label"], part["probability"], threshold)["balanced_accuracy"])
    calls = pd.read_csv(path / "calls_by_votes.csv")
    test_calls = calls[calls["dataset"] == "AMi-Br-test"].set_index("votes_atypical")
    for level, count in ens["image"].map(lambda i: f"{round(fraction[i] * 3)}/3").value_counts().items():
        assert test_calls.loc[level, "n"] == count
    md = calls[calls["dataset"] == "AtNorM-MD"]
    assert (md["experts"] == 5).all() and md["n"].sum() == (preds["dataset"] == "AtNorM-MD").sum() / 6
    raters = pd.read_csv(path / "rater_agreement.csv")
    counts = raters.groupby("dataset")["rater_a"].size().to_dict()
    assert counts == {VALIDATION: 6, "AMi-Br-test": 6, "AtNorM-MD": 15}  # 3 experts: 3 pairs + 3; 5: 10 + 5
    assert (raters.loc[raters["dataset"] == "AMi-Br-test", "n"] == len(ens)).all()
    report = (path / "report.txt").read_text()
    assert "per expert agreement" in report and "calls per vote level" in report and "one more rater" in report


def test_agreement_check_rescores_a_finished_run_as_the_run_did(probe_run):
    """benchmarks/agreement_check.py (for runs made before the agreement tables) gives the run's own tables."""
    from test_engine import load_benchmark_script

    path, _ = probe_run
    check = load_benchmark_script("agreement_check")
    by_agreement, by_votes, raters = check.score_run(path)
    written = pd.read_csv(path / "metrics_by_agreement.csv", dtype={"fold": str})
    for column in ("value", "ci_low", "ci_high"):  # probabilities pass through predictions.csv: float rounding
        np.testing.assert_allclose(by_agreement[column].to_numpy(float), written[column].to_numpy(float), atol=1e-6,
                                   equal_nan=True)
    calls = pd.read_csv(path / "calls_by_votes.csv")
    np.testing.assert_allclose(by_votes["called_atypical"], calls["called_atypical"])
    table = check.markdown(by_agreement, by_votes, raters)
    assert "| AMi-Br-test | unanimous |" in table and "| AtNorM-MD | 3/5 | Atypical |" in table
    n_val = by_agreement[(by_agreement["dataset"] == VALIDATION) & (by_agreement["agreement"] == "unanimous")
                         & (by_agreement["metric"] == "auroc") & by_agreement["fold"].str.isdigit()]["n"].sum()
    assert f"| {VALIDATION} | unanimous | {n_val} (" in table  # the 5 validation folds together, not fold 1's


def test_record_run_counts_all_validation_folds(probe_run):
    from test_engine import load_benchmark_script

    path, _ = probe_run
    folds = pd.read_csv(path / "folds.csv")
    summary = load_benchmark_script("record_run").summary(path)
    assert f"| {VALIDATION} | {len(folds)} ({int(folds['label'].sum())}) |" in summary


def test_weights_in_an_hf_snapshot_keep_their_link_so_the_config_beside_it_is_checked(fixture_root, tmp_path):
    """In the HF cache a snapshot's weights file links into blobs/; its config.json sits beside the link, not the
    blob. --weights keeps the path as given, so a config.json that contradicts the card is refused (before any
    folder, as `models check` refuses it), and the run records the snapshot path."""
    import json

    from safetensors.torch import save_file

    from mitobench.models.registry import build_model, get_card
    from mitobench.protocol import absolute_paths

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "r1"
    blobs.mkdir()
    snap.mkdir(parents=True)
    state = build_model(get_card("lunit_vits16")).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, blobs / "0f1e2d")
    (snap / "model.safetensors").symlink_to(blobs / "0f1e2d")
    given = config(fixture_root, tmp_path, model="lunit_vits16", weights=str(snap / "model.safetensors"))
    absolute_paths(given)
    assert given.weights == str(snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224",
                                                  "model_args": {"embed_dim": 768, "depth": 12, "num_heads": 12}}))
    with pytest.raises(MitobenchError, match="config.json does not match the architecture of card 'lunit_vits16'"):
        run_benchmark(config(fixture_root, tmp_path, model="lunit_vits16", weights=str(snap / "model.safetensors")),
                      console=quiet())
    assert not (tmp_path / "runs").exists()
