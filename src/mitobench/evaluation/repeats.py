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

#: options that leave a run's recipe as it is (where its files went, how many processes or threads, how big an
#: evaluation batch, which GPU) or that a repeat changes on purpose; every other option must agree between repeats.
#: Thread counts change the order of floating-point sums, i.e. training noise of the kind a seed measures. The
#: device is compared by what the run used: the CPU and a GPU differ (precision ``auto`` and kernels differ).
NEUTRAL = frozenset({"train_seed", "runs_dir", "cache_dir", "data_root", "fold_workers", "embed_workers",
                     "batch_size", "allow_download", "probe.workers", "train.num_threads", "train.eval_batch_size",
                     "device"})
METRICS = ("balanced_accuracy", "auroc")


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def device_used(run_dir: Path, config: RunConfig) -> str:
    """``cpu`` or ``cuda`` (or ``mps``...): the kind of device a finished run trained on. ``auto`` is resolved from
    the run's ``environment.json``, which names the GPU torch saw (none: the CPU)."""
    import json

    if config.device != "auto":
        return config.device.split(":")[0]
    try:
        gpu = json.loads((Path(run_dir) / "environment.json").read_text()).get("gpu")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return "cuda" if gpu else "cpu"


def check_complete_folds(run_dir: Path, config: RunConfig) -> None:
    """A run with failed folds has a mean, SD and ensemble over fewer fold models: not a repeat of the others."""
    from mitobench.runs import RunDir

    failed = RunDir(Path(run_dir)).failed_folds()
    if failed:
        raise MitobenchError(f"--seeds: {run_dir} has failed folds ({', '.join(map(str, failed))} of "
                             f"{config.n_folds}), so its figures are over fewer fold models than a repeat's. Leave it "
                             "out, or train that seed again.")


def _resolved(config: RunConfig, device: str) -> dict:
    """The run's options, flat, with the device-dependent precisions as a run now saves them (``protocol.
    pin_precision``): a run saved before that, with ``auto``, compares equal to its repeat saved resolved."""
    values = _flat(dataclasses.asdict(config))
    if config.method == "probe" and config.dtype == "auto" and device in ("cpu", "cuda"):
        from mitobench.device import dtype_name
        from mitobench.models.cards import get_card

        values["dtype"] = dtype_name("auto", device, get_card(config.model).dtype)
    elif config.method != "probe" and config.train.precision == "auto" and device in ("cpu", "cuda"):
        values["train.precision"] = "bf16" if device == "cuda" else "fp32"
    return values


def check_repeats(configs: list[tuple[str, RunConfig]], devices: list[str] | None = None) -> None:
    """Refuse runs that are not repeats of one recipe: an option (other than ``NEUTRAL``) that differs, a run on
    another kind of device (``devices``: each run's ``device_used``), or two runs that trained with the same seed
    (the same training twice, which would understate the variance)."""
    if len(configs) < 2:
        raise MitobenchError("--seeds needs at least two runs of one recipe, each with its own --train-seed.")
    devices = devices or [c.device.split(":")[0] for _, c in configs]
    first_name, first = configs[0]
    reference = {**_resolved(first, devices[0]), "device used": devices[0]}
    for (name, config), device in zip(configs[1:], devices[1:]):
        values = {**_resolved(config, device), "device used": device}
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
                  caption="fold SD: within a run (population SD over its fold models, the paper's: which training "
                          "folds a model saw, and its own seed), averaged over the runs; seed SD: sample SD of the "
                          "runs' fold means (a mean of 5 models: about a fold model's seed noise / sqrt 5), and of "
                          "their ensembles; CI width: the ensemble's 95% bootstrap CI, averaged over the runs: "
                          "test-set sampling, which no seed changes; seeds: the runs holding that set")
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
