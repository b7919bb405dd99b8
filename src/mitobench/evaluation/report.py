"""Tidy metrics for every fold model and the ensemble, and the paper-form table."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from mitobench.evaluation.metrics import METRICS, binary_metrics, bootstrap_ci
from mitobench.evaluation.published import CITATION, best_published, published_figure


def tidy_metrics(predictions: pd.DataFrame, thresholds: dict[str, float], model: str, method: str,
                 n_boot: int = 1000, seed: int = 0, slides: dict[str, dict] | None = None) -> pd.DataFrame:
    """``predictions`` has columns dataset, fold ('1'..'5' or 'ensemble'), label, probability. ``slides``: per
    dataset, image -> slide; the ensemble's CI of a set whose every figure has one resamples slides (``ci_unit``
    ``slide``), else figures, stratified by class (``figure``)."""
    rows = []
    for (dataset, fold), part in predictions.groupby(["dataset", "fold"], sort=False):
        thr = thresholds.get(str(fold), 0.5)
        values = binary_metrics(part["label"].to_numpy(), part["probability"].to_numpy(), thr)
        unit, cis = "", {}
        if fold == "ensemble":
            slide = part["image"].map((slides or {}).get(dataset, {})) if "image" in part else pd.Series(dtype=object)
            clusters = slide.to_numpy() if len(slide) and slide.notna().all() else None
            unit = "figure" if clusters is None else "slide"
            cis = bootstrap_ci(part["label"].to_numpy(), part["probability"].to_numpy(), thr, n_boot, seed,
                               clusters=clusters)
        for metric in METRICS:
            lo, hi = cis.get(metric, (np.nan, np.nan))
            rows.append({"dataset": dataset, "model": model, "method": method, "fold": str(fold), "metric": metric,
                         "value": values[metric], "ci_low": lo, "ci_high": hi, "n": len(part),
                         "n_atypical": int(part["label"].sum()), "ci_unit": unit})
    frame = pd.DataFrame(rows)
    folds = frame[frame["fold"].str.isdigit()]
    summary = folds.groupby(["dataset", "metric"], sort=False)["value"]
    for stat, fn in (("mean", np.mean), ("sd", lambda v: float(np.std(v, ddof=0)))):
        agg = summary.apply(lambda v: fn(v.to_numpy())).reset_index()
        agg["fold"], agg["model"], agg["method"] = stat, model, method
        frame = pd.concat([frame, agg], ignore_index=True)
    frame[["n", "n_atypical"]] = frame[["n", "n_atypical"]].astype("Int64")  # counts, blank on the mean/sd rows
    return frame


def subgroup_metrics(predictions: pd.DataFrame, groups: dict[str, dict], thresholds: dict[str, float], model: str,
                     method: str, n_boot: int = 1000, seed: int = 0, column: str = "domain",
                     missing: str | None = "unknown", slides: dict[str, dict] | None = None) -> pd.DataFrame:
    """``tidy_metrics`` of each subgroup (a domain, an expert-agreement level) of every set that holds more than one;
    the columns of metrics.csv plus ``column``. ``groups``: per dataset, image -> group; an image without one goes
    to the group ``missing``, or is left out where ``missing`` is None."""
    frames = []
    for dataset, group_of in groups.items():
        part = predictions[predictions["dataset"] == dataset]
        labels = part["image"].map(group_of)
        if missing is None:
            part, labels = part[labels.notna()], labels[labels.notna()]
        else:
            labels = labels.fillna(missing)
        labels = labels.astype(str)
        if labels.nunique() < 2:
            continue
        for group in sorted(labels.unique()):
            frames.append(tidy_metrics(part[labels == group], thresholds, model, method, n_boot, seed, slides)
                          .assign(**{column: group}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def domain_metrics(predictions: pd.DataFrame, domains: dict[str, dict], thresholds: dict[str, float], model: str,
                   method: str, n_boot: int = 1000, seed: int = 0, slides: dict[str, dict] | None = None
                   ) -> pd.DataFrame:
    """``subgroup_metrics`` by domain (scanner, source, tumour type); an image without one is "unknown"."""
    return subgroup_metrics(predictions, domains, thresholds, model, method, n_boot, seed, slides=slides)


def _get(metrics: pd.DataFrame, dataset: str, fold: str, metric: str) -> pd.Series | None:
    row = metrics[(metrics["dataset"] == dataset) & (metrics["fold"] == fold) & (metrics["metric"] == metric)]
    return None if row.empty else row.iloc[0]


THRESHOLDS = {"fixed": "threshold 0.5 (the paper's)",
              "validation": "threshold chosen on each fold's validation data (best BA there, so the validation "
                            "row's BA is optimistic), the ensemble's at their mean; the paper used 0.5"}


#: the dataset name of the fold models' scores on their own validation folds
VALIDATION = "AMi-Br-train (validation fold)"


def fold_counts(metrics: pd.DataFrame, dataset: str) -> str:
    """``n (atypical)`` the fold models were scored on: a hold-out set's size, or, for the validation folds (each
    fold model on its own fold), their sum: the whole training split when no fold failed."""
    rows = metrics[(metrics["dataset"] == dataset) & (metrics["metric"] == "balanced_accuracy")
                   & metrics["fold"].astype(str).str.isdigit()]
    if rows.empty:
        return "-"
    n, atypical = rows["n"].astype(int), rows["n_atypical"].astype(int)
    if dataset == VALIDATION:
        return f"{n.sum()} ({atypical.sum()})"
    return f"{n.iloc[0]} ({atypical.iloc[0]})"


def ci_caption(metrics: pd.DataFrame) -> str:
    """How the ensemble's CIs were drawn: per figure (stratified by class), or per slide on the sets so marked."""
    units = metrics.get("ci_unit", pd.Series(dtype=object))
    by_slide = sorted(metrics.loc[units == "slide", "dataset"].unique()) if len(units) else []
    if not by_slide:
        return "95% stratified bootstrap CI"
    rest = sorted(metrics.loc[units == "figure", "dataset"].unique())
    return (f"95% bootstrap CI over slides ({', '.join(by_slide)})"
            + (f", stratified over figures ({', '.join(rest)}: no slide per figure)" if rest else ""))


RANDOM_INIT_TAG = "[RANDOM INIT: no pretrained weights]"  # beside every figure of a run whose backbone was random init


def threshold_caption(threshold: str, calibration: str = "none") -> str:
    """The caption's words on the threshold: with Platt calibration each fold's threshold is mapped through its
    map (same decisions), so the ensemble's, their mean, is no longer 0.5."""
    text = THRESHOLDS[threshold]
    if calibration == "platt":
        text += (" on each fold model's uncalibrated score, i.e. its Platt-mapped threshold on the calibrated one; "
                 "the ensemble's at their mean")
    return text


def render_report(metrics: pd.DataFrame, model: str, method: str, datasets: list[str], absent: list[str],
                  pretrained: bool = True, console: Console | None = None, recipe: str = "",
                  threshold: str = "fixed", calibration: str = "none") -> str:
    """Print the paper-form table; return it as plain text for ``report.txt``. ``recipe``: a few words on how the
    models were trained (preset, precision, input size, TTA), shown in the title; ``threshold`` and
    ``calibration``: the run's modes, said in the caption (they change the ensemble's BA)."""
    title = (f"{model} / {method}" + (f" ({recipe})" if recipe else "")
             + ("" if pretrained else f"  {RANDOM_INIT_TAG}"))
    folds = metrics["fold"].astype(str)
    n = folds[folds.str.isdigit()].nunique()  # the fold models that count: fewer where a fold failed
    table = Table(title=title, caption=f"positive class = atypical; {threshold_caption(threshold, calibration)}; fold models: mean +- "
                  f"population SD over {n}; ensemble: mean probability of the {n} fold models, "
                  + ci_caption(metrics))
    for col in ("set", "n (atyp.)", "BA fold mean+-SD", "AUROC fold mean+-SD", "BA ensemble [95% CI]",
                "AUROC ensemble [95% CI]", "paper BA (same model+method)", "paper best BA"):
        table.add_column(col)
    for dataset in datasets:
        pub, best = published_figure(model, method, dataset, pretrained), best_published(dataset)
        table.add_row(
            dataset, *_cells(metrics, dataset),
            f"{pub['bacc_mean']:.4f} +- {pub['bacc_std']:.4f}" if pub else "-",
            f"{best['bacc_mean']:.4f} ({best['model']} {best['method']})" if best else "-",
        )
    for name in absent:
        table.add_row(name, "ABSENT", "not found under the data root: not evaluated", "", "", "", "", "")
    return show_parts([table, f"Paper figures: {CITATION}."], console)


def _cells(metrics: pd.DataFrame, dataset: str) -> list[str]:
    """n (atypical), BA and AUROC as fold mean +- SD, and the ensemble's BA and AUROC with their CIs."""
    ba_m, ba_s = _get(metrics, dataset, "mean", "balanced_accuracy"), _get(metrics, dataset, "sd", "balanced_accuracy")
    au_m, au_s = _get(metrics, dataset, "mean", "auroc"), _get(metrics, dataset, "sd", "auroc")
    ba_e, au_e = _get(metrics, dataset, "ensemble", "balanced_accuracy"), _get(metrics, dataset, "ensemble", "auroc")
    return [fold_counts(metrics, dataset),
            f"{ba_m['value']:.4f} +- {ba_s['value']:.4f}" if ba_m is not None else "-",
            f"{au_m['value']:.4f} +- {au_s['value']:.4f}" if au_m is not None else "-",
            f"{ba_e['value']:.4f} [{ba_e['ci_low']:.4f}, {ba_e['ci_high']:.4f}]" if ba_e is not None else "-",
            f"{au_e['value']:.4f} [{au_e['ci_low']:.4f}, {au_e['ci_high']:.4f}]" if au_e is not None else "-"]


def show_parts(parts: list, console: Console | None) -> str:
    """Print ``parts`` (tables, lines) to ``console``; return them as plain text for ``report.txt``."""
    console = console or Console(width=max(Console().width, 160))
    capture = Console(width=200, record=True, file=io.StringIO())
    for part in parts:
        console.print(part)
        capture.print(part)
    return capture.export_text()


def render_subgroup_report(frame: pd.DataFrame, column: str, title: str, caption: str,
                           console: Console | None = None) -> str:
    """A ``subgroup_metrics`` breakdown in the main table's form, for report.txt."""
    table = Table(title=title, caption=caption)
    for col in ("set", column, "n (atyp.)", "BA fold mean+-SD", "AUROC fold mean+-SD", "BA ensemble [95% CI]",
                "AUROC ensemble [95% CI]"):
        table.add_column(col)
    for (dataset, group), part in frame.groupby(["dataset", column], sort=False):
        table.add_row(dataset, group, *_cells(part, dataset))
    return show_parts([table], console)


def render_domain_report(by_domain: pd.DataFrame, console: Console | None = None) -> str:
    """The per-domain breakdown (``domain_metrics``), for report.txt."""
    return render_subgroup_report(
        by_domain, "domain", "per domain: the same fold models and ensemble, each set split by its images' domain",
        "domain: AMi-Br's source (MIDOG21 / TUPAC16: scanners and centres), or a custom set's domain column; a domain "
        "with one class has no BA or AUROC", console)
