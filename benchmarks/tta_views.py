"""Do more test-time views help a finished fine-tuning run? Re-predict each validation fold with the run's own
fold models and ``train.tta_crops`` set to ``--crops``, and compare with the run's recorded validation
predictions (its own TTA). Only the validation folds are predicted, never a hold-out set, so the result may
choose a recipe. With ``--crops 1.0`` it reproduces the run's validation probabilities (a self-check): exactly
for a CPU run; for a run made on CUDA (bf16 autocast) within bf16 rounding, as this script predicts in fp32 on the CPU.

Usage: MITOBENCH_DATA=../shared/data .venv/bin/python benchmarks/tta_views.py RUN_DIR [--crops 1.0 0.875] [--append]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

from mitobench.data.cache import PatchCache  # noqa: E402
from mitobench.predict import FoldPredictor  # noqa: E402
from mitobench.protocol import default_cache_dir, load_sets  # noqa: E402


def validation_predictions(run: Path, crops: list[float], batch_size: int = 128, threads: int | None = None) -> dict[int, dict]:
    """Per fold: labels, the recorded validation probabilities and those predicted with ``crops``."""
    predictor = FoldPredictor(run, torch.device("cpu"))
    if threads:
        torch.set_num_threads(threads)
    config = predictor.config
    if config.method == "probe" or not config.train.tta:
        raise SystemExit(f"{run}: a fine-tuning run with train.tta is needed (method {config.method}, tta {config.train.tta}).")
    predictor.config.train.tta_crops = list(crops)
    train = load_sets(config)[0]["AMi-Br-train"]
    folds = pd.read_csv(run / "folds.csv")
    if len(folds) != len(train) or (folds["image"].astype(str).to_numpy() != train["image"].astype(str).to_numpy()).any():
        raise SystemExit(f"{run}/folds.csv does not list the data root's AMi-Br train images in order: "
                         "point MITOBENCH_DATA at the data the run used.")
    patches, _ = PatchCache(default_cache_dir(config), config.patch_size).load(train, "AMi-Br-train")
    out = {}
    for fold in range(1, config.n_folds + 1):
        idx = np.flatnonzero(folds["fold"].to_numpy() == fold)
        with np.load(run / "folds" / f"fold_{fold}.npz") as data:
            recorded = data["p::validation"]
        out[fold] = {"labels": folds["label"].to_numpy()[idx].astype(int), "recorded": recorded,
                     "new": predictor.probabilities(fold, np.asarray(patches)[idx], batch_size)}
        print(f"fold {fold}: {len(idx)} validation images re-predicted", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--crops", type=float, nargs="+", default=[1.0, 0.875])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 beside a training run: no oversubscription)")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    per_fold = validation_predictions(args.run, args.crops, threads=args.threads)
    rows = ["| views | validation BA fold mean +- SD | validation AUROC fold mean +- SD | BA per fold |", "|---|---|---|---|"]
    for key, name in (("recorded", "the run's own (8 dihedral)"), ("new", f"8 dihedral x crops {args.crops}")):
        ba = np.array([balanced_accuracy_score(f["labels"], f[key] >= 0.5) for f in per_fold.values()])
        auc = np.array([roc_auc_score(f["labels"], f[key]) for f in per_fold.values()])
        rows.append(f"| {name} | {ba.mean():.4f} +- {ba.std():.4f} | {auc.mean():.4f} +- {auc.std():.4f} | "
                    f"{' / '.join(f'{v:.4f}' for v in ba)} |")
    gap = max(float(np.abs(f["new"] - f["recorded"]).max()) for f in per_fold.values())
    body = f"Run `{args.run}`, its fold models on their validation folds only (SD over folds as in metrics.csv).\n\n" + "\n".join(rows) + \
           f"\n\nLargest difference between a recorded and a re-predicted probability: {gap:.2e}."
    print(body)
    if args.append:
        append_results("## Test-time views: 8 dihedral vs 8 dihedral x centre crops, validation folds (issue 4)", body)


if __name__ == "__main__":
    main()
