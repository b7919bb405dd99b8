"""How wide is a finished run's ensemble CI when whole slides are resampled rather than figures? Figures of one slide
share its staining, scanner and tumour, so they are not independent draws, and a CI over figures is too narrow for
a new slide's figures. Rescores the run's own predictions both ways, as ``mitobench run --set bootstrap=slide``
does (same seed, same resamples count), on every set that names each figure's slide (AMi-Br test; a --dataset CSV
with a group column); trains and chooses nothing.

Usage: .venv/bin/python benchmarks/slide_ci.py RUN_DIR [--data-root DIR] [--append]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, rescore_arguments  # noqa: E402

from mitobench.evaluation.report import tidy_metrics  # noqa: E402
from mitobench.protocol import load_sets  # noqa: E402
from mitobench.runs import load_run_config, read_predictions  # noqa: E402

METRICS = ("balanced_accuracy", "auroc")


def score_run(run: Path, data_root: str | None = None):
    """Rows ``dataset, metric, value, figure_ci, slide_ci`` (``(low, high)`` each) of the run's ensemble, for each set
    whose figures all name their slide."""
    predictions, thresholds = read_predictions(run)
    config = load_run_config(run, {"data_root": data_root} if data_root else None)
    sets, _ = load_sets(config)
    ensemble = predictions[predictions["fold"] == "ensemble"]
    slides = {name: dict(zip(frame["image"], frame["group"])) for name, frame in sets.items()
              if name != "AMi-Br-train" and frame["group"].notna().all()}
    ensemble = ensemble[ensemble["dataset"].isin(slides)]
    args = (thresholds, config.model, config.method, config.n_boot, config.seed)
    by_figure = tidy_metrics(ensemble, *args).set_index(["dataset", "metric"])
    by_slide = tidy_metrics(ensemble, *args, slides).set_index(["dataset", "metric"])
    rows = []
    for dataset in ensemble["dataset"].unique():
        for metric in METRICS:
            fig, sld = by_figure.loc[(dataset, metric)], by_slide.loc[(dataset, metric)]
            rows.append({"dataset": dataset, "metric": metric, "value": fig["value"], "n": int(fig["n"]),
                         "slides": len(set(slides[dataset].values())),
                         "figure_ci": (fig["ci_low"], fig["ci_high"]), "slide_ci": (sld["ci_low"], sld["ci_high"])})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| set | metric | n (slides) | ensemble | 95% CI over figures | 95% CI over slides | width ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        (fl, fh), (sl, sh) = r["figure_ci"], r["slide_ci"]
        lines.append(f"| {r['dataset']} | {r['metric']} | {r['n']} ({r['slides']}) | {r['value']:.4f} | "
                     f"[{fl:.4f}, {fh:.4f}] | [{sl:.4f}, {sh:.4f}] | {(sh - sl) / (fh - fl):.2f} |")
    return "\n".join(lines)


def main() -> None:
    args = rescore_arguments(__doc__, "the table")
    rows = score_run(args.run, args.data_root)
    if not rows:
        raise SystemExit(f"{args.run}: none of its hold-out sets names each figure's slide (AMi-Br test does).")
    table = markdown(rows)
    print(table)
    if args.append:
        append_results("## Ensemble CI over slides", f"Run `{args.run}`.\n\n{table}")


if __name__ == "__main__":
    main()
