"""Scores by expert agreement: unanimous against split-vote figures, and the ensemble's calls per vote level."""

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from mitobench.evaluation.agreement import (agreement_metrics, agreement_of, calls_by_votes, render_agreement_report,
                                            vote_levels)
from mitobench.evaluation.report import tidy_metrics


def voted(fractions, n_experts, index, calls=None) -> pd.DataFrame:
    """``votes_of_sets``' frame for one set: vote fractions, how many experts voted, each expert's call."""
    fractions = np.asarray(fractions, dtype=float)
    n = np.broadcast_to(np.asarray(n_experts, dtype=float), fractions.shape).copy()
    n[np.isnan(fractions)] = np.nan
    return pd.DataFrame({"p_atypical_votes": fractions, "n_experts": n,
                         "expert_votes": calls if calls is not None else np.nan}, index=index)


def test_vote_levels_use_each_figures_number_of_experts():
    thirds = voted([0, 1 / 3, 2 / 3, 1, np.nan], 3, list("abcde"))
    assert vote_levels(thirds).iloc[:4].tolist() == ["0/3", "1/3", "2/3", "3/3"] and pd.isna(vote_levels(thirds)["e"])
    mixed = voted([0.0, 0.5, 1.0, 2 / 3, 10 / 21], [4, 4, 4, 3, 21], list("abcde"))
    assert vote_levels(mixed).tolist() == ["0/4", "2/4", "4/4", "2/3", "10/21"]  # never reduced to 1/2 or 9/19
    assert agreement_of(thirds["p_atypical_votes"]).iloc[:4].tolist() == ["unanimous", "split", "split", "unanimous"]
    assert pd.isna(agreement_of(thirds["p_atypical_votes"])["e"])


def _predictions(rng):
    """Set A with 3 experts' votes (every level), set B without votes; 3 fold models and their ensemble."""
    images = [f"i{k}" for k in range(80)]
    votes = np.tile([0, 1 / 3, 2 / 3, 1], 20)
    labels = (votes > 0.5).astype(int)
    preds = pd.concat([pd.DataFrame({"image": images, "dataset": dataset, "fold": fold, "label": labels,
                                     "probability": np.clip(votes + rng.normal(0, 0.3, 80), 0, 1)})
                       for dataset in ("A", "B") for fold in ("1", "2", "3", "ensemble")], ignore_index=True)
    return preds, images, {"A": voted(votes, 3, images), "B": voted(np.full(80, np.nan), 3, images)}


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
    votes = {"val": voted([0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1], 3, images)}
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
    raters = rater_agreement(preds, {"A": voted(experts.mean(axis=1), 3, images, codes),
                                     "B": voted(np.full(60, np.nan), 3, images)}, {"ensemble": 0.4})
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
    table = calls_by_votes(preds, {"mine": voted([0.5, 0.5, 1.0, 1.0], 2, images)}, {"ensemble": 0.5})
    assert table["votes_atypical"].tolist() == ["1/2", "2/2"]
    assert pd.isna(table.loc[0, "label"]) and table.loc[1, "label"] == 1
    assert [label_name(v) for v in table["label"]] == ["-", "Atypical"]


def test_a_custom_csvs_votes_reach_the_tables_with_their_own_number_of_experts(tmp_path):
    """k/n votes of a user's CSV, with 4 raters on some figures and 3 on others: each level keeps its own n."""
    from fixtures import make_custom_csv
    from test_records import rewrite_csv

    from mitobench.data.records import load_custom
    from mitobench.evaluation.agreement import votes_of_sets

    csv = make_custom_csv(tmp_path)  # 3 atypical, then 5 normal
    rewrite_csv(csv, lambda f: f.assign(votes=["4/4", "3/4", "2/3", "1/4", "0/3", "0/3", "", "1/3"]))
    records = load_custom(csv)
    votes = votes_of_sets({"mydata": records})
    preds = pd.DataFrame({"image": records["image"], "dataset": "mydata", "fold": "ensemble",
                          "label": records["label"], "probability": np.linspace(0.9, 0.1, 8)})
    table = calls_by_votes(preds, votes, {"ensemble": 0.5})
    assert list(zip(table["votes_atypical"], table["experts"], table["n"])) == [
        ("0/3", 3, 2), ("1/3", 3, 1), ("2/3", 3, 1), ("1/4", 4, 1), ("3/4", 4, 1), ("4/4", 4, 1)]
    assert table.set_index("votes_atypical").loc["1/4", "label"] == 0  # an adjudicated label against the votes
    by_agreement = agreement_metrics(preds, votes, {"ensemble": 0.5}, "m", "probe", n_boot=20)
    n = by_agreement[(by_agreement["fold"] == "ensemble") & (by_agreement["metric"] == "auroc")].set_index("agreement")
    assert (n.loc["unanimous", "n"], n.loc["split", "n"]) == (3, 4)  # the blank row has no votes: in neither


def test_kappas_on_the_validation_folds_use_each_images_fold_model():
    from sklearn.metrics import cohen_kappa_score

    from mitobench.evaluation.agreement import rater_agreement

    images = [f"v{k}" for k in range(8)]
    codes = ["000", "001", "011", "111", "000", "110", "111", "010"]
    preds = pd.DataFrame({"image": images, "dataset": "val", "fold": ["1", "2"] * 4, "label": [0, 0, 1, 1, 0, 1, 1, 0],
                          "probability": [0.45, 0.45, 0.7, 0.9, 0.1, 0.55, 0.8, 0.3]})
    raters = rater_agreement(preds, {"val": voted([c.count("1") / 3 for c in codes], 3, images, codes)},
                             {"1": 0.4, "2": 0.5})  # v0 is called atypical by fold 1's threshold, v1 is not by fold 2's
    model = [1, 0, 1, 1, 0, 1, 1, 0]
    got = raters[raters["rater_b"] == "model"].set_index("rater_a")["kappa"]
    for i in range(3):
        assert got[f"expert {i + 1}"] == pytest.approx(cohen_kappa_score([int(c[i]) for c in codes], model))
    assert raters["model"].unique().tolist() == ["fold models"]
