"""`mitobench plot`: the curves drawn are the run's own (their AUROC is metrics.csv's), the calibration numbers are
right, nothing is overwritten, and a damaged or unfinished run is one clear error."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console

from mitobench.config import load_config
from mitobench.errors import MitobenchError
from mitobench.evaluation.plots import calibration, curve_summary, plot_runs
from mitobench.protocol import run_benchmark

WIDE = {"COLUMNS": "1000"}


@pytest.fixture(scope="module")
def runs(fixture_root, tmp_path_factory):
    """Two probe runs of the synthetic data: the logistic head and the paper's torch head."""
    tmp = tmp_path_factory.mktemp("plots")
    made = []
    for head in ("logistic", "torch"):
        values = {"data_root": str(fixture_root), "cache_dir": str(tmp / "cache"), "runs_dir": str(tmp / "runs"),
                  "n_boot": 50, "probe.head": head, "probe.max_epochs": 3}
        made.append(run_benchmark(load_config(None, values), console=Console(file=io.StringIO())))
    return made


def test_calibration_bins_and_ece():
    labels = np.array([0, 0, 1, 1, 1, 0])
    probs = np.array([0.05, 0.15, 0.12, 0.95, 0.91, 0.55])
    table = calibration(labels, probs)
    assert table["bin"].tolist() == [0, 1, 5, 9] and table["n"].tolist() == [1, 2, 1, 2]
    assert table["observed"].tolist() == [0.0, 0.5, 0.0, 1.0]
    expected = (1 * 0.05 + 2 * abs(0.135 - 0.5) + 1 * 0.55 + 2 * abs(0.93 - 1.0)) / 6
    s = curve_summary(labels, probs, 0.5)
    assert s["ece"] == pytest.approx(expected)  # the reliability diagram's bins are the ECE's
    assert s["sensitivity"] == pytest.approx(2 / 3) and s["specificity"] == pytest.approx(2 / 3)
    assert s["brier"] == pytest.approx(np.mean((probs - labels) ** 2))


def test_one_run_draws_each_set_with_its_folds(runs, cli):
    run = runs[0]
    result = cli("plot", str(run), env=WIDE)
    assert result.returncode == 0, result.stderr
    out = run / "plots"
    table = pd.read_csv(out / "curves.csv", dtype={"fold": str})
    metrics = pd.read_csv(run / "metrics.csv", dtype={"fold": str})
    auroc = metrics[metrics["metric"] == "auroc"].set_index(["dataset", "fold"])["value"]
    for row in table.itertuples():  # every curve drawn is the run's own model on the run's own set
        assert row.auroc == pytest.approx(auroc.loc[(row.dataset, row.fold)])
    assert set(table["fold"]) == {"1", "2", "3", "4", "5", "ensemble"}
    for dataset in table["dataset"].unique():
        png = out / f"{dataset.replace(' ', '_').replace('(', '').replace(')', '').replace('-', '_')}.png"
        with Image.open(png) as image:
            assert image.size[0] > 1000 and image.size[1] > 400
    assert f"figures and curves.csv written to {out}" in " ".join(result.stdout.split())
    with Image.open(out / "agreement.png") as image:  # the fixture's AMi-Br and AtNorM-MD carry expert votes
        assert image.size[0] > 1000  # one panel per voted set: the validation folds, AMi-Br-test, AtNorM-MD
    again = cli("plot", str(run), env=WIDE)  # a second call never touches the first's figures
    assert again.returncode == 0 and (run / "plots-1" / "curves.csv").is_file()
    explicit = cli("plot", str(run), "--out", str(out), env=WIDE)
    assert explicit.returncode == 2 and "never overwrites" in explicit.stderr


def test_a_killed_call_leaves_nothing_that_blocks_the_next(runs, tmp_path):
    (tmp_path / ".figs.abc123.partial").mkdir()  # what a SIGKILL mid-drawing leaves behind
    table = plot_runs(runs[:1], tmp_path / "figs")
    assert (tmp_path / "figs" / "curves.csv").is_file() and len(table) > 0
    drawn = set(pd.read_csv(tmp_path / "figs" / "curves.csv")["figure"]) | {"agreement.png"}
    assert drawn == {p.name for p in (tmp_path / "figs").glob("*.png")}


def test_several_runs_draw_their_ensembles(runs, tmp_path):
    table = plot_runs(runs, tmp_path / "both")
    holdouts = table[table["fold"] == "ensemble"]
    assert set(holdouts["run"]) == {1, 2}
    assert not ((table["fold"] != "ensemble") & table["dataset"].isin(holdouts["dataset"])).any()
    assert (tmp_path / "both" / "runs.txt").read_text().startswith(f"#1  {runs[0]}")
    assert (tmp_path / "both" / "agreement.png").is_file()
    assert not list(tmp_path.glob(".*partial"))


def test_a_run_with_failed_folds_says_so_on_its_ensemble_curve(runs, tmp_path, monkeypatch):
    import json
    import shutil

    from mitobench.evaluation import plots

    failed = shutil.copytree(runs[0], tmp_path / "failed", ignore=shutil.ignore_patterns("plots*"))
    status = json.loads((failed / "status.json").read_text())
    (failed / "status.json").write_text(json.dumps({**status, "failed_folds": {"3": "fold 3: NaN loss"}}))
    legends = []
    real = plots._figure
    monkeypatch.setattr(plots, "_figure", lambda dataset, parts, title: legends.extend(p[0] for p in parts)
                        or real(dataset, parts, title))
    plot_runs([failed, runs[1]], tmp_path / "figs")
    assert "#1 ensemble (fold 3 FAILED, left out)" in legends and "#2 ensemble" in legends
    listed = (tmp_path / "figs" / "runs.txt").read_text().splitlines()
    assert "fold 3 FAILED" in listed[0] and "FAILED" not in listed[1]


def test_an_unfinished_or_damaged_run_is_refused(runs, tmp_path):
    import json
    import shutil

    broken = shutil.copytree(runs[0], tmp_path / "broken", ignore=shutil.ignore_patterns("plots*"))
    (broken / "calls_by_votes.csv").write_text("dataset,n\nAMi-Br-test,3\n")
    with pytest.raises(MitobenchError, match="calls_by_votes.csv: not a mitobench calls table"):
        plot_runs([broken], tmp_path / "out")
    (broken / "predictions.csv").write_text("not,a\nrun,file\n")
    with pytest.raises(MitobenchError, match="the run folder is damaged"):
        plot_runs([broken], tmp_path / "out")
    (broken / "predictions.csv").unlink()  # a complete run missing a result file: damaged, not resumable
    with pytest.raises(MitobenchError, match="finished but has no predictions.csv: the run folder is damaged") as err:
        plot_runs([broken], tmp_path / "out")
    assert "--resume" not in str(err.value)
    (broken / "status.json").write_text(json.dumps({"state": "failed"}))
    with pytest.raises(MitobenchError, match="not a complete run.*--resume"):
        plot_runs([broken], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_report_compares_runs_by_expert_agreement(runs, cli, tmp_path):
    """`mitobench report` adds the runs' BA on unanimous and split-vote figures and their kappa with the experts."""
    import shutil

    from mitobench.evaluation.agreement import kappa_summary

    old = shutil.copytree(runs[1], tmp_path / "old", ignore=shutil.ignore_patterns("plots*"))
    for name in ("metrics_by_agreement.csv", "calls_by_votes.csv", "rater_agreement.csv"):
        (old / name).unlink()  # as a run made before the agreement tables
    result = cli("report", str(runs[0]), str(old), env=WIDE)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "by expert agreement" in text and "#2: no tables" in text
    by_agreement = pd.read_csv(runs[0] / "metrics_by_agreement.csv", dtype={"fold": str})
    ba = by_agreement[(by_agreement["dataset"] == "AMi-Br-test") & (by_agreement["metric"] == "balanced_accuracy")]
    for group in ("unanimous", "split"):
        get = ba[ba["agreement"] == group].set_index("fold")["value"]
        assert f"{get['mean']:.4f} +- {get['sd']:.4f} | {get['ensemble']:.4f}" in text
    kappa = kappa_summary(pd.read_csv(runs[0] / "rater_agreement.csv")).set_index("dataset").loc["AMi-Br-test"]
    assert f"{kappa['model_mean']:.3f} ({kappa['expert_pairs_mean']:.3f})" in text
    (old / "metrics_by_agreement.csv").write_text("nothing,useful\n1,2\n")
    damaged = cli("report", str(old), env=WIDE)
    assert damaged.returncode == 2 and "not a mitobench agreement table" in damaged.stderr


@pytest.mark.parametrize("name, cut", [("predictions.csv", "mid-row"), ("predictions.csv", "row boundary"),
                                       ("predictions.csv", "last set"), ("metrics.csv", "mid-row"),
                                       ("metrics.csv", "row boundary"), ("metrics.csv", "last set"),
                                       ("metrics_by_agreement.csv", "mid-row")])
def test_a_result_file_cut_short_is_refused_not_drawn_or_tabled(runs, cli, tmp_path, name, cut):
    """A copy that stopped or a disk that filled: one error naming the file, never a table of nan or the folds
    that survived (the figures below are the run's first rows only)."""
    import shutil

    broken = shutil.copytree(runs[0], tmp_path / "broken", ignore=shutil.ignore_patterns("plots*"))
    data = (broken / name).read_bytes()
    half = len(data) // 2
    if cut == "last set":  # cut where the last set's rows begin: every row left is whole
        table = pd.read_csv(broken / name, dtype={"fold": str})
        last = table["dataset"].iloc[-1]
        table[table["dataset"] != last].to_csv(broken / name, index=False)
    else:
        (broken / name).write_bytes(data[:half] if cut == "mid-row" else data[:data.rindex(b"\n", 0, half) + 1])
    command = "plot" if name == "predictions.csv" else "report"
    result = cli(command, str(broken), "--out", str(tmp_path / "out"), env=WIDE) if command == "plot" else \
        cli(command, str(broken), env=WIDE)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and f"{name} is incomplete" in " ".join(result.stderr.split())
    assert "the run folder is damaged" in " ".join(result.stderr.split())
    assert result.stdout.strip() == "" and not (tmp_path / "out").exists()  # nothing shown, nothing drawn


@pytest.mark.parametrize("content", [b"[]", b"\x89PNG\r\n\x1a\n\x00\x00binary"])
def test_a_status_or_config_that_is_no_json_object_or_text_is_one_clear_error(runs, cli, fixture_root, tmp_path,
                                                                                content):
    import json
    import shutil

    broken = shutil.copytree(runs[0], tmp_path / "broken", ignore=shutil.ignore_patterns("plots*"))
    (broken / "status.json").write_bytes(content)
    for args in (("report", str(broken)), ("plot", str(broken))):
        result = cli(*args, env=WIDE)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        assert "status.json: cannot read it; the run folder is damaged" in " ".join(result.stderr.split())
    # --resume finds every fold finished and writes the same results and a good status.json again
    before = (broken / "metrics.csv").read_text()
    result = cli("run", "--resume", str(broken), env=WIDE)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert json.loads((broken / "status.json").read_text())["state"] == "complete"
    assert (broken / "metrics.csv").read_text() == before
    (broken / "config.yaml").write_bytes(content if content != b"[]" else b"model: [unclosed\nmethod: probe\n")
    result = cli("predict", str(broken), str(fixture_root / "AtNorM-Br"), "--out", str(tmp_path / "p.csv"), env=WIDE)
    text = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in result.stderr and "config.yaml" in text, result.stderr
    assert ("not a text (UTF-8) YAML config" in text) if content != b"[]" else ("is not valid YAML at line" in text)
