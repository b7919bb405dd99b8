"""Append a finished run's figures (fold mean +- SD, ensemble with CI, wall time) to RESULTS.md.

Usage: .venv/bin/python benchmarks/record_run.py RUN_DIR --heading "## ..." --command "the command that made the run"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402

from mitobench.evaluation.report import fold_counts  # noqa: E402


def summary(run_dir: Path) -> str:
    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"fold": str})
    status = json.loads((run_dir / "status.json").read_text())
    info = json.loads((run_dir / "fold_info.json").read_text())
    rows = ["| set | n (atypical) | BA fold mean +- SD | AUROC fold mean +- SD | BA ensemble [95% CI] | AUROC ensemble [95% CI] | BA per fold |",
            "|---|---|---|---|---|---|---|"]
    for dataset in metrics["dataset"].unique():
        part = metrics[metrics["dataset"] == dataset]

        def get(fold: str, metric: str) -> pd.Series | None:
            row = part[(part["fold"] == fold) & (part["metric"] == metric)]
            return None if row.empty else row.iloc[0]

        ba_m, ba_s, au_m, au_s = get("mean", "balanced_accuracy"), get("sd", "balanced_accuracy"), get("mean", "auroc"), get("sd", "auroc")
        ba_e, au_e = get("ensemble", "balanced_accuracy"), get("ensemble", "auroc")
        per_fold = " / ".join(f"{v:.4f}" for v in part[(part["metric"] == "balanced_accuracy") & part["fold"].str.isdigit()]["value"])
        ens = lambda r: f"{r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]" if r is not None else "-"  # noqa: E731
        rows.append(f"| {dataset} | {fold_counts(metrics, dataset)} | {ba_m['value']:.4f} +- {ba_s['value']:.4f} | "
                    f"{au_m['value']:.4f} +- {au_s['value']:.4f} | {ens(ba_e)} | {ens(au_e)} | {per_fold} |")
    total = status.get("timings", {}).get("total_s")
    fold_s = sum(float(v.get("seconds", 0)) for v in info.values())
    extra = [f"- run folder: `{run_dir}` (status {status['state']}); sum of fold times {fold_s / 60:.1f} min"
             + (f", wall of the process that finished the run {total / 60:.1f} min" if total else "")]
    best = {k: (v.get("best_epoch"), round(v.get("best_val_ba") or 0, 4)) for k, v in info.items() if "best_epoch" in v}
    if best:
        extra.append(f"- selected epoch and validation BA per fold: {best}")
    return "\n".join(rows) + "\n\n" + "\n".join(extra)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--heading", required=True)
    parser.add_argument("--command", required=True, help="the command that produced the run")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    body = f"Run command: `{args.command}`\n\n" + summary(args.run_dir)
    print(body)
    if not args.no_append:
        append_results(args.heading, body)


if __name__ == "__main__":
    main()
