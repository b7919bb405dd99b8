"""Which decision threshold should a fold model use? Compare ``threshold: fixed`` (0.5, the paper's) with
``threshold: validation`` (Youden's J on the validation fold) on validation data alone.

A threshold tuned on a validation fold scores that fold optimistically. This script removes the bias the
same way ``selection_rules.py`` does for epochs: each validation fold's slides are split at random into two
halves, the threshold is chosen on one half (the engine's own ``best_threshold``) and balanced accuracy is
scored on the other, both ways, many random splits. Only the kept model's validation probabilities
(``p::validation`` in ``folds/fold_k.npz``, with TTA when the run used it) are read, never a hold-out set,
so the result may choose a recipe. Works for probe and fine-tuning runs alike.

Usage: .venv/bin/python benchmarks/threshold_rules.py RUN_DIR [--splits 200] [--append]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402
from selection_rules import split_half_run, split_halves  # noqa: E402

from mitobench.protocol import best_threshold  # noqa: E402

MODES = ("fixed", "validation")


def fold_scores(run: Path, fold: int, frame: pd.DataFrame, n_splits: int, seed: int, min_per_class: int = 10) -> dict:
    """Mean other-half BA and mean chosen threshold of each mode on one validation fold."""
    with np.load(run / "folds" / f"fold_{fold}.npz") as data:
        if "p::validation" not in data.files:
            raise SystemExit(f"{run}/folds/fold_{fold}.npz has no validation probabilities (p::validation): "
                             "did the fold finish (status.json)?")
        probs = data["p::validation"]
    val = frame[frame["fold"] == fold]
    labels, groups = val["label"].to_numpy().astype(int), val["group"].to_numpy()
    if len(probs) != len(val):
        raise SystemExit(f"fold {fold}: {len(probs)} validation probabilities for {len(val)} validation images; "
                         "is folds.csv from this run?")
    rng = np.random.default_rng(seed + fold)
    out = {mode: {"ba": [], "threshold": []} for mode in MODES}
    for _ in range(n_splits):
        in_a = split_halves(groups, labels, rng, min_per_class)
        for choose, score in ((in_a, ~in_a), (~in_a, in_a)):
            for mode in MODES:
                t = best_threshold(labels[choose], probs[choose]) if mode == "validation" else 0.5
                out[mode]["ba"].append(balanced_accuracy_score(labels[score], probs[score] >= t))
                out[mode]["threshold"].append(t)
    return {mode: {k: float(np.mean(v)) for k, v in values.items()} for mode, values in out.items()}


def main(argv: list[str] | None = None) -> None:
    args, config, frame, folds = split_half_run(__doc__, argv)
    per_fold = {f: fold_scores(args.run, f, frame, args.splits, config["seed"], args.min_per_class) for f in folds}
    rows = ["| `threshold` | BA on the other half, fold mean +- SD | mean threshold | BA per fold |", "|---|---|---|---|"]
    for mode in MODES:
        ba = np.array([per_fold[f][mode]["ba"] for f in folds])
        thr = np.mean([per_fold[f][mode]["threshold"] for f in folds])
        rows.append(f"| {mode} | {ba.mean():.4f} +- {ba.std(ddof=1) if len(ba) > 1 else 0:.4f} | {thr:.3f} | "
                    f"{' / '.join(f'{v:.4f}' for v in ba)} |")
    tta = " with TTA" if config.get("train", {}).get("tta") and config.get("method") != "probe" else ""
    body = (f"Run `{args.run}`, {len(folds)} validation folds, {args.splits} random slide-grouped halvings per fold, "
            f"the kept model's validation probabilities{tta}; threshold chosen on one half, BA scored on the other.\n\n"
            + "\n".join(rows))
    print(body)
    if args.append:
        append_results("## Decision threshold: fixed 0.5 vs chosen on the validation fold, split-half check (issue 4)", body)


if __name__ == "__main__":
    main()
