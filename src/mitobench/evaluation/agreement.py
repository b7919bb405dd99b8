"""Scores split by how far the experts agreed on each figure.

Pathologists disagree on atypical mitoses (AMi-Br: Fleiss kappa 0.58, and about half of its atypical labels are
2-of-3 votes; AtNorM-MD: pairwise kappa 0.23-0.65). A model whose errors sit where the experts split behaves like
one more expert; one that errs on figures all experts agree on does not. Every set whose figures carry expert votes
(AMi-Br: 3 experts, AtNorM-MD: 5) is scored on its unanimous and its split-vote figures apart
(``metrics_by_agreement.csv``), the ensemble's calls are counted at each vote level (``calls_by_votes.csv``), and
the model is scored as one more rater: its Cohen's kappa with each expert beside theirs with one another
(``rater_agreement.csv``).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score

from mitobench.errors import MitobenchError
from mitobench.evaluation.report import VALIDATION, render_subgroup_report, show_parts, subgroup_metrics

UNANIMOUS, SPLIT = "unanimous", "split"
VOTE_COLUMNS = ["p_atypical_votes", "n_experts", "expert_votes"]


def vote_levels(votes: pd.DataFrame) -> pd.Series:
    """Each figure's atypical votes as ``k/n`` (``2/3``: two of three experts said atypical); NaN without votes.
    ``votes``: the record columns ``p_atypical_votes`` and ``n_experts``."""
    n = votes["n_experts"].astype(float)
    k = (votes["p_atypical_votes"].astype(float) * n).round()
    known = k.notna() & n.notna()
    return pd.Series([f"{int(a)}/{int(b)}" if ok else np.nan for a, b, ok in zip(k, n, known)], index=votes.index,
                     dtype=object)


def agreement_of(votes: pd.Series) -> pd.Series:
    """``unanimous`` where every expert voted the same way, ``split`` where any disagreed; NaN without votes.
    ``votes``: the fraction of experts voting atypical."""
    v = votes.astype(float)
    out = pd.Series(np.where((v == 0) | (v == 1), UNANIMOUS, SPLIT), index=votes.index, dtype=object)
    return out.where(v.notna())


def votes_of_sets(sets: dict[str, pd.DataFrame], train: str = "AMi-Br-train") -> dict[str, pd.DataFrame]:
    """Each set's vote columns (``VOTE_COLUMNS``) by image, keyed as predictions.csv names the sets (the training
    split's figures are scored as the validation folds)."""
    return {VALIDATION if name == train else name: frame.set_index("image")[VOTE_COLUMNS]
            for name, frame in sets.items()}


def _voted_sets(votes: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Only the sets whose figures carry votes (AtNorM-Br has none: it is left out, not called unanimous)."""
    return {dataset: v for dataset, v in votes.items() if v["p_atypical_votes"].notna().any()}


def agreement_metrics(predictions: pd.DataFrame, votes: dict[str, pd.DataFrame], thresholds: dict[str, float],
                      model: str, method: str, n_boot: int = 1000, seed: int = 0,
                      slides: dict[str, dict] | None = None) -> pd.DataFrame:
    """metrics.csv's rows for each set's unanimous and split-vote figures apart, plus an ``agreement`` column.
    ``votes``: per dataset, ``votes_of_sets``' frame."""
    groups = {dataset: agreement_of(v["p_atypical_votes"]).dropna().to_dict()
              for dataset, v in _voted_sets(votes).items()}
    return subgroup_metrics(predictions, groups, thresholds, model, method, n_boot, seed, column="agreement",
                            missing=None, slides=slides)


def model_calls(predictions: pd.DataFrame, dataset: str, thresholds: dict[str, float]) -> pd.DataFrame:
    """The model's call on each figure of ``dataset``: the ensemble's at its threshold, or, for a set without an
    ensemble (the validation folds), each image's one fold model at that fold's threshold. Columns image, called,
    probability, label; ``attrs["by"]`` says which."""
    part = predictions[predictions["dataset"] == dataset]
    rows = part[part["fold"] == "ensemble"]
    by = "ensemble"
    if rows.empty:
        rows, by = part[part["fold"].astype(str).str.isdigit()], "fold models"
    threshold = rows["fold"].astype(str).map(lambda f: thresholds.get(f, 0.5)).to_numpy()
    out = pd.DataFrame({"image": rows["image"].to_numpy(), "called": rows["probability"].to_numpy() >= threshold,
                        "probability": rows["probability"].to_numpy(), "label": rows["label"].to_numpy()})
    out.attrs["by"] = by
    return out


def calls_by_votes(predictions: pd.DataFrame, votes: dict[str, pd.DataFrame],
                   thresholds: dict[str, float]) -> pd.DataFrame:
    """Per set and vote level: how many figures, what share the model called atypical (``model_calls``; with a
    Wilson 95 % CI) and its mean probability."""
    rows = []
    for dataset, v in _voted_sets(votes).items():
        calls = model_calls(predictions, dataset, thresholds)
        frame = calls.assign(level=calls["image"].map(vote_levels(v))).dropna(subset=["level"])
        for level_name, group in frame.groupby("level", sort=False):
            k = int(group["called"].sum())
            ci = binomtest(k, len(group)).proportion_ci(method="wilson")
            atypical_votes, experts = (int(part) for part in level_name.split("/"))
            rows.append({"dataset": dataset, "votes_atypical": level_name, "experts": experts,
                         "atypical_votes": atypical_votes, "label": int(group["label"].iloc[0])
                         if group["label"].nunique() == 1 else np.nan,
                         "n": len(group), "called_atypical": k / len(group), "ci_low": ci.low, "ci_high": ci.high,
                         "mean_probability": float(group["probability"].mean()), "model": calls.attrs["by"]})
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    order = list(dict.fromkeys(predictions["dataset"]))
    table["_order"] = table["dataset"].map(order.index)
    return table.sort_values(["_order", "experts", "atypical_votes"], kind="stable").drop(columns="_order").reset_index(drop=True)


def rater_agreement(predictions: pd.DataFrame, votes: dict[str, pd.DataFrame],
                    thresholds: dict[str, float]) -> pd.DataFrame:
    """Cohen's kappa between every two experts, and between the model's calls (``model_calls``) and each expert, on
    each set whose figures carry every expert's call (``expert_votes``: AMi-Br, AtNorM-MD). Is the model as close
    to each expert as the experts are to one another? Columns dataset, rater_a, rater_b, kappa, n, model."""
    rows = []
    for dataset, v in votes.items():
        calls = v["expert_votes"].dropna().astype(str)
        if calls.empty or calls.str.len().nunique() != 1:
            continue
        model = model_calls(predictions, dataset, thresholds).set_index("image")
        shared = model.index.intersection(calls.index)
        if shared.empty:
            continue
        codes = calls.loc[shared]
        raters = {f"expert {i + 1}": codes.str[i].astype(int).to_numpy() for i in range(codes.str.len().iloc[0])}
        raters["model"] = model.loc[shared, "called"].astype(int).to_numpy()
        for a, b in combinations(raters, 2):
            rows.append({"dataset": dataset, "rater_a": a, "rater_b": b, "n": len(shared),
                         "kappa": float(cohen_kappa_score(raters[a], raters[b])), "model": model.attrs["by"]})
    return pd.DataFrame(rows)


def label_name(label: float) -> str:
    """A vote level's label for tables: Atypical, Normal, or ``-`` where its figures carry both (a custom set's
    adjudicated labels can differ from the vote majority)."""
    return "-" if pd.isna(label) else ("Atypical" if label == 1 else "Normal")


def kappa_summary(raters: pd.DataFrame) -> pd.DataFrame:
    """Per set: the experts' kappas with one another and the model's with each expert, as mean, min and max."""
    rows = []
    for dataset, part in raters.groupby("dataset", sort=False):
        with_model = part["rater_b"] == "model"
        experts, model = part.loc[~with_model, "kappa"], part.loc[with_model].set_index("rater_a")["kappa"]
        rows.append({"dataset": dataset, "n": int(part["n"].iloc[0]), "experts": len(model),
                     "expert_pairs_mean": experts.mean(), "expert_pairs_min": experts.min(),
                     "expert_pairs_max": experts.max(), "model_mean": model.mean(), "model_min": model.min(),
                     "model_max": model.max(), "model_by_expert": " / ".join(f"{k:.3f}" for k in model),
                     "model": part["model"].iloc[0]})
    return pd.DataFrame(rows)


def render_agreement_report(by_agreement: pd.DataFrame, by_votes: pd.DataFrame, raters: pd.DataFrame | None = None,
                            console: Console | None = None) -> str:
    """The three breakdowns, for report.txt."""
    text = render_subgroup_report(
        by_agreement, "agreement", "per expert agreement: the same fold models and ensemble, each set split into "
        "figures all experts agreed on and figures they split on",
        "unanimous: every expert gave the majority label; split: at least one disagreed (AMi-Br: 3 experts, "
        "AtNorM-MD: 5; AtNorM-Br has no votes)", console) if not by_agreement.empty else ""
    parts = []
    if not by_votes.empty:
        table = Table(title="calls per vote level: the share of figures called atypical, by how many experts said "
                            "atypical", caption="ensemble at its threshold (validation folds: each image's fold "
                                                "model); Wilson 95% CI")
        for col in ("set", "votes atypical", "label", "n", "called atypical [95% CI]", "mean probability"):
            table.add_column(col)
        for row in by_votes.itertuples(index=False):
            table.add_row(row.dataset, row.votes_atypical, label_name(row.label), str(row.n),
                          f"{row.called_atypical:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]",
                          f"{row.mean_probability:.3f}")
        parts.append(table)
    if raters is not None and not raters.empty:
        table = Table(title="the model as one more rater: Cohen's kappa of its calls with each expert, beside the "
                            "experts' kappas with one another", caption="ensemble at its threshold (validation "
                            "folds: each image's fold model)")
        for col in ("set", "n", "experts", "expert with expert: mean [min, max]", "model with expert: mean [min, max]",
                    "model with expert 1 / 2 / ..."):
            table.add_column(col)
        for row in kappa_summary(raters).itertuples(index=False):
            table.add_row(row.dataset, str(row.n), str(row.experts),
                          f"{row.expert_pairs_mean:.3f} [{row.expert_pairs_min:.3f}, {row.expert_pairs_max:.3f}]",
                          f"{row.model_mean:.3f} [{row.model_min:.3f}, {row.model_max:.3f}]", row.model_by_expert)
        parts.append(table)
    return text + (show_parts(parts, console) if parts else "")


def read_agreement_table(path: Path, columns: list[str], what: str = "agreement table") -> pd.DataFrame | None:
    """One of a run's agreement CSVs (its ``columns``), or None where the run has none (no set with votes, or made
    before them); a damaged one is one clear error naming ``what`` it should be."""
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, dtype={"fold": str})[columns]
    except (ValueError, KeyError, pd.errors.ParserError) as exc:
        raise MitobenchError(f"{path}: not a mitobench {what} ({exc}); the run folder is damaged.") from exc
    keys = [c for c in columns if c not in ("value", "kappa")]
    if table[keys].isna().any().any():
        from mitobench.runs import DAMAGED

        raise MitobenchError(f"{path} is incomplete (a row with empty cells: cut short?); {DAMAGED}")
    return table


def agreement_comparison(run_dirs: list[Path]) -> Table | None:
    """Runs side by side on their unanimous and split-vote figures (BA: fold mean +- SD, ensemble) and their model's
    mean kappa with the experts, for ``mitobench report``; None where no run has the tables."""
    table = Table(title="by expert agreement: BA on the figures the experts agreed on and split on; kappa with them",
                  caption="BA fold mean +- SD | ensemble; kappa: the model's mean with each expert (the experts' mean "
                          "with one another)")
    for col in ("run", "dataset", "BA unanimous", "BA split", "kappa with experts"):
        table.add_column(col, no_wrap=col != "dataset")
    without = []
    for number, run_dir in enumerate(run_dirs, 1):
        by_agreement = read_agreement_table(Path(run_dir) / "metrics_by_agreement.csv",
                                            ["dataset", "agreement", "fold", "metric", "value"])
        raters = read_agreement_table(Path(run_dir) / "rater_agreement.csv",
                                      ["dataset", "rater_a", "rater_b", "kappa", "n", "model"])
        if by_agreement is None:
            without.append(f"#{number}")
            continue
        kappas = kappa_summary(raters).set_index("dataset") if raters is not None and not raters.empty else None
        ba = by_agreement[by_agreement["metric"] == "balanced_accuracy"]
        for dataset in dict.fromkeys(ba["dataset"]):
            cells = []
            for group in (UNANIMOUS, SPLIT):
                get = ba[(ba["dataset"] == dataset) & (ba["agreement"] == group)].set_index("fold")["value"]
                cells.append("-" if get.empty else f"{get.get('mean', np.nan):.4f} +- {get.get('sd', np.nan):.4f}"
                             + (f" | {get['ensemble']:.4f}" if "ensemble" in get else ""))
            kappa = "-" if kappas is None or dataset not in kappas.index else \
                f"{kappas.at[dataset, 'model_mean']:.3f} ({kappas.at[dataset, 'expert_pairs_mean']:.3f})"
            table.add_row(f"#{number}", dataset, *cells, kappa)
    if without:
        table.caption += (f"; {', '.join(without)}: no tables (no set with votes, or made before 2026-12-07: "
                          "benchmarks/agreement_check.py RUN scores it)")
    return table if table.row_count else None
