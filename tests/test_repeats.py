"""Seed repeats (``--train-seed``, ``mitobench report --seeds``): the folds stay the paper's, only the training's
randomness changes, and the report keeps the seed variance apart from the fold SD and the bootstrap CI."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from mitobench.config import load_config
from mitobench.protocol import run_benchmark

WIDE = {"COLUMNS": "1000"}
TORCH_PROBE = {"probe.head": "torch", "probe.max_epochs": 3, "probe.patience": 3}  # seeds its init and sampler


def _run(root, tmp, **overrides):
    values = {"data_root": str(root), "cache_dir": str(tmp / "cache"), "runs_dir": str(tmp / "runs"), "n_boot": 100,
              **TORCH_PROBE, **overrides}
    return run_benchmark(load_config(None, values), console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def repeats(fixture_root, tmp_path_factory):
    """One probe recipe trained with the default seed and with train seeds 7 and 8 (one shared embedding cache)."""
    tmp = tmp_path_factory.mktemp("repeats")
    return [_run(fixture_root, tmp, train_seed=seed) for seed in (None, 7, 8)]


def test_repeats_keep_the_folds_and_change_the_training(repeats):
    default, seven, eight = repeats
    assert seven.name.endswith("-probe-seed7") and eight.name.endswith("-probe-seed8")
    assert not default.name.endswith("seed42")  # the default run is not a tagged repeat
    folds = [pd.read_csv(run / "folds.csv") for run in repeats]
    pd.testing.assert_frame_equal(folds[0], folds[1])
    pd.testing.assert_frame_equal(folds[0], folds[2])
    probs = [pd.read_csv(run / "predictions.csv")["probability"].to_numpy() for run in repeats]
    assert not np.allclose(probs[0], probs[1]) and not np.allclose(probs[1], probs[2])


def test_report_seeds_separates_seed_variance(repeats, cli, tmp_path):
    out_csv = tmp_path / "seeds.csv"
    result = cli("report", "--seeds", *map(str, repeats), "--out", str(out_csv), env=WIDE)
    assert result.returncode == 0, result.stderr
    assert "seed repeats: 3 runs of one recipe" in result.stdout
    summary = pd.read_csv(out_csv)
    metrics = [pd.read_csv(run / "metrics.csv", dtype={"fold": str}) for run in repeats]

    def value(m, dataset, fold, metric, column="value"):
        row = m[(m["dataset"] == dataset) & (m["fold"] == fold) & (m["metric"] == metric)]
        return float(row[column].iloc[0])

    assert set(summary["metric"]) == {"balanced_accuracy", "auroc"}
    assert set(summary["dataset"]) == set(metrics[0]["dataset"])  # every hold-out set and the validation folds
    for row in summary.itertuples():
        means = [value(m, row.dataset, "mean", row.metric) for m in metrics]
        assert row.n_seeds == 3
        assert row.fold_mean == pytest.approx(np.mean(means))
        assert row.seed_sd == pytest.approx(np.std(means, ddof=1))
        assert row.fold_sd == pytest.approx(np.mean([value(m, row.dataset, "sd", row.metric) for m in metrics]))
        if row.dataset == "AMi-Br-train (validation fold)":  # each fold model on its own fold: no ensemble
            assert np.isnan(row.ensemble_mean) and np.isnan(row.ci_width)
            continue
        ensembles = [value(m, row.dataset, "ensemble", row.metric) for m in metrics]
        assert row.ensemble_mean == pytest.approx(np.mean(ensembles))
        assert row.ensemble_seed_sd == pytest.approx(np.std(ensembles, ddof=1))
        assert row.ci_width == pytest.approx(np.mean([value(m, row.dataset, "ensemble", row.metric, "ci_high")
                                                      - value(m, row.dataset, "ensemble", row.metric, "ci_low")
                                                      for m in metrics]))
    assert (summary["seed_sd"] > 0).any()  # the seeds did change the models
    again = cli("report", "--seeds", *map(str, repeats), "--out", str(out_csv), env=WIDE)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten
    assert pd.read_csv(out_csv).equals(summary)


def test_report_seeds_refuses_what_is_not_a_repeat(repeats, fixture_root, cli, tmp_path_factory):
    default, seven, _ = repeats
    same = cli("report", "--seeds", str(default), str(default), env=WIDE)
    assert same.returncode == 2 and "both trained with seed 42" in same.stderr.replace("\n", " ")
    alone = cli("report", "--seeds", str(seven), env=WIDE)
    assert alone.returncode == 2 and "at least two runs" in alone.stderr.replace("\n", " ")
    no_seeds = cli("report", str(seven), "--out", "x.csv", env=WIDE)
    assert no_seeds.returncode == 2 and "add --seeds" in no_seeds.stderr
    other = _run(fixture_root, tmp_path_factory.mktemp("other"), train_seed=9, **{"probe.lr": 1e-3})
    differ = cli("report", "--seeds", str(seven), str(other), env=WIDE)
    text = " ".join(differ.stderr.split())
    assert differ.returncode == 2 and "recipes differ" in text and "probe.lr" in text
    assert "Traceback" not in differ.stderr


def test_train_seed_must_be_a_seed(fixture_root, tmp_path, cli):
    bad = cli("run", "--data-root", str(fixture_root), "--set", "train_seed=-1", env=WIDE)
    assert bad.returncode == 2 and "train_seed=-1" in bad.stderr


def test_repeats_may_differ_in_where_they_ran_but_not_in_how():
    from mitobench.config import RunConfig
    from mitobench.errors import MitobenchError
    from mitobench.evaluation.repeats import check_repeats

    check_repeats([("a", RunConfig(device="cuda:0", fold_workers=2)),
                   ("b", RunConfig(device="cuda:1", train_seed=43, runs_dir="elsewhere"))])
    with pytest.raises(MitobenchError, match="device used: 'cpu' in a, 'cuda' in b"):
        check_repeats([("a", RunConfig(device="cpu")), ("b", RunConfig(device="cuda", train_seed=43))])
    with pytest.raises(MitobenchError, match="device used: 'cpu' in a, 'cuda' in b"):  # auto, resolved per run
        check_repeats([("a", RunConfig()), ("b", RunConfig(train_seed=43))], ["cpu", "cuda"])
    with pytest.raises(MitobenchError, match="both trained with seed 43"):
        check_repeats([("a", RunConfig(seed=43)), ("b", RunConfig(train_seed=43, seed=43))])
    # a run saved with precision/dtype "auto" (before runs saved them resolved) repeats one saved resolved
    check_repeats([("old", RunConfig(dtype="auto")), ("new", RunConfig(dtype="float32", train_seed=43))], ["cpu"] * 2)
    old, new = RunConfig(method="finetune"), RunConfig(method="finetune", train_seed=43)
    new.train.precision = "fp32"
    check_repeats([("old", old), ("new", new)], ["cpu", "cpu"])
    new.train.precision = "bf16"
    with pytest.raises(MitobenchError, match="train.precision: 'fp32' in old, 'bf16' in new"):
        check_repeats([("old", old), ("new", new)], ["cpu", "cpu"])


def test_the_device_a_run_used_comes_from_its_environment(repeats, tmp_path):
    import json
    import shutil

    from mitobench.config import RunConfig
    from mitobench.evaluation.repeats import device_used

    assert device_used(repeats[0], RunConfig()) == "cpu"  # auto on this machine: no GPU in environment.json
    assert device_used(repeats[0], RunConfig(device="cuda:1")) == "cuda"
    gpu_run = shutil.copytree(repeats[1], tmp_path / "gpu_run")
    env = json.loads((gpu_run / "environment.json").read_text())
    (gpu_run / "environment.json").write_text(json.dumps({**env, "gpu": "NVIDIA H100 80GB HBM3"}))
    assert device_used(gpu_run, RunConfig()) == "cuda"


def test_a_run_with_failed_folds_is_not_a_repeat(repeats, cli, tmp_path):
    import json
    import shutil

    broken = shutil.copytree(repeats[2], tmp_path / "broken")
    status = json.loads((broken / "status.json").read_text())
    (broken / "status.json").write_text(json.dumps({**status, "failed_folds": {"3": "NaN loss"}}))
    result = cli("report", "--seeds", str(repeats[0]), str(broken), env=WIDE)
    assert result.returncode == 2 and "has failed folds (3 of 5)" in " ".join(result.stderr.split())


def test_a_resumed_repeat_keeps_its_seed(repeats, cli):
    """--resume reads the run's config.yaml: the seed is part of the recipe, and a new one is refused."""
    from mitobench.runs import load_run_config

    assert load_run_config(repeats[1]).train_seed == 7
    assert "train seed 7" in (repeats[1] / "report.txt").read_text()
    refused = cli("run", "--resume", str(repeats[1]), "--train-seed", "9", env=WIDE)
    assert refused.returncode == 2 and "--train-seed" in refused.stderr


def test_a_config_without_train_seed_still_loads(tmp_path):
    """Run folders written before train_seed existed hold no such key: they trained as train_seed None does."""
    from mitobench.config import load_config

    (tmp_path / "config.yaml").write_text("method: finetune\nseed: 42\n")
    config = load_config(tmp_path / "config.yaml")
    assert config.train_seed is None and config.fold_seed(2) == 44
