"""The paper's cross-validation folds over the AMi-Br training split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import sklearn
from sklearn.model_selection import StratifiedGroupKFold

from mitobench.errors import MitobenchError

N_FOLDS = 5
SEED = 42
#: StratifiedGroupKFold's shuffling changed between releases; these folds are the paper's under 1.9.1.
SKLEARN_VERSION = "1.9.1"


def paper_folds(train: pd.DataFrame, n_splits: int = N_FOLDS, seed: int = SEED) -> np.ndarray:
    """Fold (1..n_splits) of each row of the AMi-Br train split, in the CSV's row order.

    ``StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=42)`` with labels and slide groups,
    exactly as the reference code. The row order must be the CSV's.
    """
    if sklearn.__version__ != SKLEARN_VERSION:
        raise MitobenchError(
            f"scikit-learn {sklearn.__version__} is installed but the paper's folds are defined under "
            f"{SKLEARN_VERSION}. Run `pip install scikit-learn=={SKLEARN_VERSION}`."
        )
    if train["group"].isna().any():
        raise MitobenchError("the training records lack slide ids (group); folds must be grouped by slide.")
    folds = np.zeros(len(train), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(train)), train["label"], train["group"]), start=1):
        folds[val_idx] = k
    return folds


def inner_group_splits(labels: np.ndarray, groups: np.ndarray, n_splits: int = 3, seed: int = SEED):
    """Slide-grouped stratified splits inside the training folds, for choosing hyper-parameters."""
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels, groups))
