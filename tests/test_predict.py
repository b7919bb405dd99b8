"""`mitobench predict` reproduces a run's own hold-out probabilities and never overwrites; `report` compares runs."""

from __future__ import annotations

import json
import os
import shutil

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from mitobench.config import load_config
from mitobench.errors import MitobenchError
from mitobench.predict import predict
from mitobench.protocol import run_benchmark
from mitobench.runs import RunDir


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
    assert load_config(run_dir / "config.yaml").dtype == "float32"  # dtype auto, saved as resolved on this CPU
    out, table = predict(run_dir, fixture_root / "AtNorM-Br", tmp_path / "p.csv", cache_dir=str(tmp / "cache"))
    expected = _ensemble(run_dir, "AtNorM-Br")
    got = table.set_index("image")["p_ensemble"]
    np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), atol=1e-5)
    assert set(table["predicted"]) <= {"Atypical", "Normal"}
    assert (table["label"].isin([0, 1])).all()  # class folders: labels known
    assert pd.read_csv(out).shape[0] == len(table)


def test_the_run_breaks_its_metrics_down_by_domain(probe_run):
    """AMi-Br's sets mix MIDOG21 and TUPAC16: metrics_by_domain.csv scores each part from predictions.csv."""
    from mitobench.evaluation.metrics import binary_metrics

    run_dir, _ = probe_run
    by_domain = pd.read_csv(run_dir / "metrics_by_domain.csv", dtype={"fold": str})
    assert set(by_domain["domain"]) == {"MIDOG21", "TUPAC16"}
    assert {"AMi-Br-test", "AMi-Br-train (validation fold)"} <= set(by_domain["dataset"])
    preds = pd.read_csv(run_dir / "predictions.csv", dtype={"fold": str})
    ensemble = preds[(preds["dataset"] == "AMi-Br-test") & (preds["fold"] == "ensemble")]
    threshold = np.mean([v["threshold"] for v in json.loads((run_dir / "fold_info.json").read_text()).values()])
    for domain in ("MIDOG21", "TUPAC16"):
        part = ensemble[ensemble["image"].str.startswith(domain)]  # the fixture's images are named by source
        row = by_domain[(by_domain["dataset"] == "AMi-Br-test") & (by_domain["domain"] == domain)
                        & (by_domain["fold"] == "ensemble") & (by_domain["metric"] == "auroc")].iloc[0]
        assert row["n"] == len(part) > 0
        assert row["value"] == pytest.approx(binary_metrics(part["label"], part["probability"], threshold)["auroc"])
    assert "per domain" in (run_dir / "report.txt").read_text()


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
    twice = tmp_path / "twice.csv"  # the same file by its absolute and its relative path
    twice.write_text(f"path\n{paths[0]}\n{paths[1]}\n{os.path.relpath(paths[0], tmp_path)}\n")
    with pytest.raises(MitobenchError, match=r"twice\.csv row 4: .* is listed twice"):
        predict(run_dir, twice, tmp_path / "d.csv")
    assert not (tmp_path / "d.csv").exists()


def test_predict_on_a_partly_labelled_csv_scores_the_labelled_rows(probe_run, fixture_root, tmp_path, cli):
    """A blank label means unknown (as in a slide's points): the figure is predicted, and the metrics are over
    the labelled rows, said so."""
    run_dir, tmp = probe_run
    atypical = sorted((fixture_root / "AtNorM-Br" / "Atypical").glob("*.png"))
    normal = sorted((fixture_root / "AtNorM-Br" / "Normal").glob("*.png"))
    csv = tmp_path / "partly.csv"
    pd.DataFrame({"path": [str(p) for p in atypical + normal],
                  "label": ["Atypical"] * len(atypical) + ["Normal"] * (len(normal) - 1) + [""]}).to_csv(csv, index=False)
    result = cli("predict", str(run_dir), str(csv), "--out", str(tmp_path / "p.csv"),
                 env={"MITOBENCH_CACHE": str(tmp / "cache")})
    assert result.returncode == 0, result.stderr
    n = len(atypical) + len(normal)
    assert f"over the {n - 1} labelled of {n}" in " ".join(result.stdout.split())
    table = pd.read_csv(tmp_path / "p.csv")
    assert table["label"].isna().sum() == 1 and len(table) == n


def test_converted_images_are_one_warning_line_on_every_call(probe_run, fixture_root, tmp_path, cli):
    """A grey or RGBA patch is converted to RGB with a warning: one plain line, as errors are (no source file or
    code line), and again when the patches come from the cache."""
    from fixtures import make_png

    run_dir, _ = probe_run
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, source in enumerate(sorted((fixture_root / "AtNorM-Br" / "Normal").glob("*.png"))[:3]):
        shutil.copy(source, folder / f"{i}.png")
    make_png(folder / "grey.png", rgb=(90, 90, 90), mode="L")
    env = {"MITOBENCH_CACHE": str(tmp_path / "cache"), "COLUMNS": "1000"}
    for call in (1, 2):  # decoded, then from the cache
        result = cli("predict", str(run_dir), str(folder), "--out", str(tmp_path / f"p{call}.csv"), env=env)
        assert result.returncode == 0, result.stderr
        lines = [line for line in result.stderr.splitlines() if "converted" in line]
        assert len(lines) == 1 and lines[0].startswith("warning: 1 image(s) converted to RGB, e.g. "), result.stderr
        assert "grey.png" in lines[0] and ".py:" not in result.stderr and "Warning:" not in result.stderr


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
    """The run saves the precision it resolved for its device (auto: float32 on a CPU; native: bf16 on a CPU with
    native bf16), so a resume elsewhere and predict apply it (bf16 autocast with the fast depthwise path);
    predict's batches differ from the run's, hence bf16 rounding."""
    monkeypatch.setattr("mitobench.methods.precision.cpu_has_native_bf16", lambda: True)
    run_dir = _run(fixture_root, tmp_path, method="finetune",
                   train={"epochs": 1, "img_size": 64, "batch_size": 8, "tta": True, "precision": precision})
    saved = load_config(run_dir / "config.yaml").train.precision
    assert saved == {"auto": "fp32", "native": "bf16"}[precision]
    title = {"auto": "finetune (float32, 64 px, 1 epoch, TTA 8 views)",
             "native": "finetune (bf16, 64 px, 1 epoch, TTA 8 views)"}[precision]
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
    # each run in full, with how it trained, above the table (rows say #1, #2): never a name cut short
    assert f"#1  {run_dir}: efficientnet_lite0 / probe (logistic head, C by inner CV)" in out.stdout
    assert f"#2  {run_dir}:" in out.stdout
    bad = cli("report", str(run_dir.parent))
    assert bad.returncode == 2 and "not a mitobench run" in bad.stderr and "holds 1" in bad.stderr.replace("\n", " ")
    bad = cli("predict", str(run_dir.parent), str(run_dir))  # the runs folder, not a run: no advice to resume
    assert bad.returncode == 2 and "holds 1" in bad.stderr.replace("\n", " ") and "--resume" not in bad.stderr


def test_report_flags_a_run_with_failed_folds_and_keeps_its_recipe(probe_run, cli, tmp_path):
    """A run whose fold 3 failed (its report.txt starts with a WARNING line): the comparison says so beside it,
    and still finds how the run trained."""
    run_dir, _ = probe_run
    damaged = tmp_path / "failed-fold-run"
    shutil.copytree(run_dir, damaged)
    status = json.loads((damaged / "status.json").read_text())
    (damaged / "status.json").write_text(json.dumps({**status, "failed_folds": {"3": "fold 3: NaN loss"}}))
    report_txt = damaged / "report.txt"
    report_txt.write_text("WARNING: fold(s) [3] FAILED and are excluded\n" + report_txt.read_text())
    out = cli("report", str(damaged), str(run_dir))
    assert out.returncode == 0, out.stderr
    flagged = next(line for line in out.stdout.splitlines() if line.startswith("#1 "))
    assert "(logistic head, C by inner CV)" in flagged and "WARNING: fold(s) 3 FAILED" in flagged
    assert "WARNING" not in next(line for line in out.stdout.splitlines() if line.startswith("#2 "))


def test_report_and_plot_say_random_init(probe_run, cli, tmp_path):
    """A run whose backbone was random init (fold_info.json's record) is tagged in `report`'s legend and in
    `plot`'s titles, legends and runs.txt, as its own report.txt is; a pretrained run is not."""
    run_dir, _ = probe_run
    random_run = tmp_path / "random-init-run"
    shutil.copytree(run_dir, random_run, ignore=shutil.ignore_patterns("plots*"))
    info = json.loads((random_run / "fold_info.json").read_text())
    (random_run / "fold_info.json").write_text(json.dumps({k: {**v, "backbone_weights": "random-init"}
                                                           for k, v in info.items()}))
    assert RunDir(random_run).random_init() and not RunDir(run_dir).random_init()
    out = cli("report", str(random_run), str(run_dir))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "[RANDOM INIT: no pretrained weights]" in next(line for line in lines if line.startswith("#1 "))
    assert "RANDOM INIT" not in next(line for line in lines if line.startswith("#2 "))
    out = cli("plot", str(random_run), str(run_dir), "--out", str(tmp_path / "figs"))
    assert out.returncode == 0, out.stderr
    assert f"#1 {random_run}:  [RANDOM INIT" in out.stdout and f"#2 {run_dir}:" not in out.stdout
    listed = (tmp_path / "figs" / "runs.txt").read_text().splitlines()
    assert "RANDOM INIT" in listed[0] and "RANDOM INIT" not in listed[1]


def test_report_counts_every_validation_fold(probe_run):
    run_dir, _ = probe_run
    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"fold": str})
    ba = metrics[metrics["metric"] == "balanced_accuracy"]
    folds = ba[ba["fold"].str.isdigit()]
    validation = folds[folds["dataset"].str.contains("validation")]
    total, atypical = int(validation["n"].sum()), int(validation["n_atypical"].sum())
    assert total == validation["n"].iloc[0] * len(validation) != validation["n"].iloc[0]  # not fold 1's count alone
    row = next(line for line in (run_dir / "report.txt").read_text().splitlines() if "validation" in line)
    assert f"{total} ({atypical})" in row
    assert ",n,n_atypical" in (run_dir / "metrics.csv").read_text().splitlines()[0] + ","  # header
    assert ".0," not in "".join(line.split(",", 9)[-1] for line in (run_dir / "metrics.csv").read_text().splitlines())


def test_predict_into_a_folder_names_the_file_itself(probe_run, fixture_root, tmp_path):
    run_dir, tmp = probe_run
    folder = tmp_path / "outputs"
    folder.mkdir()
    out, _ = predict(run_dir, fixture_root / "AtNorM-Br", folder, cache_dir=str(tmp / "cache"))
    assert out.parent == folder and out.suffix == ".csv" and out.name.startswith("AtNorM-Br-")
    out2, _ = predict(run_dir, fixture_root / "AtNorM-Br", f"{tmp_path}/new-folder/", cache_dir=str(tmp / "cache"))
    assert out2.parent == tmp_path / "new-folder" and out2.suffix == ".csv"


# --- a damaged or mismatched run folder: one MitobenchError naming the file, nothing written --------------------


def _copy(run_dir, tmp_path):
    import shutil

    return shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("predictions"))


def _refused(run_dir, source, tmp_path, cache, match):
    """predict fails with one MitobenchError matching ``match`` and leaves no output behind."""
    out = tmp_path / "out" / "p.csv"
    with pytest.raises(MitobenchError, match=match) as err:
        predict(run_dir, source, out, cache_dir=str(cache))
    assert not out.parent.exists() or not list(out.parent.iterdir())
    assert not (run_dir / "predictions").exists() or not list((run_dir / "predictions").iterdir())
    return str(err.value)


def _save_probe(path, weight, bias):
    from safetensors.numpy import save_file

    save_file({"weight": np.asarray(weight, dtype=np.float64), "bias": np.asarray(bias, dtype=np.float64)}, str(path))


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "wrong_shape", "wrong_keys", "nan", "inf_bias"])
def test_predict_refuses_a_damaged_probe(probe_run, fixture_root, tmp_path, damage):
    run_dir, tmp = probe_run
    run = _copy(run_dir, tmp_path)
    path = run / "folds" / "fold_3" / "probe.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "wrong_shape":
        _save_probe(path, np.ones(10), [0.0])
    elif damage == "wrong_keys":
        from safetensors.numpy import save_file

        save_file({"w": np.ones(1280), "b": np.zeros(1)}, str(path))
    elif damage == "nan":
        _save_probe(path, np.full(1280, np.nan), [0.0])
    else:
        _save_probe(path, np.zeros(1280), [np.inf])
    message = _refused(run, fixture_root / "AtNorM-Br" / "Atypical", tmp_path, tmp / "cache", "fold_3/probe.safetensors")
    assert "damaged" in message and "Traceback" not in message
    if damage == "wrong_shape":
        assert "the checkpoint does not fit the model" in message
    if damage in ("nan", "inf_bias"):
        assert "NaN or infinite" in message


def test_predict_refuses_a_probe_of_another_model(probe_run, fixture_root, tmp_path):
    """config.yaml edited to another model: the backbone's weights differ from those recorded; in a run from before
    that record, its embeddings (512) do not fit the probes (1280 weights)."""
    import yaml

    run_dir, tmp = probe_run
    run = _copy(run_dir, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": "timm/resnet10t"}))
    _refused(run, fixture_root / "AtNorM-Br" / "Atypical", tmp_path / "a", tmp / "cache", "the backbone built now")
    info = json.loads((run / "fold_info.json").read_text())
    (run / "fold_info.json").write_text(json.dumps({k: {i: v[i] for i in v if i != "backbone_weights"}
                                                    for k, v in info.items()}))
    message = _refused(run, fixture_root / "AtNorM-Br" / "Atypical", tmp_path / "b", tmp / "cache",
                       "fold_1/probe.safetensors")
    assert "the checkpoint does not fit the model" in message and "512" in message


@pytest.mark.parametrize("name,text,match", [
    ("status.json", '{"state": "compl', "status.json"),
    ("fold_info.json", None, "fold_info.json"),
    ("fold_info.json", "[1, 2", "fold_info.json"),
    ("fold_info.json", '{"1": {"threshold": 0.5}}', r"fold_info.json.*fold 1-5"),
])
def test_predict_refuses_broken_run_records(probe_run, fixture_root, tmp_path, name, text, match):
    run_dir, tmp = probe_run
    run = _copy(run_dir, tmp_path)
    if text is None:
        (run / name).unlink()
    else:
        (run / name).write_text(text)
    assert "damaged" in _refused(run, fixture_root / "AtNorM-Br" / "Atypical", tmp_path, tmp / "cache", match)


def test_a_run_folder_from_another_version_says_so(probe_run, fixture_root, tmp_path):
    import yaml

    run_dir, tmp = probe_run
    run = _copy(run_dir, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "future_option": 1}))
    message = _refused(run, fixture_root / "AtNorM-Br" / "Atypical", tmp_path, tmp / "cache", "future_option")
    assert "written by mitobench" in message and "Known:" not in message


def _as_finetune(run_dir, tmp_path):
    import yaml

    run = _copy(run_dir, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["method"], config["train"]["img_size"] = "finetune", 64
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_predict_refuses_a_truncated_finetune_model(probe_run, fixture_root, tmp_path):
    from safetensors.numpy import save_file

    run_dir, tmp = probe_run
    run = _as_finetune(run_dir, tmp_path)
    path = run / "folds" / "fold_1" / "model.safetensors"
    save_file({f"layer{i}.weight": np.zeros(64, dtype=np.float32) for i in range(20)}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    _refused(run, fixture_root / "AtNorM-Br" / "Atypical", tmp_path, tmp / "cache", "fold_1/model.safetensors.*damaged")


def test_predict_refuses_another_models_finetune_checkpoint_in_a_few_words(probe_run, fixture_root, tmp_path):
    from safetensors.torch import save_file

    from mitobench.methods.engine import Classifier
    from mitobench.models.registry import create_backbone

    run_dir, tmp = probe_run
    run = _as_finetune(run_dir, tmp_path)
    other = Classifier(create_backbone("timm/resnet10t", None, allow_download=False))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(run / "folds" / "fold_1" / "model.safetensors"))
    message = _refused(run, fixture_root / "AtNorM-Br" / "Atypical", tmp_path, tmp / "cache",
                       "fold_1/model.safetensors does not fit efficientnet_lite0")
    assert len(message) < 1000 and "unexpected" in message and "missing" in message


def test_predict_refuses_non_finite_probabilities(probe_run, fixture_root, tmp_path, monkeypatch):
    """Whatever the cause, a fold with NaN probabilities stops predict: no CSV averaged over the other folds."""
    from mitobench.predict import FoldPredictor

    run_dir, tmp = probe_run
    real = FoldPredictor.probabilities

    def fold2_nan(self, fold, patches, batch_size):
        p = real(self, fold, patches, batch_size)
        return np.full_like(p, np.nan) if fold == 2 else p

    monkeypatch.setattr(FoldPredictor, "probabilities", fold2_nan)
    _refused(run_dir, fixture_root / "AtNorM-Br" / "Atypical", tmp_path, tmp / "cache",
             r"fold 2 \(.*fold_2/probe.safetensors\) gives non-finite probabilities")


# --- the output file: created exclusively, never replaced ----------------------------------------------------


class _Frozen:
    """``datetime`` for predict's default name: two runs in the same second."""

    @staticmethod
    def now():
        from datetime import datetime

        return datetime(2026, 1, 2, 3, 4, 5)


def test_predict_default_name_never_replaces_a_file_made_meanwhile(probe_run, fixture_root, tmp_path, monkeypatch):
    from mitobench.predict import FoldPredictor

    run_dir, tmp = probe_run
    run = _copy(run_dir, tmp_path)
    monkeypatch.setattr("mitobench.predict.datetime", _Frozen)
    first = run / "predictions" / "Atypical-20260102-030405.csv"
    real = FoldPredictor.probabilities

    def racing(self, fold, patches, batch_size):  # another predict finishes first, in the same second
        if not first.exists():
            first.parent.mkdir(parents=True, exist_ok=True)
            first.write_text("theirs\n")
        return real(self, fold, patches, batch_size)

    monkeypatch.setattr(FoldPredictor, "probabilities", racing)
    source = fixture_root / "AtNorM-Br" / "Atypical"
    out, table = predict(run, source, cache_dir=str(tmp / "cache"))
    assert out == first.with_name("Atypical-20260102-030405-1.csv") and len(pd.read_csv(out)) == len(table)
    out2, _ = predict(run, source, cache_dir=str(tmp / "cache"))
    assert out2.name == "Atypical-20260102-030405-2.csv"
    assert first.read_text() == "theirs\n"
    assert {p.name for p in first.parent.iterdir()} == {first.name, out.name, out2.name}  # no temporaries


def test_predict_explicit_out_made_meanwhile_is_an_error(probe_run, fixture_root, tmp_path, monkeypatch):
    from mitobench.predict import FoldPredictor

    run_dir, tmp = probe_run
    out = tmp_path / "p.csv"
    real = FoldPredictor.probabilities

    def racing(self, fold, patches, batch_size):
        if not out.exists():
            out.write_text("theirs\n")
        return real(self, fold, patches, batch_size)

    monkeypatch.setattr(FoldPredictor, "probabilities", racing)
    with pytest.raises(MitobenchError, match=f"{out} exists; mitobench never overwrites"):
        predict(run_dir, fixture_root / "AtNorM-Br" / "Atypical", out, cache_dir=str(tmp / "cache"))
    assert out.read_text() == "theirs\n" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".p.csv")] == []


def test_predict_refuses_a_header_only_csv_before_writing(probe_run, tmp_path):
    run_dir, _ = probe_run
    csv = tmp_path / "empty.csv"
    csv.write_text("path,label\n")
    with pytest.raises(MitobenchError, match=f"{csv}: no rows"):
        predict(run_dir, csv, tmp_path / "out" / "p.csv")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("below", ["p.csv", "sub/p.csv"])
def test_predict_out_below_a_file_is_a_clear_error(probe_run, fixture_root, tmp_path, below):
    run_dir, _ = probe_run
    (tmp_path / "afile").write_text("mine\n")
    out = tmp_path / "afile" / below
    with pytest.raises(MitobenchError, match=f"{out}: cannot create it: {tmp_path / 'afile'} is a file"):
        predict(run_dir, fixture_root / "AtNorM-Br" / "Atypical", out)
    assert (tmp_path / "afile").read_text() == "mine\n"


# --- predict applies exactly the run's models -------------------------------------------------------------------

def test_probe_predict_embeds_in_the_run_s_dtype(fixture_root, tmp_path):
    run_dir = _run(fixture_root, tmp_path, dtype="bfloat16")
    _, table = predict(run_dir, fixture_root / "AtNorM-Br", tmp_path / "p.csv", cache_dir=str(tmp_path / "cache"))
    expected = _ensemble(run_dir, "AtNorM-Br")
    np.testing.assert_allclose(table.set_index("image")["p_ensemble"].loc[expected.index].to_numpy(),
                               expected.to_numpy(), atol=1e-5)


def test_predict_refuses_a_random_init_probe_or_other_weights(probe_run, fixture_root, tmp_path):
    from mitobench.models.registry import create_backbone

    run_dir, tmp = probe_run
    info = json.loads((run_dir / "fold_info.json").read_text())
    assert {i["backbone_weights"] for i in info.values()} == {create_backbone("efficientnet_lite0").weights_id}
    for weights, match in (("random-init", "was random init"), ("0123456789abcdef", "the backbone built now")):
        run = _copy(run_dir, tmp_path / weights)
        (run / "fold_info.json").write_text(json.dumps({k: {**v, "backbone_weights": weights} for k, v in info.items()}))
        _refused(run, fixture_root / "AtNorM-Br" / "Atypical", tmp_path / weights, tmp / "cache", match)


def test_predict_names_failed_folds(probe_run, fixture_root, tmp_path):
    run_dir, tmp = probe_run
    run = _copy(run_dir, tmp_path)
    info = json.loads((run / "fold_info.json").read_text())
    del info["3"]
    (run / "fold_info.json").write_text(json.dumps(info))
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "failed_folds": {"3": "the loss became nan"}}))
    _refused(run, fixture_root / "AtNorM-Br" / "Atypical", tmp_path, tmp / "cache", r"fold\(s\) \[3\] failed.*--resume")


def test_predict_refuses_class_folders_with_images_elsewhere(probe_run, fixture_root, tmp_path):
    import shutil

    run_dir, tmp = probe_run
    source = shutil.copytree(fixture_root / "AtNorM-Br", tmp_path / "mine")
    stray = next((source / "Normal").iterdir())
    (source / "Unsure").mkdir()
    shutil.copy(stray, source / "Unsure" / "u.png")
    _refused(run_dir, source, tmp_path, tmp / "cache", r"1 image\(s\) lie outside its Atypical/ and Normal/.*u\.png")


def test_printed_paths_are_not_rich_markup(probe_run, fixture_root, tmp_path, cli):
    run_dir, tmp = probe_run
    out = tmp_path / "out" / "[new]" / "p.csv"
    result = cli("predict", str(run_dir), str(fixture_root / "AtNorM-Br" / "Atypical"), "--out", str(out),
                 env={"MITOBENCH_CACHE": str(tmp / "cache"), "COLUMNS": "1000"})
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout + result.stderr and out.is_file()
    again = cli("predict", str(run_dir), str(fixture_root / "AtNorM-Br" / "Atypical"), "--out", str(out),
                env={"MITOBENCH_CACHE": str(tmp / "cache"), "COLUMNS": "1000"})
    assert again.returncode == 2 and str(out) in again.stderr


@pytest.fixture(scope="module")
def slide_case(real_data, tmp_path_factory):
    """Eight real AMi-Br figures twice: as PNG files, and on an 80x pyramidal slide with their centres as points."""
    from PIL import Image

    from fixtures import make_slide, real_figures

    pytest.importorskip("tiffslide")
    tmp = tmp_path_factory.mktemp("slide_case")
    paths = real_figures(real_data)
    (tmp / "files").mkdir()
    for p in paths:
        (tmp / "files" / p.name).write_bytes(p.read_bytes())
    patches = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    centres = make_slide(tmp / "slide.tif", patches, mpp=0.125, upscale=2)
    labels = ["Atypical"] * 4 + ["Normal"] * 4
    pd.DataFrame({"id": [p.name for p in paths], "x": [c[0] for c in centres], "y": [c[1] for c in centres],
                  "label": labels}).to_csv(tmp / "points.csv", index=False)
    return tmp, patches


def test_slide_predictions_match_the_same_figures_as_files(probe_run, slide_case, tmp_path):
    from PIL import Image

    from mitobench.data.slides import read_points
    from mitobench.predict import predict_slide

    run_dir, tmp = probe_run
    case, patches = slide_case
    _, from_files = predict(run_dir, case / "files", tmp_path / "files.csv", cache_dir=str(tmp / "cache"))
    path, from_slide = predict_slide(run_dir, case / "slide.tif", case / "points.csv", tmp_path / "slide.csv",
                                     save_patches=True)
    got = from_slide.set_index("id")["p_ensemble"]
    expected = from_files.set_index("image")["p_ensemble"]
    np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), atol=1e-6)
    assert from_slide["label"].tolist() == [1] * 4 + [0] * 4 and not from_slide["edge_padded"].any()
    assert pd.read_csv(path).shape[0] == 8
    back = read_points(path.with_suffix(".geojson"))  # what QuPath would import, read as mitobench reads points
    assert back["id"].tolist() == from_slide["id"].tolist()
    np.testing.assert_array_equal(back[["x", "y"]].to_numpy(), from_slide[["x", "y"]].to_numpy())
    assert back["label"].tolist() == (from_slide["predicted"] == "Atypical").astype(int).tolist()
    saved = sorted((tmp_path / "slide-patches").glob("*.png"))
    assert [p.name.split("-", 1)[1] for p in saved] == [f"{i}-{c}.png" for i, c in
                                                        zip(from_slide["id"], from_slide["predicted"])]
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in saved]), patches)


def test_slide_predict_never_overwrites_and_cli(probe_run, slide_case, tmp_path, cli):
    from mitobench.predict import predict_slide

    run_dir, _ = probe_run
    case, _ = slide_case
    (tmp_path / "taken.geojson").write_text("mine")
    with pytest.raises(MitobenchError, match="never overwrites"):
        predict_slide(run_dir, case / "slide.tif", case / "points.csv", tmp_path / "taken.csv")
    assert (tmp_path / "taken.geojson").read_text() == "mine" and not (tmp_path / "taken.csv").exists()
    partly = pd.read_csv(case / "points.csv")
    partly.loc[[0, 7], "label"] = None  # two figures nobody labelled: metrics over the other six
    partly.to_csv(tmp_path / "partly.csv", index=False)
    result = cli("predict", str(run_dir), str(case / "slide.tif"), "--points", str(tmp_path / "partly.csv"),
                 "--out", str(tmp_path / "out") + "/")
    assert result.returncode == 0, result.stderr
    assert "8 figures:" in result.stdout and "QuPath GeoJSON" in result.stdout
    assert "ensemble (over the 6 labelled of 8): balanced_accuracy" in " ".join(result.stdout.split())
    written = list((tmp_path / "out").glob("slide-*.csv"))
    assert len(written) == 1 and written[0].with_suffix(".geojson").is_file()
    bad = cli("predict", str(run_dir), str(case / "points.csv"), "--points", str(case / "points.csv"))
    assert bad.returncode == 2 and "points.csv: cannot read this slide" in " ".join(bad.stderr.split())
    assert cli("predict", str(run_dir), str(case / "files"), "--slide-mpp", "0.25").returncode == 2
    no_points = cli("predict", str(run_dir), str(case / "slide.tif"))
    assert no_points.returncode == 2 and "give the mitotic figures" in " ".join(no_points.stderr.split())


def test_slide_predict_leaves_nothing_when_interrupted_or_misnamed(probe_run, slide_case, tmp_path, monkeypatch):
    """The CSV is written last: an interrupt while the patches are saved removes the GeoJSON and the patches."""
    from PIL import Image

    import mitobench.predict as predict_module

    run_dir, _ = probe_run
    case, _ = slide_case
    with pytest.raises(MitobenchError, match="name a .csv file"):
        predict_module.predict_slide(run_dir, case / "slide.tif", case / "points.csv", tmp_path / "res.geojson")
    with pytest.raises(MitobenchError, match="res.txt: name a .csv file"):  # patches too: the file is a CSV
        predict_module.predict(run_dir, case / "files", tmp_path / "res.txt")
    assert not (tmp_path / "res.txt").exists()
    saved = []
    real = Image.fromarray

    def interrupted(array):
        if len(saved) == 3:
            raise KeyboardInterrupt
        saved.append(1)
        return real(array)

    monkeypatch.setattr(predict_module.Image, "fromarray", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict_slide(run_dir, case / "slide.tif", case / "points.csv", tmp_path / "r.csv",
                                     save_patches=True)
    assert saved and list(tmp_path.iterdir()) == []


def test_a_folder_of_slides_with_one_points_csv(probe_run, slide_case, tmp_path, cli):
    """Points on two slides at different resolutions, in one CSV with a slide column: the same probabilities as
    the figures as files, one GeoJSON per slide."""
    from fixtures import make_slide
    from mitobench.data.slides import read_points
    from mitobench.predict import predict_slide

    run_dir, tmp = probe_run
    case, patches = slide_case
    names = pd.read_csv(case / "points.csv")["id"].tolist()  # the file of each patch, in slide_case's order
    folder = tmp_path / "slides"
    folder.mkdir()
    first = make_slide(folder / "a.tif", patches[:3], mpp=0.25, pyramid=False)
    second = make_slide(folder / "b.svs.tif", patches[3:], mpp=0.125, upscale=2)
    points = pd.DataFrame({"slide": ["a.tif"] * 3 + ["b.svs.tif"] * 5, "id": ["1", "2", "3", "1", "2", "3", "4", "5"],
                           "x": [c[0] for c in first + second], "y": [c[1] for c in first + second]})
    points.to_csv(tmp_path / "points.csv", index=False)
    _, from_files = predict(run_dir, case / "files", tmp_path / "files.csv", cache_dir=str(tmp / "cache"))
    path, table = predict_slide(run_dir, folder, tmp_path / "points.csv", tmp_path / "out.csv", save_patches=True)
    expected = from_files.set_index("image").loc[names, "p_ensemble"].to_numpy()
    np.testing.assert_allclose(table["p_ensemble"].to_numpy(), expected, atol=1e-6)
    assert table["slide_mpp"].tolist() == [0.25] * 3 + [0.125] * 5 and (table["crop_mpp"] == 0.25).all()
    geo = tmp_path / "out-geojson"
    assert sorted(p.name for p in geo.iterdir()) == ["a.tif.geojson", "b.svs.tif.geojson"]
    assert read_points(geo / "b.svs.tif.geojson")["id"].tolist() == ["1", "2", "3", "4", "5"]
    assert len(list((tmp_path / "out-patches").glob("*-b.svs-*.png"))) == 5
    summary = pd.read_csv(tmp_path / "out-summary.csv")
    assert summary["slide"].tolist() == ["a.tif", "b.svs.tif"] and summary["figures"].tolist() == [3, 5]
    for name, rows in table.groupby("slide"):
        row = summary.set_index("slide").loc[name]
        assert row["predicted_atypical"] == (rows["predicted"] == "Atypical").sum()
        assert row["atypical_fraction"] == pytest.approx(row["predicted_atypical"] / len(rows))
        assert row["expected_atypical"] == pytest.approx(rows["p_ensemble"].sum())
    result = cli("predict", str(run_dir), str(folder), "--points", str(tmp_path / "points.csv"), "--out",
                 str(tmp_path / "cli") + "/")
    assert result.returncode == 0, result.stderr
    printed = " ".join(result.stdout.split())
    assert "per slide" in printed and "b.svs.tif" in printed and "per-slide summary:" in printed
    assert len(list((tmp_path / "cli").glob("slides-*-summary.csv"))) == 1
    assert len(list((tmp_path / "cli").glob("slides-*-geojson/*.geojson"))) == 2


def test_slide_folder_and_points_must_agree(probe_run, slide_case, tmp_path):
    from mitobench.predict import predict_slide

    run_dir, _ = probe_run
    case, _ = slide_case
    with pytest.raises(MitobenchError, match="is a folder: give a points CSV with a slide column"):
        predict_slide(run_dir, case, case / "points.csv", tmp_path / "a.csv")
    pd.DataFrame({"slide": ["slide.tif", "other.svs"], "x": [1, 2], "y": [1, 2]}).to_csv(tmp_path / "p.csv",
                                                                                         index=False)
    with pytest.raises(MitobenchError, match="slide 'other.svs' \\(row 3\\) is not a file in"):
        predict_slide(run_dir, case, tmp_path / "p.csv", tmp_path / "a.csv")
    with pytest.raises(MitobenchError, match="points on other slides than slide.tif.*\\(e.g. 'other.svs'\\)"):
        predict_slide(run_dir, case / "slide.tif", tmp_path / "p.csv", tmp_path / "a.csv")
    pd.DataFrame({"slide": ["slide.tif", "./slide.tif"], "x": [1, 2], "y": [1, 2]}).to_csv(tmp_path / "q.csv",
                                                                                           index=False)
    for source, message in ((case, "slide slide.tif is named two ways \\('slide.tif' and './slide.tif'\\)"),
                            (case / "slide.tif", "this slide named in several ways")):
        with pytest.raises(MitobenchError, match=message):
            predict_slide(run_dir, source, tmp_path / "q.csv", tmp_path / "a.csv")
    assert not list(tmp_path.glob("a*"))


def test_one_slide_from_a_cohort_csv_and_an_mpp_override(probe_run, slide_case, tmp_path):
    """A cohort CSV cut to one slide names it by path: accepted, one GeoJSON file; --slide-mpp over the file's
    0.125 um/px warns, and crops at what it says (a 0.25 um/px slide read as is: half the span)."""
    from mitobench.predict import predict_slide

    run_dir, _ = probe_run
    case, _ = slide_case
    points = pd.read_csv(case / "points.csv").assign(slide="cohort/slide.tif")
    points.to_csv(tmp_path / "p.csv", index=False)
    with pytest.warns(UserWarning, match="records 0.125 um/px; --slide-mpp 0.25 overrides it"):
        path, table = predict_slide(run_dir, case / "slide.tif", tmp_path / "p.csv", tmp_path / "one.csv",
                                    slide_mpp=0.25)
    assert path.with_suffix(".geojson").is_file() and not (tmp_path / "one-geojson").exists()
    assert not (tmp_path / "one-summary.csv").exists()  # one slide: the CLI prints its counts
    assert (table["slide_mpp"] == 0.25).all() and (table["crop_mpp"] == 0.25).all()


def test_an_interrupted_predict_says_nothing_was_written(probe_run, fixture_root, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mitobench import predict as predict_module
    from mitobench.cli import app

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_module, "predict", stopped)
    result = CliRunner().invoke(app, ["predict", str(probe_run[0]), str(fixture_root / "AtNorM-Br"),
                                      "--out", str(tmp_path / "p.csv")])
    try:  # click >= 8.2 keeps stderr apart (and also in output); older clicks mix it into output
        stderr = result.stderr
    except ValueError:
        stderr = ""
    said = " ".join((result.output + stderr).split())
    assert result.exit_code != 0 and "interrupted: no predictions were written" in said
    assert not (tmp_path / "p.csv").exists()
