"""`mitobench predict` reproduces a run's own hold-out probabilities and never overwrites; `report` compares runs."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from mitobench.config import load_config
from mitobench.errors import MitobenchError
from mitobench.predict import predict
from mitobench.protocol import run_benchmark


def _run(root, tmp_path, **overrides):
    values = {"data_root": str(root), "cache_dir": str(tmp_path / "cache"), "runs_dir": str(tmp_path / "runs"),
              "n_boot": 100, **overrides}
    return run_benchmark(load_config(None, values), console=Console(file=io.StringIO()))


def _ensemble(run_dir, dataset: str) -> pd.Series:
    preds = pd.read_csv(run_dir / "predictions.csv", dtype={"fold": str})
    part = preds[(preds["dataset"] == dataset) & (preds["fold"] == "ensemble")]
    return part.set_index("image")["probability"]


@pytest.fixture(scope="module")
def probe_run(fixture_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict_probe")
    return _run(fixture_root, tmp), tmp


def test_probe_predict_matches_the_runs_own_probabilities(probe_run, fixture_root, tmp_path):
    run_dir, tmp = probe_run
    out, table = predict(run_dir, fixture_root / "AtNorM-Br", tmp_path / "p.csv", cache_dir=str(tmp / "cache"))
    expected = _ensemble(run_dir, "AtNorM-Br")
    got = table.set_index("image")["p_ensemble"]
    np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), atol=1e-5)
    assert set(table["predicted"]) <= {"Atypical", "Normal"}
    assert (table["label"].isin([0, 1])).all()  # class folders: labels known
    assert pd.read_csv(out).shape[0] == len(table)


def test_predict_never_overwrites(probe_run, fixture_root, tmp_path):
    run_dir, tmp = probe_run
    out = tmp_path / "p.csv"
    predict(run_dir, fixture_root / "AtNorM-Br", out, cache_dir=str(tmp / "cache"))
    before = out.read_bytes()
    with pytest.raises(MitobenchError, match="never overwrites"):
        predict(run_dir, fixture_root / "AtNorM-Br", out, cache_dir=str(tmp / "cache"))
    assert out.read_bytes() == before


def test_predict_on_unlabelled_folder_and_csv(probe_run, fixture_root, tmp_path):
    run_dir, tmp = probe_run
    _, table = predict(run_dir, fixture_root / "AtNorM-Br" / "Normal", tmp_path / "a.csv", cache_dir=str(tmp / "cache"))
    assert table["label"].isna().all() and len(table) == len(list((fixture_root / "AtNorM-Br" / "Normal").glob("*.png")))
    csv = tmp_path / "list.csv"
    paths = sorted((fixture_root / "AtNorM-Br" / "Atypical").glob("*.png"))
    pd.DataFrame({"path": [str(p) for p in paths]}).to_csv(csv, index=False)
    _, table = predict(run_dir, csv, tmp_path / "b.csv", cache_dir=str(tmp / "cache"))
    assert len(table) == len(paths)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"file": ["x.png"]}).to_csv(bad, index=False)
    with pytest.raises(MitobenchError, match="path"):
        predict(run_dir, bad, tmp_path / "c.csv")


def test_predict_refuses_an_incomplete_run(probe_run, tmp_path, fixture_root):
    run_dir, _ = probe_run
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "status.json").write_text('{"state": "running"}')
    with pytest.raises(MitobenchError, match="not a complete"):
        predict(broken, fixture_root / "AtNorM-Br", tmp_path / "p.csv")


@pytest.mark.slow
@pytest.mark.parametrize("precision,atol", [("auto", 1e-4), ("native", 1e-2)])
def test_finetune_predict_matches_the_runs_own_probabilities(fixture_root, tmp_path, monkeypatch, precision, atol):
    """native: the run saves the precision it resolved (bf16 on a CPU with native bf16) and predict applies it
    (bf16 autocast with the fast depthwise path); predict's batches differ from the run's, hence bf16 rounding."""
    monkeypatch.setattr("mitobench.methods.precision.cpu_has_native_bf16", lambda: True)
    run_dir = _run(fixture_root, tmp_path, method="finetune",
                   train={"epochs": 1, "img_size": 64, "batch_size": 8, "tta": True, "precision": precision})
    saved = load_config(run_dir / "config.yaml").train.precision
    assert saved == {"auto": "auto", "native": "bf16"}[precision]
    title = {"auto": "finetune (float32, 64 px, 1 epoch)", "native": "finetune (bf16, 64 px, 1 epoch)"}[precision]
    assert title in (run_dir / "report.txt").read_text()  # the report says how the models trained
    _, table = predict(run_dir, fixture_root / "AtNorM-MD", tmp_path / "p.csv", cache_dir=str(tmp_path / "cache"))
    expected = _ensemble(run_dir, "AtNorM-MD")
    np.testing.assert_allclose(table.set_index("image")["p_ensemble"].loc[expected.index].to_numpy(),
                               expected.to_numpy(), atol=atol)


def test_report_command_compares_runs(probe_run, cli):
    run_dir, _ = probe_run
    out = cli("report", str(run_dir), str(run_dir))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("AtNorM-Br") >= 4  # two runs x two metrics
    bad = cli("report", str(run_dir.parent))
    assert bad.returncode == 2 and "metrics.csv" in bad.stderr
