"""Metrics (atypical = positive), the vectorised bootstrap, and the tidy table."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    balanced_accuracy_score,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from mitobench.evaluation.metrics import METRICS, NO_CI, _metrics_rows, binary_metrics, bootstrap_ci
from mitobench.evaluation.published import CITATION, published_figure, published_results
from mitobench.errors import MitobenchError
from mitobench.evaluation.report import render_report, tidy_metrics
from rich.console import Console


def sklearn_metrics(y, p, thr=0.5):
    pred = (p >= thr).astype(int)
    return {
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "auroc": roc_auc_score(y, p),
        "sensitivity": recall_score(y, pred, zero_division=0),
        "specificity": recall_score(1 - y, 1 - pred, zero_division=0),
        "precision": precision_score(y, pred, zero_division=0),
        "f1": f1_score(y, pred, zero_division=0),
        "average_precision": average_precision_score(y, p),
        "mcc": matthews_corrcoef(y, pred),
        "brier": brier_score_loss(y, p),
        "ece": reference_ece(y, p),
    }


def reference_ece(y, p, n_bins=10):
    """The textbook loop: bins [0, 0.1), ..., [0.9, 1.0], each weighted by its share of the images."""
    total = 0.0
    for b in range(n_bins):
        low, high = b / n_bins, (b + 1) / n_bins
        inside = (p >= low) & ((p < high) if b < n_bins - 1 else (p <= high))
        if inside.any():
            total += inside.mean() * abs(p[inside].mean() - y[inside].mean())
    return total


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thr", [0.5, 0.3])
def test_binary_metrics_match_sklearn(seed, thr):
    rng = np.random.default_rng(seed)
    n = 50 + 20 * seed
    y = (rng.random(n) < 0.25).astype(int)
    y[:2] = [0, 1]
    p = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    if seed % 2:
        p = np.round(p, 1)  # many ties
    ours, ref = binary_metrics(y, p, thr), sklearn_metrics(y, p, thr)
    assert set(ours) == set(METRICS)
    for m in METRICS:
        assert ours[m] == pytest.approx(ref[m], abs=1e-12), m


def test_single_class_gives_nan_not_crash():
    out = binary_metrics(np.zeros(5, int), np.linspace(0, 1, 5))
    assert np.isnan(out["auroc"]) and np.isnan(out["balanced_accuracy"]) and np.isnan(out["sensitivity"])
    assert out["specificity"] == pytest.approx(2 / 5)  # 0.5, 0.75, 1.0 predicted atypical


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_rows_match_binary_metrics(seed):
    """Bootstrap rows resample with replacement (duplicated indices) and include ties."""
    rng = np.random.default_rng(seed)
    n = 40
    y = (rng.random(n) < 0.3).astype(int)
    y[:3] = [1, 0, 1]
    p = rng.random(n)
    if seed >= 2:
        p = np.round(p * 4) / 4  # heavy ties, including ties across classes
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    idx = np.concatenate([rng.choice(pos, (30, len(pos))), rng.choice(neg, (30, len(neg)))], axis=1)
    for thr in (0.5, 0.25):
        rows = _metrics_rows(y[idx], p[idx], thr)
        for b in range(idx.shape[0]):
            ref = binary_metrics(y[idx[b]], p[idx[b]], thr)
            for m in METRICS:
                assert rows[m][b] == pytest.approx(ref[m], abs=1e-10), (m, b, thr)


def test_vectorised_rows_degenerate_predictions():
    y = np.array([[0, 1, 0, 1, 0]])
    for p in (np.zeros((1, 5)), np.ones((1, 5)), np.full((1, 5), 0.5)):
        rows = _metrics_rows(y, p, 0.5)
        ref = binary_metrics(y[0], p[0], 0.5)
        for m in METRICS:
            assert rows[m][0] == pytest.approx(ref[m], abs=1e-12), m


def _data(seed=0, n=120):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.25).astype(int)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, p


def test_bootstrap_seeded_and_contains_point():
    y, p = _data()
    a = bootstrap_ci(y, p, n_boot=300, seed=7)
    b = bootstrap_ci(y, p, n_boot=300, seed=7)
    c = bootstrap_ci(y, p, n_boot=300, seed=8)
    with_ci = [m for m in METRICS if m not in NO_CI]
    assert [a[m] for m in with_ci] == [b[m] for m in with_ci]
    assert [a[m] for m in with_ci] != [c[m] for m in with_ci]
    assert all(np.isnan(a[m]).all() for m in NO_CI)  # the biased ECE gets no interval that would mislead
    point = binary_metrics(y, p)
    for m in with_ci:
        lo, hi = a[m]
        assert lo <= point[m] <= hi, m
        assert lo < hi, m


def test_bootstrap_is_stratified(monkeypatch):
    """Every replicate keeps the set's class counts."""
    import mitobench.evaluation.metrics as metrics

    y, p = _data(1)
    seen = []
    real = metrics._metrics_rows

    def spy(labels, probs, threshold):
        seen.append(labels.copy())
        return real(labels, probs, threshold)

    monkeypatch.setattr(metrics, "_metrics_rows", spy)
    metrics.bootstrap_ci(y, p, n_boot=200, seed=0)
    (labels,) = seen
    assert labels.shape == (200, len(y))
    assert (labels.sum(1) == y.sum()).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_probabilities_are_refused_not_scored(bad):
    """A NaN would count as a negative prediction and as the top score: plausible metrics from a broken model."""
    labels, probs = np.array([0, 1, 0, 1, 0, 0]), np.array([bad, 0.9, 0.3, 0.8, 0.2, 0.1])
    with pytest.raises(MitobenchError, match="1 of 6 probabilities are not finite"):
        binary_metrics(labels, probs)
    with pytest.raises(MitobenchError, match="not finite"):
        bootstrap_ci(labels, probs, n_boot=10)


def test_labels_other_than_zero_and_one_are_refused():
    with pytest.raises(MitobenchError, match=r"0 \(normal\) or 1 \(atypical\); found \[2\.0\]"):
        binary_metrics([0, 2, 0, 1], [0.1, 0.9, 0.2, 0.8])


def test_bootstrap_single_class_is_nan():
    ci = bootstrap_ci(np.ones(10, int), np.linspace(0, 1, 10), n_boot=50)
    assert all(np.isnan(lo) and np.isnan(hi) for lo, hi in ci.values())


def test_positive_class_is_atypical():
    """Label 1 (atypical) is the positive class: swapping the labels changes AP, sensitivity and precision."""
    y, p = _data(2)
    a = binary_metrics(y, p)
    b = binary_metrics(1 - y, 1 - p)
    assert a["average_precision"] == pytest.approx(average_precision_score(y, p))
    assert a["average_precision"] != pytest.approx(b["average_precision"])
    assert a["sensitivity"] == pytest.approx(b["specificity"])
    assert a["auroc"] == pytest.approx(b["auroc"])  # symmetric metrics stay
    assert binary_metrics(np.array([1, 1, 0, 0]), np.array([0.9, 0.8, 0.1, 0.2]))["sensitivity"] == 1.0
    assert binary_metrics(np.array([1, 1, 0, 0]), np.array([0.9, 0.2, 0.1, 0.2]))["sensitivity"] == 0.5


def _predictions(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, n in (("A", 40), ("B", 30)):
        y = (rng.random(n) < 0.3).astype(int)
        y[:2] = [0, 1]
        fold_probs = []
        for fold in range(1, 6):
            p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
            fold_probs.append(p)
            rows.append(pd.DataFrame({"image": np.arange(n), "dataset": dataset, "fold": str(fold),
                                      "probability": p, "label": y}))
        rows.append(pd.DataFrame({"image": np.arange(n), "dataset": dataset, "fold": "ensemble",
                                  "probability": np.mean(fold_probs, 0), "label": y}))
    return pd.concat(rows, ignore_index=True)


def test_tidy_metrics_and_report():
    preds = _predictions()
    thresholds = {str(k): 0.5 for k in range(1, 6)} | {"ensemble": 0.5}
    metrics = tidy_metrics(preds, thresholds, "efficientnet_lite0", "probe", n_boot=100, seed=0)
    for col in ("dataset", "model", "method", "fold", "metric", "value", "ci_low", "ci_high"):
        assert col in metrics
    assert set(metrics["fold"]) == {"1", "2", "3", "4", "5", "ensemble", "mean", "sd"}
    ens = metrics[metrics["fold"] == "ensemble"]
    with_ci = ens[~ens["metric"].isin(NO_CI)]
    assert with_ci["ci_low"].notna().all() and (with_ci["ci_low"] <= with_ci["value"] + 1e-12).all()
    assert ens[ens["metric"] == "ece"]["ci_low"].isna().all() and ens[ens["metric"] == "ece"]["value"].notna().all()
    assert metrics[metrics["fold"] == "1"]["ci_low"].isna().all()
    # mean/sd rows are the population mean/SD of the five fold models
    ba = metrics[(metrics["dataset"] == "A") & (metrics["metric"] == "balanced_accuracy")].set_index("fold")["value"]
    folds = ba[[str(k) for k in range(1, 6)]].to_numpy()
    assert ba["mean"] == pytest.approx(folds.mean()) and ba["sd"] == pytest.approx(folds.std(ddof=0))
    point = binary_metrics(preds.query("dataset == 'A' and fold == '2'")["label"],
                           preds.query("dataset == 'A' and fold == '2'")["probability"])
    assert ba["2"] == pytest.approx(point["balanced_accuracy"])

    text = render_report(metrics, "efficientnet_lite0", "finetune", ["A", "B"], absent=["AtNorM-MD"],
                         console=__import__("rich.console", fromlist=["Console"]).Console(file=__import__("io").StringIO()),
                         recipe="preset cpu, bf16, 128 px, 17 epochs")
    assert "efficientnet_lite0 / finetune (preset cpu, bf16, 128 px, 17 epochs)" in text
    assert "threshold 0.5 (the paper's)" in " ".join(text.split())
    tuned = render_report(metrics, "efficientnet_lite0", "finetune", ["A"], absent=[], threshold="validation",
                          console=__import__("rich.console", fromlist=["Console"]).Console(file=__import__("io").StringIO()))
    assert "chosen on each fold" in " ".join(tuned.split())
    assert "AtNorM-MD" in text and "ABSENT" in text
    assert "atypical" in text
    assert "Banerjee" in text


def test_published_figures_shipped():
    table = published_results()
    assert {"model", "method", "dataset", "bacc_mean", "bacc_std"} <= set(table.columns)
    assert "Banerjee" in CITATION and "2506.21444" in CITATION
    assert published_figure("no-such-model", "probe", "AMi-Br-test") is None
    for _, row in table.iterrows():
        method = {"LP": "probe", "E2E": "finetune", "LoRA": "lora"}[row["method"]]
        fig = published_figure(row["model"], method, row["dataset"], pretrained=row["model"] != "efficientnetv2_m")
        assert fig is not None and fig["bacc_mean"] == pytest.approx(row["bacc_mean"])


def test_published_figure_only_for_a_model_that_started_as_the_papers_did():
    """The paper fine-tuned ImageNet Swin-B and trained EfficientNetV2-M from scratch: a random-init Swin-B (a
    ``timm/`` build, or the card on random init) is not compared with the paper's ImageNet Swin-B."""
    swin = "swin_base_patch4_window7_224"
    assert published_figure(swin, "finetune", "AMi-Br-test")["bacc_mean"] == pytest.approx(0.8052, abs=1e-4)
    assert published_figure(swin, "finetune", "AMi-Br-test", pretrained=False) is None
    assert published_figure(f"timm/{swin}", "finetune", "AMi-Br-test", pretrained=False) is None
    assert published_figure("efficientnetv2_m", "finetune", "AMi-Br-test", pretrained=False) is not None
    assert published_figure("efficientnetv2_m", "finetune", "AMi-Br-test", pretrained=True) is None


def test_domain_metrics_split_each_set_by_its_domains():
    from mitobench.evaluation.report import domain_metrics, render_domain_report

    rng = np.random.default_rng(0)
    images = [f"i{k}" for k in range(60)]
    labels = np.tile([0, 0, 1], 20)
    preds = pd.concat([pd.DataFrame({"image": images, "dataset": dataset, "fold": fold, "label": labels,
                                     "probability": rng.uniform(size=60)})
                       for dataset in ("A", "B") for fold in ("1", "2", "3", "ensemble")], ignore_index=True)
    domains = {"A": {image: "X" if k < 30 else "Y" for k, image in enumerate(images)},
               "B": {image: "Z" for image in images}}  # one domain: nothing to break down
    thresholds = {"1": 0.5, "2": 0.4, "3": 0.5, "ensemble": 0.45}
    by_domain = domain_metrics(preds, domains, thresholds, "m", "probe", n_boot=50)
    assert set(by_domain["dataset"]) == {"A"} and sorted(by_domain["domain"].unique()) == ["X", "Y"]
    for domain, part in (("X", images[:30]), ("Y", images[30:])):
        expected = tidy_metrics(preds[(preds["dataset"] == "A") & preds["image"].isin(part)], thresholds, "m", "probe",
                                n_boot=50)
        got = by_domain[by_domain["domain"] == domain].drop(columns="domain").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)
    text = render_domain_report(by_domain, Console(file=io.StringIO()))
    assert "per domain" in text and " X " in text and " Y " in text
    assert domain_metrics(preds, {"B": domains["B"]}, thresholds, "m", "probe", n_boot=50).empty


def test_cluster_bootstrap_widens_the_ci_when_a_slide_s_figures_move_together():
    """Each slide's figures all right or all wrong together: the figures are not independent, and resampling
    slides shows the uncertainty that resampling figures hides. Seeded: the same CI twice."""
    from mitobench.evaluation.metrics import cluster_bootstrap_ci

    rng = np.random.default_rng(0)
    slides = np.repeat(np.arange(30), 20)
    labels = np.tile(np.r_[np.ones(5), np.zeros(15)], 30).astype(int)
    right = np.repeat(rng.random(30) < 0.7, 20)  # the slide decides
    probs = np.where(right, np.where(labels == 1, 0.9, 0.1), np.where(labels == 1, 0.1, 0.9))
    by_figure = bootstrap_ci(labels, probs, 0.5, 500, 1)["balanced_accuracy"]
    by_slide = cluster_bootstrap_ci(labels, probs, slides, 0.5, 500, 1)["balanced_accuracy"]
    assert by_slide == cluster_bootstrap_ci(labels, probs, slides, 0.5, 500, 1)["balanced_accuracy"]
    assert by_slide[1] - by_slide[0] > 3 * (by_figure[1] - by_figure[0])
    value = binary_metrics(labels, probs)["balanced_accuracy"]
    assert by_slide[0] < value < by_slide[1]
    # one figure per slide: the plain (unstratified) bootstrap, close to the stratified one
    single = cluster_bootstrap_ci(labels, probs, np.arange(len(labels)), 0.5, 2000, 1)["balanced_accuracy"]
    assert single == pytest.approx(bootstrap_ci(labels, probs, 0.5, 2000, 1)["balanced_accuracy"], abs=0.02)
    with pytest.raises(ValueError, match="cluster ids"):
        cluster_bootstrap_ci(labels, probs, slides[:-1])
