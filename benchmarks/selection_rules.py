"""Which epoch should a fold keep? Compare the ``train.select`` rules on validation data alone.

A rule's own validation score is biased upwards: the epoch with the best validation BA is partly the
luckiest one. This script removes that bias by split-half cross-checking inside each validation fold:
the validation slides are split at random into two halves, a rule picks its epoch on one half, and the
picked epoch is scored on the other (both directions, many random splits). Only the per-epoch validation
probabilities a fine-tuning run keeps (``validation_by_epoch`` in ``folds/fold_k.npz``, no TTA) are read,
never a hold-out set, so the result may choose a recipe.

Usage: .venv/bin/python benchmarks/selection_rules.py RUN_DIR [--splits 200] [--append]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

RULES = ("ba", "auroc", "last")


def pick(rule: str, ba: np.ndarray, auc: np.ndarray) -> int:
    """Index of the epoch ``rule`` keeps (the engine's tie-breaks: the other metric, then the first epoch)."""
    if rule == "last":
        return len(ba) - 1
    first, second = (ba, auc) if rule == "ba" else (auc, ba)
    return int(np.lexsort((-np.arange(len(ba)), second, first))[-1])


def scores(labels: np.ndarray, by_epoch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-epoch BA at threshold 0.5 and AUROC."""
    ba = np.array([balanced_accuracy_score(labels, p >= 0.5) for p in by_epoch])
    auc = np.array([roc_auc_score(labels, p) for p in by_epoch])
    return ba, auc


def split_halves(groups: np.ndarray, labels: np.ndarray, rng: np.random.Generator, min_pos: int = 10):
    """Random slide-grouped halving with at least ``min_pos`` atypical and normal figures on each side."""
    slides = np.unique(groups)
    for _ in range(1000):
        in_a = np.isin(groups, slides[rng.random(len(slides)) < 0.5])
        if all(min(labels[m].sum(), (1 - labels[m]).sum()) >= min_pos for m in (in_a, ~in_a)):
            return in_a
    raise SystemExit("could not split the validation slides into two halves with both classes on each side")


def fold_table(run: Path, fold: int, frame: pd.DataFrame, min_epochs: int, n_splits: int, seed: int,
               min_per_class: int = 10) -> dict:
    with np.load(run / "folds" / f"fold_{fold}.npz") as data:
        if "p::validation_by_epoch" not in data.files:  # a probe run, a failed fold, or an older version
            raise SystemExit(f"{run}/folds/fold_{fold}.npz has no per-epoch validation probabilities: "
                             "is it a fine-tuning run of this version of mitobench, and did the fold finish (status.json)?")
        by_epoch = data["p::validation_by_epoch"]
        info = json.loads(str(data["__info__"]))
    epochs = np.array([h["epoch"] for h in info["history"]])
    val = frame[frame["fold"] == fold]
    labels, groups = val["label"].to_numpy().astype(int), val["group"].to_numpy()
    if by_epoch.shape != (len(epochs), len(val)):
        raise SystemExit(f"fold {fold}: {by_epoch.shape} per-epoch probabilities for {len(epochs)} epochs and "
                         f"{len(val)} validation images; is folds.csv from this run?")
    keep = epochs >= min_epochs  # min_epochs is already capped at the configured epochs (main), as the engine does
    if not keep.any():
        raise SystemExit(f"fold {fold}: no epoch to compare: the run kept epochs {', '.join(map(str, epochs)) or 'none'} "
                         f"but the engine keeps none before epoch {min_epochs}; is config.yaml from this run?")
    by_epoch, epochs = by_epoch[keep], epochs[keep]
    rng = np.random.default_rng(seed + fold)
    out = {rule: {"ba": [], "auc": [], "epoch": []} for rule in RULES}
    for _ in range(n_splits):
        in_a = split_halves(groups, labels, rng, min_per_class)
        for choose, score in ((in_a, ~in_a), (~in_a, in_a)):
            ba_c, auc_c = scores(labels[choose], by_epoch[:, choose])
            ba_s, auc_s = scores(labels[score], by_epoch[:, score])
            for rule in RULES:
                i = pick(rule, ba_c, auc_c)
                out[rule]["ba"].append(ba_s[i])
                out[rule]["auc"].append(auc_s[i])
                out[rule]["epoch"].append(epochs[i])
    return {rule: {k: float(np.mean(v)) for k, v in values.items()} for rule, values in out.items()}


def split_half_run(description: str, argv: list[str] | None) -> tuple[argparse.Namespace, dict, pd.DataFrame, list[int]]:
    """The command line of a split-half check (RUN_DIR, --splits, --min-per-class, --append) and the run it names:
    its config, its fold table and its finished folds."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--splits", type=int, default=200, help="random slide-grouped halvings per fold")
    parser.add_argument("--min-per-class", type=int, default=10, help="atypical and normal figures on each half, at least")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    frame = pd.read_csv(args.run / "folds.csv")
    folds = sorted(int(p.stem.split("_")[1]) for p in (args.run / "folds").glob("fold_*.npz"))
    if not folds:
        raise SystemExit(f"{args.run}: no finished folds (folds/fold_k.npz); is this a run folder?")
    return args, config, frame, folds


def main(argv: list[str] | None = None) -> None:
    args, config, frame, folds = split_half_run(__doc__, argv)
    # the engine's rule: no epoch before min_epochs is kept, except the last one when epochs is shorter
    min_epochs = min(config["train"]["min_epochs"], config["train"]["epochs"])
    per_fold = {f: fold_table(args.run, f, frame, min_epochs, args.splits, config["seed"], args.min_per_class) for f in folds}
    rows = ["| rule (`train.select`) | BA on the other half, fold mean +- SD | AUROC on the other half | mean kept epoch | BA per fold |",
            "|---|---|---|---|---|"]
    for rule in RULES:
        ba = np.array([per_fold[f][rule]["ba"] for f in folds])
        auc = np.array([per_fold[f][rule]["auc"] for f in folds])
        epoch = np.mean([per_fold[f][rule]["epoch"] for f in folds])
        rows.append(f"| {rule} | {ba.mean():.4f} +- {ba.std(ddof=1) if len(ba) > 1 else 0:.4f} | {auc.mean():.4f} | "
                    f"{epoch:.1f} | {' / '.join(f'{v:.4f}' for v in ba)} |")
    body = (f"Run `{args.run}`, {len(folds)} validation folds, {args.splits} random slide-grouped halvings per fold, "
            f"epochs >= {min_epochs}, per-epoch validation probabilities without TTA, "
            "threshold 0.5.\n\n" + "\n".join(rows))
    print(body)
    if args.append:
        append_results("## Training engine: which epoch a fold keeps, split-half check on the validation folds (issue 4)", body)


if __name__ == "__main__":
    main()
