"""Platt calibration of a fold model's probabilities, fitted on its own validation fold.

The models train with class weighting or a weighted sampler (the paper's recipe), so their probabilities answer
"atypical or normal, if both were equally common": on AMi-Br, where about 22 % of figures are atypical, the default
probe predicts 0.45 on average (ECE about 0.2), and a slide's expected count of atypical figures (the sum of the
probabilities) comes out about twice too high. Platt scaling, ``sigmoid(a * logit(p) + b)`` with ``a > 0``, is
monotone, so AUROC is unchanged, and the fold's threshold goes through the same map, so every fold model makes the
same decisions as before: only what the probabilities mean changes, to the training split's prevalence.
"""

from __future__ import annotations

import numpy as np

from mitobench.errors import MitobenchError

_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _shift_only(labels: np.ndarray, x: np.ndarray) -> float:
    """The intercept ``b`` that best fits ``sigmoid(x + b)`` to the labels (Newton's method on the log loss, which
    is convex in ``b``): a prior shift alone."""
    b = float(np.log(labels.mean() / (1 - labels.mean())) - np.mean(x))
    for _ in range(100):
        s = 1 / (1 + np.exp(-(x + b)))
        step = np.sum(s - labels) / max(np.sum(s * (1 - s)), 1e-12)
        b -= step
        if abs(step) < 1e-10:
            break
    return b


def fit_platt(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``{"a": slope, "b": intercept}`` of a logistic regression of the labels on ``logit(probs)`` (lightly
    regularised, so that a fold whose validation scores separate perfectly still gets a finite map). Where the
    validation scores rank the classes backwards (a slope of 0 or less: a poor model or a tiny fold), no monotone
    increasing map fits; the slope is then held at 1 and only the prior is shifted (``"shift_only": True``)."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        raise MitobenchError("Platt calibration needs both classes in the validation fold.")
    x = _logit(probs)
    model = LogisticRegression(C=100.0, max_iter=1000).fit(x[:, None], labels)
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if a > 0:
        return {"a": a, "b": b}
    return {"a": 1.0, "b": _shift_only(labels, x), "shift_only": True}


def apply_platt(probs: np.ndarray, params: dict[str, float]) -> np.ndarray:
    """The calibrated probabilities (float64)."""
    z = params["a"] * _logit(probs) + params["b"]
    return 1.0 / (1.0 + np.exp(-z))


def calibrate_fold(probs: dict[str, np.ndarray], labels: np.ndarray, threshold: float
                   ) -> tuple[dict[str, np.ndarray], float, dict[str, float]]:
    """Fit on ``probs["validation"]``; map every set's probabilities and the threshold. Per-epoch validation
    scores (``validation_by_epoch``, for analyses of the selection rule) stay as the model gave them."""
    params = fit_platt(labels, probs["validation"])
    mapped = {name: (p if name == "validation_by_epoch" else apply_platt(p, params)) for name, p in probs.items()}
    return mapped, float(apply_platt(np.array([threshold]), params)[0]), params
