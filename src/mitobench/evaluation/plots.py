"""Figures of finished runs: ROC, precision-recall and calibration curves per set, from ``predictions.csv``.

One run: its five fold models (thin) and their ensemble (bold), with the operating point at the run's threshold,
so a reader sees the fold spread the table's SD summarises. Several runs: each run's ensemble, one colour each, so
methods compare on one axis. Everything drawn is also written to ``curves.csv`` (AUROC, AP, ECE, Brier and the
operating point of each curve), for re-plotting in the user's own style. Where a run scored expert vote levels
(``calls_by_votes.csv``), ``agreement.png`` draws the share called atypical at each. matplotlib is the ``plots``
extra.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from mitobench.errors import MitobenchError
from mitobench.evaluation.metrics import ECE_BINS, binary_metrics, checked
from mitobench.evaluation.report import RANDOM_INIT_TAG
from mitobench.runs import RunDir, read_predictions


def calibration(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """The reliability diagram's points: per non-empty equal-width bin of the predicted probability, its mean
    prediction, the fraction atypical and the count (the bins of metrics.csv's ECE)."""
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    return pd.DataFrame([{"bin": b, "predicted": probs[bins == b].mean(), "observed": labels[bins == b].mean(),
                          "n": int((bins == b).sum())} for b in range(n_bins) if (bins == b).any()])


def curve_summary(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """What a curve shows, in numbers (``binary_metrics``, as in metrics.csv): AUROC, AP (atypical positive), ECE,
    Brier score, and the sensitivity and specificity at ``threshold`` (the point marked on the ROC curve)."""
    values = binary_metrics(labels, probs, threshold)
    return {"threshold": threshold, **{k: values[k] for k in ("auroc", "average_precision", "ece", "brier",
                                                              "sensitivity", "specificity")}}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def curves(runs: list[tuple[Path, pd.DataFrame, dict[str, float]]]) -> pd.DataFrame:
    """One row per drawn curve of ``runs`` (each run's folder and ``read_predictions``): run number, run folder, set, fold
    ('1'..'5' or 'ensemble'), n, n_atypical and ``curve_summary``. With several runs only their ensembles (and the
    fold models of sets without one)."""
    rows = []
    for number, (run_dir, preds, thresholds) in enumerate(runs, 1):
        for (dataset, fold), part in preds.groupby(["dataset", "fold"], sort=False):
            has_ensemble = ((preds["dataset"] == dataset) & (preds["fold"] == "ensemble")).any()
            if len(runs) > 1 and fold != "ensemble" and has_ensemble:
                continue
            try:
                labels, probs = checked(part["label"].to_numpy(), part["probability"].to_numpy())
            except MitobenchError as exc:
                raise MitobenchError(f"{run_dir / 'predictions.csv'}: {dataset}, fold {fold}: {exc} The run folder "
                                     "is damaged.") from exc
            if len(np.unique(labels)) < 2:
                continue  # one class: no curve
            rows.append({"run": number, "run_dir": str(run_dir), "dataset": dataset, "fold": fold, "n": len(part),
                         "n_atypical": int(labels.sum()),
                         **curve_summary(labels, probs, thresholds.get(fold, 0.5))})
    return pd.DataFrame(rows)


def _figure(dataset: str, parts: list[tuple[str, pd.DataFrame, dict, bool]], title: str):
    """ROC, precision-recall and reliability panels of one set; ``parts``: (legend, predictions, the curve's row of
    ``curves``, bold)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5), layout="constrained")
    roc, pr, rel = fig.subplots(1, 3)
    for legend, part, s, bold in parts:
        labels, probs = part["label"].to_numpy(int), part["probability"].to_numpy(float)
        style = {"lw": 2.2 if bold else 0.9, "alpha": 1.0 if bold else 0.6,
                 **({"color": "black"} if legend.startswith("ensemble") else {})}  # one run: its ensemble, black
        fpr, tpr, _ = roc_curve(labels, probs)
        (line,) = roc.plot(fpr, tpr, label=f"{legend}: AUROC {s['auroc']:.3f}", **style)
        if bold:
            roc.plot(1 - s["specificity"], s["sensitivity"], "o", color=line.get_color(), ms=7)
        precision, recall, _ = precision_recall_curve(labels, probs)
        pr.step(recall, precision, where="post", label=f"{legend}: AP {s['average_precision']:.3f}",
                **{**style, "color": line.get_color()})
        if bold:
            table = calibration(labels, probs)
            rel.plot(table["predicted"], table["observed"], "o-", label=f"{legend}: ECE {s['ece']:.3f}, Brier {s['brier']:.3f}",
                     **{**style, "color": line.get_color()})
    prevalence = pd.concat([part["label"] for _, part, _, _ in parts]).mean()  # the validation folds: pooled
    roc.plot([0, 1], [0, 1], ":", color="grey")
    pr.axhline(prevalence, ls=":", color="grey", label=f"prevalence {prevalence:.3f}")
    rel.plot([0, 1], [0, 1], ":", color="grey")
    for ax, (x, y, name) in zip((roc, pr, rel), (("1 - specificity", "sensitivity", "ROC (dot: the threshold)"),
                                                 ("recall (sensitivity)", "precision", "precision-recall"),
                                                 ("mean predicted P(atypical)", "fraction atypical",
                                                  f"calibration ({ECE_BINS} bins)"))):
        ax.set(xlabel=x, ylabel=y, title=name, xlim=(0, 1), ylim=(0, 1.01))
        if ax.get_legend_handles_labels()[0]:  # the validation folds have no ensemble to calibrate
            ax.legend(fontsize=7, loc="lower right" if ax is roc else "best")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{dataset}: {title} (positive class = atypical)")
    return fig


def _agreement_figure(calls: list[tuple[str, pd.DataFrame]]):
    """Per set with expert votes, the share of figures called atypical at each vote level (``calls_by_votes.csv``),
    with its Wilson 95 % CI; one marker series per run. A model that tracks the experts climbs from 0/n to n/n."""
    from matplotlib.figure import Figure

    datasets = list(dict.fromkeys(d for _, table in calls for d in table["dataset"]))
    fig = Figure(figsize=(5 * len(datasets), 4.5), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets):
        levels = list(dict.fromkeys(level for _, table in calls
                                    for level in table.loc[table["dataset"] == dataset, "votes_atypical"]))
        for k, (legend, table) in enumerate(calls):
            part = table[table["dataset"] == dataset].set_index("votes_atypical").reindex(levels).dropna(subset=["n"])
            x = [levels.index(level) + (k - (len(calls) - 1) / 2) * 0.12 for level in part.index]
            y = part["called_atypical"].to_numpy(float)
            ax.errorbar(x, y, yerr=[y - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - y], fmt="o-",
                        capsize=3, label=legend)
        ax.set_xticks(range(len(levels)), levels)
        ax.set(xlabel="experts voting atypical", ylabel="share called atypical", title=dataset, ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("calls per expert vote level (Wilson 95% CI)")
    return fig


def _read_calls(run_dirs: list[Path]) -> list[tuple[str, pd.DataFrame]]:
    """Each run's ``calls_by_votes.csv`` with its legend; runs without one (no set with votes, or made before
    2026-12-07) are left out."""
    from mitobench.evaluation.agreement import read_agreement_table

    out = []
    for k, run_dir in enumerate(run_dirs, 1):
        table = read_agreement_table(Path(run_dir) / "calls_by_votes.csv",
                                     ["dataset", "votes_atypical", "n", "called_atypical", "ci_low", "ci_high"],
                                     what="calls table")
        if table is not None:
            out.append((f"#{k} {Path(run_dir).name}" if len(run_dirs) > 1 else Path(run_dir).name, table))
    return out


def plot_runs(run_dirs: list[Path], out_dir: Path) -> pd.DataFrame:
    """Write one PNG per set and ``curves.csv`` into the new folder ``out_dir`` (built aside, then renamed: an
    interrupted call leaves no half-made folder); returns the curves table."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MitobenchError("mitobench plot needs matplotlib: pip install 'mitobench[plots]'.") from exc
    if out_dir.exists():
        raise MitobenchError(f"{out_dir} exists; mitobench never overwrites results. Choose another --out.")
    runs = [(run_dir, *read_predictions(run_dir)) for run_dir in run_dirs]  # every run read and checked before any write
    table = curves(runs)
    votes = _read_calls(run_dirs)
    if table.empty:
        raise MitobenchError("no set of these runs holds both classes: there is no curve to draw.")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    except OSError as exc:
        raise MitobenchError(f"cannot create the figures' folder in {out_dir.parent} ({exc}); give --out a "
                             "writable place.") from exc
    names: dict[str, str] = {}
    failed = {k: RunDir(Path(r)).failed_folds() for k, r in enumerate(run_dirs, 1)}
    tags = {k: f"  {RANDOM_INIT_TAG}" if RunDir(Path(r)).random_init() else "" for k, r in enumerate(run_dirs, 1)}
    try:
        for dataset in pd.unique(table["dataset"]):
            name = _slug(dataset)
            if name in names.values() or name == "agreement":  # names differing only in punctuation; the votes figure
                name = f"{name}_{len(names) + 1}"
            names[dataset] = name
            drawn = table[table["dataset"] == dataset]
            parts = []
            for row in drawn.to_dict("records"):
                preds = runs[row["run"] - 1][1]
                part = preds[(preds["dataset"] == dataset) & (preds["fold"] == row["fold"])]
                curve = "ensemble" if row["fold"] == "ensemble" else f"fold {row['fold']}"
                if row["fold"] == "ensemble" and failed[row["run"]]:  # fewer models than planned: said on the curve
                    curve += f" (fold {', '.join(failed[row['run']])} FAILED, left out)"
                legend = f"#{row['run']} {curve}{' (RANDOM INIT)' if tags[row['run']] else ''}" if len(run_dirs) > 1 else curve
                parts.append((legend, part, row, row["fold"] == "ensemble"))
            title = Path(run_dirs[0]).name + tags[1] if len(run_dirs) == 1 else f"{len(run_dirs)} runs' ensembles"
            _figure(dataset, parts, title).savefig(staging / f"{name}.png", dpi=120)
        table.assign(figure=table["dataset"].map(lambda d: f"{names[d]}.png")).to_csv(staging / "curves.csv",
                                                                                       index=False)
        if votes:
            _agreement_figure(votes).savefig(staging / "agreement.png", dpi=120)
        if len(run_dirs) > 1:
            (staging / "runs.txt").write_text("".join(
                f"#{k}  {r}{tags[k]}" + (f"  (fold {', '.join(failed[k])} FAILED: its ensemble leaves them out)" if failed[k]
                                else "") + "\n" for k, r in enumerate(run_dirs, 1)))
        if out_dir.exists():  # made while the figures were drawn: never replaced
            raise MitobenchError(f"{out_dir} appeared while the figures were drawn; nothing was written there. "
                                 "Choose another --out.")
        staging.rename(out_dir)
    except BaseException as exc:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise MitobenchError(f"cannot write the figures to {out_dir} ({exc}).") from exc
        raise
    return table
