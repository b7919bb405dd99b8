"""The ``mitobench`` command: help, and every kind of bad input gets one clear error and exit code 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fixtures import make_png

WIDE = {"COLUMNS": "1000"}


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def assert_clear_error(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("error:") == 1, result.stderr
    for needle in needles:
        assert squash(needle) in squash(result.stderr), (needle, result.stderr)


def assert_no_complete_run(runs: Path) -> None:
    assert not list(runs.glob("*/metrics.csv"))
    for status in runs.glob("*/status.json"):
        assert json.loads(status.read_text())["state"] != "complete"


@pytest.fixture
def root(fixture_root, tmp_path):
    """A private copy of the synthetic data root, to break."""
    return Path(shutil.copytree(fixture_root, tmp_path / "root"))


def run_cmd(cli, root, tmp_path, *extra):
    return cli("run", "--data-root", str(root), "--runs-dir", str(tmp_path / "runs"),
               "--cache-dir", str(tmp_path / "cache"), *extra, env=WIDE)


def test_help(cli):
    result = cli("--help", env=WIDE)
    assert result.returncode == 0
    for command in ("run", "embed", "data"):
        assert command in result.stdout
    run_help = cli("run", "--help", env=WIDE)
    assert run_help.returncode == 0
    for option in ("--data-root", "--model", "--method", "--resume", "--config", "--preset"):
        assert option in run_help.stdout
    data_help = cli("data", "--help", env=WIDE)
    assert data_help.returncode == 0 and "fetch" in data_help.stdout and "check" in data_help.stdout


def test_unknown_model(cli, fixture_root, tmp_path):
    result = run_cmd(cli, fixture_root, tmp_path, "--model", "no_such_model_xyz")
    assert_clear_error(result, "no_such_model_xyz", "mitobench models list")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_error_messages_keep_long_paths_whole(cli, tmp_path):
    """An error's paths and URLs are never broken across lines (the terminal wraps them), so they copy whole."""
    missing = tmp_path / ("a-deeply-nested-folder-" * 4) / "weights.safetensors"
    result = cli("models", "check", "efficientnet_lite0", "--weights", str(missing), env={"COLUMNS": "60"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(missing) in result.stderr  # not squashed: one unbroken line


def test_data_root_without_datasets(cli, tmp_path):
    empty = tmp_path / "empty"
    (empty / "something").mkdir(parents=True)
    result = run_cmd(cli, empty, tmp_path)
    assert_clear_error(result, str(empty), "AMi-Br")
    assert_no_complete_run(tmp_path / "runs")


def test_corrupt_png(cli, root, tmp_path):
    victim = sorted((root / "AMi-Br" / "Normal").glob("*.png"))[3]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    result = run_cmd(cli, root, tmp_path)
    assert_clear_error(result, str(victim), "cannot decode")
    assert_no_complete_run(tmp_path / "runs")


def test_wrong_size_image(cli, root, tmp_path):
    victim = sorted((root / "AtNorM-Br" / "Normal").glob("*.png"))[0]
    make_png(victim, size=64)
    result = run_cmd(cli, root, tmp_path)
    assert_clear_error(result, str(victim), "64x64")
    assert_no_complete_run(tmp_path / "runs")


def test_csv_missing_a_column(cli, root, tmp_path):
    csv = root / "amibr_train_split.csv"
    pd.read_csv(csv).drop(columns=["final_label"]).to_csv(csv, index=False)
    result = run_cmd(cli, root, tmp_path)
    assert_clear_error(result, str(csv), "final_label")
    assert_no_complete_run(tmp_path / "runs")


def test_unknown_label(cli, root, tmp_path):
    csv = root / "amibr_train_split.csv"
    frame = pd.read_csv(csv)
    frame.loc[4, "final_label"] = "Mitosis"
    frame.to_csv(csv, index=False)
    result = run_cmd(cli, root, tmp_path)
    assert_clear_error(result, str(csv), "'Mitosis'", "row 6")
    assert_no_complete_run(tmp_path / "runs")


def test_missing_listed_image(cli, root, tmp_path):
    row = pd.read_csv(root / "amibr_train_split.csv").iloc[7]
    (root / "AMi-Br" / row["final_label"] / row["dataset_uid"]).unlink()
    result = run_cmd(cli, root, tmp_path)
    assert_clear_error(result, row["dataset_uid"], "missing")
    assert_no_complete_run(tmp_path / "runs")


def test_same_name_in_both_class_folders(cli, root, tmp_path):
    shutil.copy(root / "AtNorM-Br" / "Atypical" / "1.png", root / "AtNorM-Br" / "Normal" / "1.png")
    result = run_cmd(cli, root, tmp_path)
    assert_clear_error(result, "1.png", "both", "ambiguous")
    assert_no_complete_run(tmp_path / "runs")


def test_bad_config_file_and_values(cli, fixture_root, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"epochz": 3}}))
    assert_clear_error(run_cmd(cli, fixture_root, tmp_path, "--config", str(cfg)), "epochz", str(cfg))
    assert_clear_error(run_cmd(cli, fixture_root, tmp_path, "--method", "boosting"), "boosting")
    assert_clear_error(run_cmd(cli, fixture_root, tmp_path, "--set", "train.nope=1"), "nope")
    assert_no_complete_run(tmp_path / "runs")


@pytest.mark.parametrize("model", ["timm/resnet10t", "timm/mobilevit_xxs", "timm/levit_128"])  # a CNN; ViT-like models
# whose layers the ViT regex does not match (mobilevit) or matches where peft cannot adapt them (LeViT's LinearNorm)
def test_lora_without_regex(cli, fixture_root, tmp_path, model):
    result = run_cmd(cli, fixture_root, tmp_path, "--method", "lora", "--model", model)
    assert_clear_error(result, model, "LoRA")
    assert_no_complete_run(tmp_path / "runs")


def test_resume_refuses_options_it_would_ignore(cli, fixture_root, tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "folds").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data_root": str(fixture_root)}))
    (run / "status.json").write_text(json.dumps({"state": "interrupted"}))
    result = cli("run", "--resume", str(run), "--model", "timm/resnet18", "--set", "n_boot=7",
                 "--set", "train.eval_batch_size=16", env=WIDE)
    assert_clear_error(result, "--resume", "model", "--set n_boot=7", "ignored", "train.eval_batch_size")
    ignored = " ".join(result.stderr.split()).split("ignored:")[1].split(". Drop")[0]
    assert "n_boot" in ignored and "eval_batch_size" not in ignored  # that one may change on resume
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"  # untouched
    assert "eval_batch_size" not in (run / "config.yaml").read_text()


def test_a_run_still_training_is_neither_resumed_twice_nor_called_unfinished(cli, fixture_root, tmp_path):
    """A live process holds the run folder's lock: --resume is refused (nothing written), predict and report say to
    wait; once that process is gone (killed), they say to resume it."""
    import subprocess
    import sys

    run = tmp_path / "runs" / "r"
    (run / "folds").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data_root": str(fixture_root)}))
    (run / "metrics.csv").write_text("dataset,fold,metric,value\n")
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                               "from mitobench.runs import RunDir; r = RunDir(sys.argv[2]); r.lock(); "
                               "r.set_status('running'); print('locked', flush=True); sys.stdin.read()",
                               str(Path(__file__).resolve().parents[1] / "src"), str(run)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status = (run / "status.json").read_text()
        assert f'"pid": {holder.pid}' in status
        assert_clear_error(cli("run", "--resume", str(run), env=WIDE), str(run), f"pid {holder.pid}", "wait")
        assert (run / "status.json").read_text() == status  # untouched
        assert_clear_error(cli("report", str(run), env=WIDE), "still being run", "wait for it")
        assert_clear_error(cli("predict", str(run), str(fixture_root / "AtNorM-Br"), env=WIDE), "still being run")
    finally:
        holder.kill()
        holder.wait()
    assert_clear_error(cli("report", str(run), env=WIDE), "status running", f"mitobench run --resume {run}")


def test_resume_names_the_flags_it_would_ignore(cli, fixture_root, tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "folds").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data_root": str(fixture_root)}))
    (run / "status.json").write_text(json.dumps({"state": "interrupted"}))
    result = cli("run", "--resume", str(run), "--fold-workers", "2", "--probe-head", "torch", "--epochs", "3", env=WIDE)
    assert_clear_error(result, "--fold-workers", "--probe-head", "--epochs")
    result = cli("run", "--resume", str(run), "--offline", "--no-tta", env=WIDE)  # off-switches named as typed
    assert_clear_error(result, "--offline", "--no-tta")
    assert "--allow-download" not in result.stderr


def test_resume_may_change_the_evaluation_batch_size(cli, fixture_root, tmp_path):
    assert run_cmd(cli, fixture_root, tmp_path).returncode == 0
    (run,) = (tmp_path / "runs").iterdir()
    (run / "folds" / "fold_3.npz").unlink()
    (run / "status.json").write_text(json.dumps({"state": "interrupted"}))
    result = cli("run", "--resume", str(run), "--set", "train.eval_batch_size=16", env=WIDE)
    assert result.returncode == 0, result.stderr
    assert "train.eval_batch_size=16" in result.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["eval_batch_size"] == 16
    assert json.loads((run / "status.json").read_text())["state"] == "complete"


def test_bad_yaml_in_set_and_a_data_root_that_is_a_file(cli, fixture_root, tmp_path):
    assert_clear_error(run_cmd(cli, fixture_root, tmp_path, "--set", "n_boot=[1,"), "n_boot=[1,", "YAML")
    not_a_folder = tmp_path / "root.txt"
    not_a_folder.write_text("")
    assert_clear_error(cli("run", "--data-root", str(not_a_folder), "--runs-dir", str(tmp_path / "runs"), env=WIDE),
                       str(not_a_folder), "is a file, not a folder")
    assert_no_complete_run(tmp_path / "runs")


def test_missing_weights_path_or_gpu_is_one_clear_error_before_any_run_folder(cli, fixture_root, tmp_path):
    missing = tmp_path / "nowhere" / "w.pth"
    assert_clear_error(run_cmd(cli, fixture_root, tmp_path, "--weights", str(missing)), str(missing),
                       "no such file or folder")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    import torch

    if not torch.cuda.is_available():
        assert_clear_error(run_cmd(cli, fixture_root, tmp_path, "--device", "cuda"), "--device cuda", "--device cpu")
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        assert_clear_error(run_cmd(cli, fixture_root, tmp_path, "--device", "xpu"), "--device xpu", "--device cpu")
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("method", ["probe", "finetune", "lora"])
def test_another_models_checkpoint_is_refused_before_any_run_folder(cli, fixture_root, tmp_path, method):
    """Given with --weights, or found through the mapping file: names and shapes read from the file's header and
    checked on the meta architecture, not in fold 1 of a folder that then reads 'failed'."""
    import timm
    from safetensors.torch import save_file

    other = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}, other)
    assert_clear_error(run_cmd(cli, fixture_root, tmp_path, "--method", method, "--weights", str(other)),
                       str(other), "does not fit 'efficientnet_lite0'", "Nothing was loaded")
    assert not (tmp_path / "runs").exists()
    mapping = tmp_path / "weights.yaml"
    mapping.write_text(f"h0_mini: {other}\n")
    result = cli("run", "--data-root", str(fixture_root), "--runs-dir", str(tmp_path / "runs"), "--model", "h0_mini",
                 "--method", method, env={**WIDE, "MITOBENCH_WEIGHTS": str(mapping),
                                          "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache")})
    assert_clear_error(result, str(other), "does not fit 'h0_mini'", "Check the file belongs to h0_mini")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method, model, what", [("probe", "uni", "features"),
                                                  ("finetune", "swin_base_patch4_window7_224", "weights")])
def test_a_model_without_its_published_weights_is_refused_not_trained_on_random_init(cli, fixture_root, tmp_path,
                                                                                     method, model, what):
    env = {**WIDE, "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache"), "MITOBENCH_WEIGHTS": ""}
    result = cli("run", "--data-root", str(fixture_root), "--runs-dir", str(tmp_path / "runs"), "--model", model,
                 "--method", method, env=env)
    assert_clear_error(result, model, f"RANDOM INIT {what}", "--weights PATH", "--allow-download",
                       "allow_random_init=true")
    assert not (tmp_path / "runs").exists()


def test_report_refuses_an_unfinished_run(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "running"}))
    (run / "metrics.csv").write_text("dataset,fold,metric,value\n")
    (run / "config.yaml").write_text("method: probe\n")
    assert_clear_error(cli("report", str(run), env=WIDE), str(run), "status running", "--resume")
    missing = tmp_path / "no-such-run"
    assert_clear_error(cli("report", str(missing), env=WIDE), str(missing), "no such folder")
    assert "--resume" not in cli("report", str(missing), env=WIDE).stderr
    (run / "config.yaml").unlink()
    assert_clear_error(cli("report", str(run), env=WIDE), str(run), "not a mitobench run folder")
