"""Seed repeats: the same run trained with several ``train_seed`` values, summarised so that the seed variance
(how much the result moves when only the training's randomness changes) stands apart from the fold SD (which
training data a model saw) and from the bootstrap CI (which test images were drawn)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from mitobench.config import RunConfig
from mitobench.errors import MitobenchError

#: options that leave a run's results as they are (where its files went, how many processes or threads, how
#: big an evaluation batch) or that a repeat changes on purpose; every other option must agree between repeats,
#: the device by its kind (cuda:0 and cuda:1 agree, the CPU and a GPU do not: precision and kernels differ)
NEUTRAL = frozenset({"train_seed", "runs_dir", "cache_dir", "data_root", "fold_workers", "embed_workers",
                     "batch_size", "allow_download", "probe.workers", "train.num_threads", "train.eval_batch_size"})
METRICS = ("balanced_accuracy", "auroc")


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value).split(":")[0] if f"{prefix}{key}" == "device" else value
    return out


def check_repeats(configs: list[tuple[str, RunConfig]]) -> None:
    """Refuse runs that are not repeats of one recipe: an option (other than ``NEUTRAL``) that differs, or two runs
    that trained with the same seed (the same training twice, which would understate the variance)."""
    if len(configs) < 2:
        raise MitobenchError("--seeds needs at least two runs of one recipe, each with its own --train-seed.")
    first_name, first = configs[0]
    reference = _flat(dataclasses.asdict(first))
    for name, config in configs[1:]:
        values = _flat(dataclasses.asdict(config))
        differ = sorted(k for k in reference.keys() | values.keys()
                        if k not in NEUTRAL and reference.get(k) != values.get(k))
        if differ:
            shown = "; ".join(f"{k}: {reference.get(k)!r} in {first_name}, {values.get(k)!r} in {name}" for k in differ)
            raise MitobenchError(f"--seeds: {name} is not a seed repeat of {first_name}, their recipes differ ({shown}). "
                                 "Give runs that differ only in --train-seed.")
    seen: dict[int, str] = {}
    for name, config in configs:
        seed = config.training_seed
        if seed in seen:
            raise MitobenchError(f"--seeds: {seen[seed]} and {name} both trained with seed {seed}: the same training "
                                 "twice, not two repeats. Rerun one with another --train-seed.")
        seen[seed] = name


def seed_summary(metrics: list[pd.DataFrame]) -> pd.DataFrame:
    """Per hold-out set and metric (BA, AUROC) over the repeats' ``metrics.csv`` frames: the fold models' mean,
    their within-run (population) SD averaged over the repeats, the SD of the repeats' fold means (sample SD,
    ddof=1: the seed variance), the ensemble's mean and seed SD, and its mean bootstrap CI width. A set missing
    from a repeat is summarised over the repeats that have it (``n_seeds``)."""
    rows = []
    sets = pd.unique(pd.concat([m["dataset"] for m in metrics]))
    for dataset in sets:
        for metric in METRICS:
            picked = [m[(m["dataset"] == dataset) & (m["metric"] == metric)].set_index("fold") for m in metrics]
            picked = [p for p in picked if {"mean", "sd"} <= set(p.index)]
            if not picked:
                continue
            means = np.array([p.at["mean", "value"] for p in picked], dtype=float)
            # the validation folds have no ensemble (each fold model scores its own fold): NaN there
            ensembles = np.array([p.at["ensemble", "value"] if "ensemble" in p.index else np.nan for p in picked])
            widths = np.array([p.at["ensemble", "ci_high"] - p.at["ensemble", "ci_low"] if "ensemble" in p.index
                               else np.nan for p in picked])
            several = len(picked) > 1
            rows.append({"dataset": dataset, "metric": metric, "n_seeds": len(picked),
                         "fold_mean": means.mean(),
                         "fold_sd": float(np.mean([p.at["sd", "value"] for p in picked])),
                         "seed_sd": means.std(ddof=1) if several else np.nan,
                         "ensemble_mean": ensembles.mean(),
                         "ensemble_seed_sd": ensembles.std(ddof=1) if several else np.nan,
                         "ensemble_min": ensembles.min(), "ensemble_max": ensembles.max(),
                         "ci_width": widths.mean()})
    return pd.DataFrame(rows)


def seed_table(summary: pd.DataFrame, runs: list[Path]) -> Table:
    """``seed_summary`` as a rich table."""
    table = Table(title=f"seed repeats: {len(runs)} runs of one recipe, only the training seed differs",
                  caption="fold SD: within a run (population SD over its fold models, the paper's), averaged over the "
                          "seeds; seed SD: across the seeds' fold means (or ensembles), sample SD; CI width: the "
                          "ensemble's 95% bootstrap CI, averaged: test-set sampling, which no seed changes")
    for col in ("set", "metric", "seeds", "fold mean", "fold SD", "seed SD", "ensemble mean +- seed SD",
                "ensemble min-max", "CI width"):
        table.add_column(col)
    for r in summary.itertuples():
        ensemble = not np.isnan(r.ensemble_mean)
        table.add_row(r.dataset, "BA" if r.metric == "balanced_accuracy" else "AUROC", str(r.n_seeds),
                      f"{r.fold_mean:.4f}", f"{r.fold_sd:.4f}", f"{r.seed_sd:.4f}",
                      f"{r.ensemble_mean:.4f} +- {r.ensemble_seed_sd:.4f}" if ensemble else "-",
                      f"{r.ensemble_min:.4f}-{r.ensemble_max:.4f}" if ensemble else "-",
                      f"{r.ci_width:.4f}" if ensemble else "-")
    return table
