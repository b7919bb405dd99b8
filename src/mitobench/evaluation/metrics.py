"""Binary metrics with atypical (label 1) as the positive class."""

from __future__ import annotations

import numpy as np

from mitobench.errors import MitobenchError

METRICS = ("balanced_accuracy", "auroc", "sensitivity", "specificity", "precision", "f1",
           "average_precision", "mcc", "brier", "ece")
#: equal-width probability bins of the expected calibration error
ECE_BINS = 10
#: metrics given without a bootstrap CI: the binned ECE is biased upwards, and more so on a resample (its repeated
#: figures), so its percentile interval can lie wholly above the estimate it belongs to
NO_CI = frozenset({"ece"})


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis of a 2-D array, ties given their mean rank (``scipy.stats.rankdata``'s
    default, written out because importing scipy.stats costs a warm run about a second)."""
    values = np.asarray(values)
    n = values.shape[1]
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, 1)
    position = np.broadcast_to(np.arange(n), values.shape)
    starts = np.ones(values.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    ends = np.ones(values.shape, dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    last = np.minimum.accumulate(np.where(ends, position, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(values.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, 1)
    return ranks


def checked(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """Labels in {0, 1} and finite probabilities, as int and float arrays: a NaN would otherwise count as a negative
    prediction and as the highest score (plausible-looking metrics from a broken model)."""
    probs = np.asarray(probs, dtype=float)
    labels = np.asarray(labels, dtype=float)
    if labels.shape != probs.shape:
        raise MitobenchError(f"{labels.size} labels but {probs.size} probabilities.")
    if not np.isin(labels, (0, 1)).all():
        raise MitobenchError(f"labels must be 0 (normal) or 1 (atypical); found {sorted(set(labels[~np.isin(labels, (0, 1))].tolist()))[:3]}.")
    if not np.isfinite(probs).all():
        raise MitobenchError(f"{int((~np.isfinite(probs)).sum())} of {probs.size} probabilities are not finite (NaN or "
                             "inf): the model that made them is broken; no metric is computed from them.")
    return labels.astype(int), probs


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """All reported metrics; threshold-free ones (AUROC, AP) use the probabilities.

    Computed by the vectorised ``_metrics_rows`` (tests check it against scikit-learn's functions); with a
    single class present, BA, AUROC and AP are NaN.
    """
    labels, probs = checked(labels, probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        row = {m: float(v[0]) for m, v in _metrics_rows(labels[None], probs[None], threshold).items()}
    if len(np.unique(labels)) < 2:
        row.update(balanced_accuracy=float("nan"), auroc=float("nan"), average_precision=float("nan"))
    return row


def _metrics_rows(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Every metric for each row of ``(B, N)`` label/probability matrices at once (ties as sklearn)."""
    pos = labels.sum(1).astype(float)
    neg = labels.shape[1] - pos
    preds = probs >= threshold
    tp = (preds & (labels == 1)).sum(1).astype(float)
    fp = (preds & (labels == 0)).sum(1).astype(float)
    fn, tn = pos - tp, neg - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        sens, spec = tp / pos, tn / neg
        prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        mcc_den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = np.where(mcc_den > 0, (tp * tn - fp * fn) / mcc_den, 0.0)
    ranks = average_ranks(probs)  # average ranks handle ties like roc_auc_score
    auroc = ((ranks * labels).sum(1) - pos * (pos + 1) / 2) / (pos * neg)
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, 1)
    sorted_y = np.take_along_axis(labels, order, 1)
    precision_at = np.cumsum(sorted_y, 1) / np.arange(1, probs.shape[1] + 1)
    is_end = np.ones_like(sorted_p, dtype=bool)
    is_end[:, :-1] = sorted_p[:, :-1] != sorted_p[:, 1:]
    idx = np.where(is_end, np.arange(probs.shape[1]), probs.shape[1] - 1)
    group_end = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
    ap = (sorted_y * np.take_along_axis(precision_at, group_end, 1)).sum(1) / pos
    return {"balanced_accuracy": (sens + spec) / 2, "auroc": auroc, "sensitivity": sens, "specificity": spec,
            "precision": prec, "f1": f1, "average_precision": ap, "mcc": mcc,
            "brier": ((probs - labels) ** 2).mean(1), "ece": _ece_rows(labels, probs)}


def _ece_rows(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Expected calibration error of each row: over equal-width bins of the predicted probability, the
    count-weighted gap between mean prediction and fraction atypical, i.e. sum over bins |sum p - sum y| / N."""
    rows, n = probs.shape
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1) + n_bins * np.arange(rows)[:, None]
    gap = np.bincount(bins.ravel(), weights=(probs - labels).ravel(), minlength=rows * n_bins)
    return np.abs(gap.reshape(rows, n_bins)).sum(1) / n


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5, n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05, clusters: np.ndarray | None = None
                 ) -> dict[str, tuple[float, float]]:
    """Seeded stratified percentile bootstrap: positives and negatives are resampled separately,
    so every replicate keeps the set's class balance. With ``clusters`` (each figure's slide), whole slides are
    resampled instead (``cluster_bootstrap_ci``)."""
    if clusters is not None:
        return cluster_bootstrap_ci(labels, probs, clusters, threshold, n_boot, seed, alpha)
    labels, probs = checked(labels, probs)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if len(pos) == 0 or len(neg) == 0:
        return {m: (float("nan"), float("nan")) for m in METRICS}
    idx = np.concatenate([rng.choice(pos, (n_boot, len(pos))), rng.choice(neg, (n_boot, len(neg)))], axis=1)
    values = _metrics_rows(labels[idx], probs[idx], threshold)
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    return {m: ((float("nan"),) * 2 if m in NO_CI else
                (float(np.nanpercentile(values[m], lo)), float(np.nanpercentile(values[m], hi)))) for m in METRICS}


def cluster_bootstrap_ci(labels: np.ndarray, probs: np.ndarray, clusters: np.ndarray, threshold: float = 0.5,
                         n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """Seeded percentile bootstrap over clusters (slides): each replicate draws as many slides as the set has,
    with replacement, and keeps all their figures. Figures of one slide share its staining, scanner and tumour, so
    they are not independent draws; resampling slides gives the wider, honest interval for a new slide's figures.
    A replicate that happens to hold one class only is left out (its BA and AUROC are undefined)."""
    labels, probs = checked(labels, probs)
    clusters = np.asarray(clusters)
    if len(clusters) != len(labels):
        raise ValueError(f"{len(clusters)} cluster ids for {len(labels)} figures")
    if len(np.unique(labels)) < 2:
        return {m: (float("nan"), float("nan")) for m in METRICS}
    _, members_of = np.unique(clusters, return_inverse=True)
    members = [np.flatnonzero(members_of == k) for k in range(members_of.max() + 1)]
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {m: [] for m in METRICS}
    for draw in rng.integers(0, len(members), (n_boot, len(members))):
        idx = np.concatenate([members[k] for k in draw])
        if labels[idx].min() == labels[idx].max():
            continue
        for metric, value in _metrics_rows(labels[idx][None], probs[idx][None], threshold).items():
            rows[metric].append(float(value[0]))
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    return {m: ((float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))) if v and m not in NO_CI
                else (float("nan"),) * 2) for m, v in rows.items()}
