"""How does a finished run do where the experts agreed, and where they split? The run's own predictions, scored as
every run since 2026-12-07 scores them itself (``metrics_by_agreement.csv``, ``calls_by_votes.csv``,
``rater_agreement.csv``): each set with expert votes split into unanimous and split-vote figures, the share called
atypical at each vote level, and Cohen's kappa of the model with each expert beside the experts' with one another. For
runs made before that, or to print the figures in RESULTS.md's form. Reads the run folder and the data root's label
files; trains and chooses nothing.

Usage: .venv/bin/python benchmarks/agreement_check.py RUN_DIR [--data-root DIR] [--append]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, rescore_arguments  # noqa: E402

from mitobench.evaluation.agreement import (agreement_metrics, calls_by_votes, kappa_summary,  # noqa: E402
                                            label_name, rater_agreement, render_agreement_report, votes_of_sets)
from mitobench.evaluation.report import fold_counts  # noqa: E402
from mitobench.protocol import load_sets  # noqa: E402
from mitobench.runs import load_run_config, read_predictions  # noqa: E402


def markdown(by_agreement, by_votes, raters) -> str:
    """The three breakdowns as RESULTS.md tables (each only where it has rows): BA and AUROC (fold mean +- SD,
    ensemble with its CI) per agreement group; the model's share called atypical per vote level; Cohen's kappas,
    expert with expert and model with expert."""
    sections = []
    if not by_agreement.empty:
        lines = ["| set | figures | n (atypical) | BA fold mean +- SD | AUROC fold mean +- SD | BA ensemble [95% CI] |",
                 "|---|---|---|---|---|---|"]
        for (dataset, group), part in by_agreement.groupby(["dataset", "agreement"], sort=False):
            ba, au = (part[part["metric"] == m].set_index("fold") for m in ("balanced_accuracy", "auroc"))
            ens = (f"{ba.at['ensemble', 'value']:.4f} [{ba.at['ensemble', 'ci_low']:.4f}, "
                   f"{ba.at['ensemble', 'ci_high']:.4f}]") if "ensemble" in ba.index else "-"
            lines.append(f"| {dataset} | {group} | {fold_counts(part, dataset)} | "
                         f"{ba.at['mean', 'value']:.4f} +- {ba.at['sd', 'value']:.4f} | "
                         f"{au.at['mean', 'value']:.4f} +- {au.at['sd', 'value']:.4f} | {ens} |")
        sections.append(lines)
    if not by_votes.empty:
        lines = ["| set | votes atypical | label | n | called atypical [95% Wilson CI] | mean probability | by |",
                 "|---|---|---|---|---|---|---|"]
        for row in by_votes.itertuples(index=False):
            lines.append(f"| {row.dataset} | {row.votes_atypical} | {label_name(row.label)} | {row.n} | "
                         f"{row.called_atypical:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}] | "
                         f"{row.mean_probability:.3f} | {row.model} |")
        sections.append(lines)
    if not raters.empty:
        lines = ["| set | n | Cohen's kappa, expert with expert: mean [min, max] | model with expert: mean [min, max] "
                 "| model with expert 1 / 2 / ... | model |", "|---|---|---|---|---|---|"]
        for row in kappa_summary(raters).itertuples(index=False):
            lines.append(f"| {row.dataset} | {row.n} | {row.expert_pairs_mean:.3f} [{row.expert_pairs_min:.3f}, "
                         f"{row.expert_pairs_max:.3f}] | {row.model_mean:.3f} [{row.model_min:.3f}, "
                         f"{row.model_max:.3f}] | {row.model_by_expert} | {row.model} |")
        sections.append(lines)
    return "\n\n".join("\n".join(lines) for lines in sections)


def score_run(run: Path, data_root: str | None = None):
    """The run's ``metrics_by_agreement.csv``, ``calls_by_votes.csv`` and ``rater_agreement.csv`` frames, as the run
    itself scores them."""
    predictions, thresholds = read_predictions(run)
    config = load_run_config(run, {"data_root": data_root} if data_root else None)
    sets, _ = load_sets(config)
    votes = votes_of_sets(sets)
    return (agreement_metrics(predictions, votes, thresholds, config.model, config.method, config.n_boot, config.seed),
            calls_by_votes(predictions, votes, thresholds),
            rater_agreement(predictions, votes, thresholds))


def main() -> None:
    args = rescore_arguments(__doc__, "the tables")
    by_agreement, by_votes, raters = score_run(args.run, args.data_root)
    if by_agreement.empty and by_votes.empty:
        raise SystemExit(f"{args.run}: none of its sets has expert votes (AMi-Br and AtNorM-MD have them).")
    render_agreement_report(by_agreement, by_votes, raters)
    if args.append:
        append_results(f"## Expert agreement: {args.run.name}",
                       f"Run `{args.run}`.\n\n" + markdown(by_agreement, by_votes, raters))


if __name__ == "__main__":
    main()
