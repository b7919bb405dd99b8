"""Scores split by how far the experts agreed on each figure.

Pathologists disagree on atypical mitoses (AMi-Br: Fleiss kappa 0.58, and about half of its atypical labels are
2-of-3 votes; AtNorM-MD: pairwise kappa 0.23-0.65). A model whose errors sit where the experts split behaves like
one more expert; one that errs on figures all experts agree on does not. Every set whose figures carry expert votes
(AMi-Br: 3 experts, AtNorM-MD: 5) is scored on its unanimous and its split-vote figures apart
(``metrics_by_agreement.csv``), and the ensemble's calls are counted at each vote level (``calls_by_votes.csv``).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy.stats import binomtest

from mitobench.evaluation.report import VALIDATION, render_subgroup_report, show_parts, subgroup_metrics

UNANIMOUS, SPLIT = "unanimous", "split"


def experts_behind(votes: pd.Series) -> int:
    """How many experts voted, read from the vote fractions (3 for thirds, 5 for fifths); 1 without any split."""
    denominators = {Fraction(float(v)).limit_denominator(20).denominator for v in votes.dropna().unique()}
    return math.lcm(*denominators) if denominators else 1


def vote_levels(votes: pd.Series) -> pd.Series:
    """Each figure's atypical votes as ``k/n`` (``2/3``: two of three experts said atypical); NaN without votes."""
    n = experts_behind(votes)
    k = (votes.astype(float) * n).round()
    return k.map(lambda v: np.nan if pd.isna(v) else f"{int(v)}/{n}")


def agreement_of(votes: pd.Series) -> pd.Series:
    """``unanimous`` where every expert gave the figure's label, ``split`` where any disagreed; NaN without votes."""
    v = votes.astype(float)
    out = pd.Series(np.where((v == 0) | (v == 1), UNANIMOUS, SPLIT), index=votes.index, dtype=object)
    return out.where(v.notna())


def votes_of_sets(sets: dict[str, pd.DataFrame], train: str = "AMi-Br-train") -> dict[str, pd.Series]:
    """Each set's vote fractions by image, keyed as predictions.csv names the sets (the training split's figures
    are scored as the validation folds)."""
    return {VALIDATION if name == train else name: frame.set_index("image")["p_atypical_votes"]
            for name, frame in sets.items()}


def _voted_sets(votes: dict[str, pd.Series]) -> dict[str, pd.Series]:
    """Only the sets whose figures carry votes (AtNorM-Br has none: it is left out, not called unanimous)."""
    return {dataset: v.astype(float) for dataset, v in votes.items() if v.notna().any()}


def agreement_metrics(predictions: pd.DataFrame, votes: dict[str, pd.Series], thresholds: dict[str, float],
                      model: str, method: str, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """metrics.csv's rows for each set's unanimous and split-vote figures apart, plus an ``agreement`` column.
    ``votes``: per dataset, the fraction of experts voting atypical, indexed by image."""
    groups = {dataset: agreement_of(v).dropna().to_dict() for dataset, v in _voted_sets(votes).items()}
    return subgroup_metrics(predictions, groups, thresholds, model, method, n_boot, seed, column="agreement",
                            missing=None)


def calls_by_votes(predictions: pd.DataFrame, votes: dict[str, pd.Series],
                   thresholds: dict[str, float]) -> pd.DataFrame:
    """Per set and vote level: how many figures, what share the ensemble called atypical (at its threshold; with a
    Wilson 95 % CI) and its mean probability. Sets without an ensemble (the validation folds) use each image's one
    fold model."""
    rows = []
    for dataset, v in _voted_sets(votes).items():
        part = predictions[predictions["dataset"] == dataset]
        calls = part[part["fold"] == "ensemble"]
        if calls.empty:
            calls = part[part["fold"].astype(str).str.isdigit()]
        threshold = calls["fold"].astype(str).map(lambda f: thresholds.get(f, 0.5)).to_numpy()
        called = calls["probability"].to_numpy() >= threshold
        level = calls["image"].map(vote_levels(v)).to_numpy()
        frame = pd.DataFrame({"level": level, "called": called, "probability": calls["probability"].to_numpy(),
                              "label": calls["label"].to_numpy()}).dropna(subset=["level"])
        n_experts = experts_behind(v)
        for level_name, group in frame.groupby("level", sort=False):
            k = int(group["called"].sum())
            ci = binomtest(k, len(group)).proportion_ci(method="wilson")
            rows.append({"dataset": dataset, "votes_atypical": level_name, "experts": n_experts,
                         "atypical_votes": int(level_name.split("/")[0]), "label": int(group["label"].iloc[0])
                         if group["label"].nunique() == 1 else np.nan,
                         "n": len(group), "called_atypical": k / len(group), "ci_low": ci.low, "ci_high": ci.high,
                         "mean_probability": float(group["probability"].mean()),
                         "model": "ensemble" if (calls["fold"] == "ensemble").any() else "fold models"})
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    order = list(dict.fromkeys(predictions["dataset"]))
    table["_order"] = table["dataset"].map(order.index)
    return table.sort_values(["_order", "atypical_votes"], kind="stable").drop(columns="_order").reset_index(drop=True)


def render_agreement_report(by_agreement: pd.DataFrame, by_votes: pd.DataFrame,
                            console: Console | None = None) -> str:
    """Both breakdowns, for report.txt."""
    text = render_subgroup_report(
        by_agreement, "agreement", "per expert agreement: the same fold models and ensemble, each set split into "
        "figures all experts agreed on and figures they split on",
        "unanimous: every expert gave the majority label; split: at least one disagreed (AMi-Br: 3 experts, "
        "AtNorM-MD: 5; AtNorM-Br has no votes)", console) if not by_agreement.empty else ""
    if by_votes.empty:
        return text
    table = Table(title="calls per vote level: the share of figures called atypical, by how many experts said "
                        "atypical", caption="ensemble at its threshold (validation folds: each image's fold model); "
                                            "Wilson 95% CI")
    for col in ("set", "votes atypical", "label", "n", "called atypical [95% CI]", "mean probability"):
        table.add_column(col)
    for row in by_votes.itertuples(index=False):
        label = "-" if pd.isna(row.label) else ("Atypical" if row.label == 1 else "Normal")
        table.add_row(row.dataset, row.votes_atypical, label, str(row.n),
                      f"{row.called_atypical:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]", f"{row.mean_probability:.3f}")
    return text + show_parts([table], console)
