"""Scores by expert agreement: unanimous against split-vote figures, and the ensemble's calls per vote level."""

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from mitobench.evaluation.agreement import (agreement_metrics, agreement_of, calls_by_votes, experts_behind,
                                            render_agreement_report, vote_levels)
from mitobench.evaluation.report import tidy_metrics


def test_vote_levels_read_the_number_of_experts_from_the_fractions():
    thirds = pd.Series([0, 1 / 3, 2 / 3, 1, np.nan], index=list("abcde"))
    assert experts_behind(thirds) == 3
    assert vote_levels(thirds).iloc[:4].tolist() == ["0/3", "1/3", "2/3", "3/3"] and pd.isna(vote_levels(thirds)["e"])
    fifths = pd.Series([0.0, 0.2, 0.6, 0.8, 1.0])
    assert experts_behind(fifths) == 5 and vote_levels(fifths).tolist() == ["0/5", "1/5", "3/5", "4/5", "5/5"]
    assert experts_behind(pd.Series([np.nan, np.nan])) == 1
    assert agreement_of(thirds).iloc[:4].tolist() == ["unanimous", "split", "split", "unanimous"]
    assert pd.isna(agreement_of(thirds)["e"])


def _predictions(rng):
    """Set A with 3 experts' votes (every level), set B without votes; 3 fold models and their ensemble."""
    images = [f"i{k}" for k in range(80)]
    votes = np.tile([0, 1 / 3, 2 / 3, 1], 20)
    labels = (votes > 0.5).astype(int)
    preds = pd.concat([pd.DataFrame({"image": images, "dataset": dataset, "fold": fold, "label": labels,
                                     "probability": np.clip(votes + rng.normal(0, 0.3, 80), 0, 1)})
                       for dataset in ("A", "B") for fold in ("1", "2", "3", "ensemble")], ignore_index=True)
    return preds, images, {"A": pd.Series(votes, index=images), "B": pd.Series(np.nan, index=images)}


def test_agreement_metrics_score_unanimous_and_split_figures_apart():
    preds, images, votes = _predictions(np.random.default_rng(0))
    thresholds = {"1": 0.5, "2": 0.4, "3": 0.5, "ensemble": 0.45}
    by_agreement = agreement_metrics(preds, votes, thresholds, "m", "probe", n_boot=50)
    assert set(by_agreement["dataset"]) == {"A"}  # B has no votes: left out, not called unanimous
    assert sorted(by_agreement["agreement"].unique()) == ["split", "unanimous"]
    for group, keep in (("unanimous", images[0::4] + images[3::4]), ("split", images[1::4] + images[2::4])):
        expected = tidy_metrics(preds[(preds["dataset"] == "A") & preds["image"].isin(keep)], thresholds, "m",
                                "probe", n_boot=50)
        got = by_agreement[by_agreement["agreement"] == group].drop(columns="agreement").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)
    text = render_agreement_report(by_agreement, pd.DataFrame(), console=Console(file=io.StringIO()))
    assert "per expert agreement" in text and "unanimous" in text and "split" in text


def test_calls_by_votes_count_the_ensembles_calls_at_each_level():
    preds, images, votes = _predictions(np.random.default_rng(1))
    thresholds = {"1": 0.5, "2": 0.5, "3": 0.5, "ensemble": 0.45}
    table = calls_by_votes(preds, votes, thresholds)
    assert table["dataset"].tolist() == ["A"] * 4
    assert table["votes_atypical"].tolist() == ["0/3", "1/3", "2/3", "3/3"]
    assert table["label"].tolist() == [0, 0, 1, 1] and (table["experts"] == 3).all()
    ens = preds[(preds["dataset"] == "A") & (preds["fold"] == "ensemble")].reset_index(drop=True)
    for level, row in enumerate(table.itertuples(index=False)):
        part = ens.iloc[level::4]
        assert row.n == len(part) == 20
        assert row.called_atypical == pytest.approx(float((part["probability"] >= 0.45).mean()))
        assert row.mean_probability == pytest.approx(float(part["probability"].mean()))
        assert 0 <= row.ci_low <= row.called_atypical <= row.ci_high <= 1
    assert table["model"].unique().tolist() == ["ensemble"]
    text = render_agreement_report(pd.DataFrame(), table, console=Console(file=io.StringIO()))
    assert "calls per vote level" in text and "2/3" in text and "Atypical" in text


def test_calls_on_the_validation_folds_use_each_images_fold_model_and_its_threshold():
    images = [f"v{k}" for k in range(8)]
    votes = {"val": pd.Series([0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1], index=images)}
    preds = pd.DataFrame({"image": images, "dataset": "val", "fold": ["1", "2"] * 4,
                          "label": [0, 0, 0, 0, 1, 1, 1, 1],
                          "probability": [0.1, 0.45, 0.6, 0.3, 0.42, 0.49, 0.8, 0.44]})
    table = calls_by_votes(preds, votes, {"1": 0.4, "2": 0.5})  # fold 1 calls >= 0.4, fold 2 >= 0.5
    assert table["called_atypical"].tolist() == [0.0, 0.5, 0.5, 0.5]
    assert table["model"].unique().tolist() == ["fold models"]


def test_no_votes_anywhere_gives_empty_tables():
    preds, images, votes = _predictions(np.random.default_rng(2))
    none = {"B": votes["B"]}
    assert agreement_metrics(preds, none, {"ensemble": 0.5}, "m", "probe", n_boot=20).empty
    assert calls_by_votes(preds, none, {"ensemble": 0.5}).empty
    assert render_agreement_report(pd.DataFrame(), pd.DataFrame(), console=Console(file=io.StringIO())) == ""


def test_rater_agreement_scores_the_model_as_one_more_expert():
    from sklearn.metrics import cohen_kappa_score

    from mitobench.evaluation.agreement import kappa_summary, rater_agreement

    rng = np.random.default_rng(3)
    images = [f"i{k}" for k in range(60)]
    experts = rng.integers(0, 2, size=(60, 3))
    codes = pd.Series(["".join(map(str, row)) for row in experts], index=images)
    label = (experts.sum(axis=1) >= 2).astype(int)
    probability = rng.uniform(size=60)
    preds = pd.DataFrame({"image": images, "dataset": "A", "fold": "ensemble", "label": label,
                          "probability": probability})
    raters = rater_agreement(preds, {"A": codes, "B": pd.Series(np.nan, index=images, dtype=object)},
                             {"ensemble": 0.4})
    assert set(raters["dataset"]) == {"A"} and len(raters) == 6  # 3 expert pairs + the model with each expert
    model = (probability >= 0.4).astype(int)
    for row in raters.itertuples(index=False):
        a = model if row.rater_a == "model" else experts[:, int(row.rater_a[-1]) - 1]
        b = model if row.rater_b == "model" else experts[:, int(row.rater_b[-1]) - 1]
        assert row.kappa == pytest.approx(cohen_kappa_score(a, b)) and row.n == 60
    summary = kappa_summary(raters).iloc[0]
    assert summary["experts"] == 3
    assert summary["model_mean"] == pytest.approx(raters.loc[raters["rater_b"] == "model", "kappa"].mean())
    assert summary["expert_pairs_min"] == pytest.approx(raters.loc[raters["rater_b"] != "model", "kappa"].min())
    text = render_agreement_report(pd.DataFrame(), pd.DataFrame(), raters, console=Console(file=io.StringIO()))
    assert "one more rater" in text and f"{summary['model_mean']:.3f}" in text


def test_a_vote_level_holding_both_labels_has_no_single_label():
    """A custom set's adjudicated labels may differ from the vote majority: that level's label is shown as '-'."""
    from mitobench.evaluation.agreement import label_name

    images = ["a", "b", "c", "d"]
    preds = pd.DataFrame({"image": images, "dataset": "mine", "fold": "ensemble", "label": [0, 1, 1, 1],
                          "probability": [0.2, 0.7, 0.6, 0.9]})
    table = calls_by_votes(preds, {"mine": pd.Series([0.5, 0.5, 1.0, 1.0], index=images)}, {"ensemble": 0.5})
    assert table["votes_atypical"].tolist() == ["1/2", "2/2"]
    assert pd.isna(table.loc[0, "label"]) and table.loc[1, "label"] == 1
    assert [label_name(v) for v in table["label"]] == ["-", "Atypical"]
