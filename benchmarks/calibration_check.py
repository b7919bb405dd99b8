"""What would ``--calibration platt`` do to a finished run? Apply it to the run's saved probabilities, without
retraining, exactly as the protocol does: each fold's Platt map fitted on that fold's own validation
probabilities (``calibrate_fold``), applied to its hold-out probabilities and threshold, the ensemble the mean
of the calibrated fold probabilities at the mean mapped threshold. Prints BA, AUROC, Brier and ECE before and
after (fold mean +- SD, ensemble). A training run with ``--calibration platt`` of a deterministic recipe gives the
same figures; this gives them for any run already made. Reads only the run folder; never a choice on hold-out data.

Usage: .venv/bin/python benchmarks/calibration_check.py RUN_DIR [--append]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

from mitobench.evaluation.calibration import calibrate_fold  # noqa: E402
from mitobench.evaluation.report import VALIDATION, tidy_metrics  # noqa: E402
from mitobench.runs import require_complete_run  # noqa: E402

SHOWN = ("balanced_accuracy", "auroc", "brier", "ece")


def calibrated_predictions(predictions: pd.DataFrame, thresholds: dict[str, float]
                           ) -> tuple[pd.DataFrame, dict[str, float]]:
    """``predictions.csv`` with every fold's probabilities Platt-mapped (fitted on its validation rows) and the
    ensembles recomputed from them; the mapped thresholds."""
    out, mapped = predictions.copy(), {}
    folds = sorted(f for f in predictions["fold"].unique() if f.isdigit())
    for fold in folds:
        rows = predictions["fold"] == fold
        val = rows & (predictions["dataset"] == VALIDATION)
        sets = {name: predictions.loc[rows & (predictions["dataset"] == name), "probability"].to_numpy()
                for name in predictions.loc[rows, "dataset"].unique()}
        sets["validation"] = sets.pop(VALIDATION)
        probs, mapped[fold], _ = calibrate_fold(sets, predictions.loc[val, "label"].to_numpy(), thresholds[fold])
        for name, p in probs.items():
            out.loc[rows & (out["dataset"] == (VALIDATION if name == "validation" else name)), "probability"] = p
    ensemble = out["fold"] == "ensemble"
    for name in out.loc[ensemble, "dataset"].unique():
        per_fold = [out.loc[(out["fold"] == f) & (out["dataset"] == name), "probability"].to_numpy() for f in folds]
        out.loc[ensemble & (out["dataset"] == name), "probability"] = np.mean(per_fold, axis=0)
    mapped["ensemble"] = float(np.mean([mapped[f] for f in folds]))
    return out, mapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    require_complete_run(args.run, needs=("predictions.csv", "fold_info.json"))
    import json

    info = json.loads((args.run / "fold_info.json").read_text())
    if any("calibration" in v for v in info.values()):
        raise SystemExit(f"{args.run} is calibrated already (fold_info.json has each fold's map).")
    thresholds = {f: float(v["threshold"]) for f, v in info.items()}
    thresholds["ensemble"] = float(np.mean(list(thresholds.values())))
    predictions = pd.read_csv(args.run / "predictions.csv", dtype={"fold": str})
    after, mapped = calibrated_predictions(predictions, thresholds)
    tables = {name: tidy_metrics(frame, thr, "", "", 1000, 42) for name, frame, thr in
              (("as run", predictions, thresholds), ("Platt", after, mapped))}
    lines = ["| set | metric | as run: fold mean +- SD, ensemble [95% CI] | Platt-calibrated on each validation fold |",
             "|---|---|---|---|"]
    for dataset in [d for d in predictions["dataset"].unique() if d != VALIDATION]:
        for metric in SHOWN:
            cells = []
            for table in tables.values():
                t = table[(table["dataset"] == dataset) & (table["metric"] == metric)].set_index("fold")
                low, high = t.at['ensemble', 'ci_low'], t.at['ensemble', 'ci_high']
                ci = f" [{low:.4f}, {high:.4f}]" if pd.notna(low) else ""  # none for the ECE (metrics.NO_CI)
                cells.append(f"{t.at['mean', 'value']:.4f} +- {t.at['sd', 'value']:.4f}, ens "
                             f"{t.at['ensemble', 'value']:.4f}{ci}")
            lines.append(f"| {dataset} | {metric} | {cells[0]} | {cells[1]} |")
    body = f"Run: `{args.run}`\n\n" + "\n".join(lines)
    print(body)
    if args.append:
        append_results("## Calibration check: Platt maps applied to a finished run's probabilities", body)


if __name__ == "__main__":
    main()
