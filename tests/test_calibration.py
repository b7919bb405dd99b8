"""Platt calibration (``calibration: platt``): probabilities mean the prevalence, decisions and AUROC stay, and
``predict`` applies the same map."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from mitobench.config import load_config
from mitobench.errors import MitobenchError
from mitobench.evaluation.calibration import apply_platt, calibrate_fold, fit_platt
from mitobench.evaluation.metrics import binary_metrics
from mitobench.predict import predict
from mitobench.protocol import run_benchmark


def balanced_scores(n=4000, prevalence=0.2, seed=0):
    """Scores of a model trained for balanced classes: about 0.5 on average although 20 % are positive."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(int)
    logits = rng.normal(1.5 * labels - 0.75, 1.0)
    return labels, 1 / (1 + np.exp(-logits))


def test_platt_brings_the_probabilities_to_the_prevalence_and_keeps_the_ranking():
    labels, probs = balanced_scores()
    params = fit_platt(labels, probs)
    calibrated = apply_platt(probs, params)
    assert probs.mean() > 0.4 and calibrated.mean() == pytest.approx(labels.mean(), abs=0.01)
    before, after = binary_metrics(labels, probs), binary_metrics(labels, calibrated)
    assert after["ece"] < 0.03 < before["ece"] and after["brier"] < before["brier"]
    assert after["auroc"] == pytest.approx(before["auroc"], abs=1e-12)
    held_labels, held = balanced_scores(seed=1)  # a fresh sample of the same population: calibrated there too
    assert binary_metrics(held_labels, apply_platt(held, params))["ece"] < 0.03


@pytest.mark.parametrize("threshold", [0.5, 0.37])
def test_the_threshold_is_mapped_so_every_decision_stays(threshold):
    labels, probs = balanced_scores(seed=2)
    sets = {"validation": probs, "holdout": balanced_scores(seed=3)[1], "validation_by_epoch": probs[None]}
    mapped, new_threshold, _ = calibrate_fold(sets, labels, threshold)
    for name in ("validation", "holdout"):
        np.testing.assert_array_equal(mapped[name] >= new_threshold, sets[name] >= threshold)
    assert mapped["validation_by_epoch"] is sets["validation_by_epoch"]  # analyses of the raw scores keep them


def test_a_model_that_ranks_backwards_gets_a_prior_shift_only():
    """No increasing map fits scores that rank the classes backwards: the slope stays 1, the mean is matched."""
    labels, probs = balanced_scores()
    params = fit_platt(labels, 1 - probs)
    assert params["a"] == 1.0 and params["shift_only"]
    assert apply_platt(1 - probs, params).mean() == pytest.approx(labels.mean(), abs=0.005)  # the log loss's optimum
    with pytest.raises(MitobenchError, match="both classes"):
        fit_platt(np.zeros(10, int), np.linspace(0.1, 0.9, 10))


def _run(root, tmp, **overrides):
    values = {"data_root": str(root), "cache_dir": str(tmp / "cache"), "runs_dir": str(tmp / "runs"), "n_boot": 50,
              **overrides}
    return run_benchmark(load_config(None, values), console=Console(file=io.StringIO()))


def test_a_calibrated_run_decides_as_the_plain_one_and_predict_agrees(fixture_root, tmp_path):
    plain, calibrated = _run(fixture_root, tmp_path), _run(fixture_root, tmp_path, calibration="platt")
    m = {name: pd.read_csv(run / "metrics.csv", dtype={"fold": str}).set_index(["dataset", "fold", "metric"])["value"]
         for name, run in (("plain", plain), ("platt", calibrated))}
    folds = [key for key in m["plain"].index if key[1].isdigit() and key[2] in ("balanced_accuracy", "auroc")]
    np.testing.assert_allclose(m["platt"].loc[folds].to_numpy(), m["plain"].loc[folds].to_numpy(), atol=1e-9)
    info = json.loads((calibrated / "fold_info.json").read_text())
    for fold, fold_info in info.items():
        assert fold_info["calibration"]["method"] == "platt" and fold_info["calibration"]["a"] > 0
        assert fold_info["calibration"]["threshold_before"] == 0.5 and fold_info["threshold"] != 0.5
    report = " ".join((calibrated / "report.txt").read_text().split())
    assert "Platt-calibrated on each validation fold" in report
    assert "its Platt-mapped threshold on the calibrated one; the ensemble's at their mean" in report
    assert "Platt-mapped" not in (plain / "report.txt").read_text()
    # benchmarks/calibration_check.py, applied to the plain run's saved probabilities, gives the calibrated run's
    from test_engine import load_benchmark_script

    check = load_benchmark_script("calibration_check")
    plain_info = json.loads((plain / "fold_info.json").read_text())
    thresholds = {f: v["threshold"] for f, v in plain_info.items()}
    redone, mapped = check.calibrated_predictions(pd.read_csv(plain / "predictions.csv", dtype={"fold": str}),
                                                  {**thresholds, "ensemble": 0.5})
    trained = pd.read_csv(calibrated / "predictions.csv", dtype={"fold": str})
    # the same fit up to the solver's tolerance (its rows come in predictions.csv's order, not the run's)
    np.testing.assert_allclose(redone["probability"].to_numpy(), trained["probability"].to_numpy(), atol=1e-5)
    assert all(mapped[f] == pytest.approx(v["threshold"]) for f, v in info.items())
    _, table = predict(calibrated, fixture_root / "AtNorM-Br", tmp_path / "p.csv", cache_dir=str(tmp_path / "cache"))
    preds = pd.read_csv(calibrated / "predictions.csv", dtype={"fold": str})
    ensemble = preds[(preds["dataset"] == "AtNorM-Br") & (preds["fold"] == "ensemble")].set_index("image")["probability"]
    np.testing.assert_allclose(table.set_index("image")["p_ensemble"].loc[ensemble.index].to_numpy(),
                               ensemble.to_numpy(), atol=1e-5)


def test_an_unknown_calibration_is_refused():
    with pytest.raises(MitobenchError, match="calibration='isotonic' is unknown"):
        load_config(None, {"calibration": "isotonic"})
