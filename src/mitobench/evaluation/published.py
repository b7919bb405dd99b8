"""The paper's published figures, shipped with the package.

Banerjee et al., "Benchmarking Deep Learning and Vision Foundation Models for Atypical vs. Normal
Mitosis Classification with Cross-Dataset Evaluation", arXiv 2506.21444, MELBA 2026:006.
Values: mean and population SD of the 5 fold models' balanced accuracy and AUROC.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

import pandas as pd

CITATION = ("Banerjee et al., Benchmarking Deep Learning and Vision Foundation Models for Atypical vs. Normal "
            "Mitosis Classification with Cross-Dataset Evaluation, MELBA 2026:006 (arXiv 2506.21444)")
METHOD_NAMES = {"probe": "LP", "finetune": "E2E", "lora": "LoRA"}


#: the paper's models it trained from scratch; every other one of its models started from published weights
PAPER_FROM_SCRATCH = {"efficientnetv2m"}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@lru_cache(maxsize=1)
def published_results() -> pd.DataFrame:
    with resources.files("mitobench.resources").joinpath("published_results.csv").open() as fh:
        frame = pd.read_csv(fh)
    frame["model_norm"] = frame["model"].map(_norm)
    return frame


def published_figure(model: str, method: str, dataset: str, pretrained: bool = True) -> dict | None:
    """The paper's figure for the same model, method and hold-out set, if it published one and the run's model
    started as the paper's did (its published weights, or from scratch where the paper trained from scratch): a
    ``timm/NAME`` build (random init) or a card run on random init is not the paper's model."""
    if model.startswith("timm/") or pretrained == (_norm(model) in PAPER_FROM_SCRATCH):
        return None
    table = published_results()
    rows = table[(table["model_norm"] == _norm(model)) & (table["method"] == METHOD_NAMES.get(method, method))
                 & (table["dataset"] == dataset)]
    if rows.empty:
        return None
    row = rows.iloc[0]
    return {"model": row["model"], "method": row["method"], "bacc_mean": row["bacc_mean"], "bacc_std": row["bacc_std"],
            "auroc_mean": row["auroc_mean"], "auroc_std": row["auroc_std"]}


def best_published(dataset: str) -> dict | None:
    table = published_results()
    rows = table[table["dataset"] == dataset]
    if rows.empty:
        return None
    row = rows.loc[rows["bacc_mean"].idxmax()]
    return {"model": row["model"], "method": row["method"], "bacc_mean": row["bacc_mean"], "bacc_std": row["bacc_std"]}
