"""``mitobench models check`` (warning and error fields) and ``benchmarks/selection_rules.py`` on short runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fixtures import make_png
from mitobench.runs import RunDir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_weights_anywhere(monkeypatch, tmp_path):
    """No user mapping, an empty Hugging Face cache, no network: a card with published weights finds none."""
    for var in ("MITOBENCH_WEIGHTS", "HF_HOME", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def _selection_rules():
    spec = importlib.util.spec_from_file_location("selection_rules", REPO / "benchmarks" / "selection_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------ benchmarks/selection_rules.py
def fake_run(root: Path, epochs: int, min_epochs: int, trained: int | None = None, n_folds: int = 2,
             slides_per_fold: int = 12, per_slide: int = 4, seed: int = 0) -> Path:
    """A fine-tuning run folder as ``mitobench run`` leaves it, as far as the script reads it: config.yaml,
    folds.csv (image, group, domain, label, fold) and folds/fold_k.npz (``RunDir.save_fold``: per-epoch
    validation probabilities whose rows follow ``info["history"]``). ``trained``: epochs in the history
    (default ``epochs``)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "train": {"epochs": epochs, "min_epochs": min_epochs,
                                                                              "select": "ba"}}))
    rows = []
    for fold in range(n_folds):
        for s in range(slides_per_fold):
            for i in range(per_slide):
                rows.append({"image": f"f{fold}_s{s}_{i}.png", "group": f"slide{fold}_{s}", "domain": "AMi-Br",
                             "label": int((s + i) % 2), "fold": fold})
    frame = pd.DataFrame(rows)
    frame.to_csv(root / "folds.csv", index=False)
    run = RunDir(root)
    (root / "folds").mkdir()
    trained = epochs if trained is None else trained
    for fold in range(n_folds):
        labels = frame.loc[frame["fold"] == fold, "label"].to_numpy()
        by_epoch = np.clip(labels * 0.3 + rng.random((trained, len(labels))) * 0.7, 0, 1)
        history = [{"epoch": e, "val_ba": 0.5, "val_auroc": 0.5, "seconds": 1.0} for e in range(1, trained + 1)]
        run.save_fold(fold, {"validation": by_epoch[-1], "validation_by_epoch": by_epoch},
                      {"history": history, "best_epoch": trained})
    return root


def _table(out: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines() if line.startswith("| ")}


def test_rules_keep_the_last_epoch_of_a_run_shorter_than_min_epochs(tmp_path, capsys):
    """`mitobench run --method finetune --preset cpu --epochs 1` (min_epochs 5): the engine keeps epoch 1, so must
    the script (it used to crash with IndexError in pick)."""
    run = fake_run(tmp_path / "run", epochs=1, min_epochs=5)
    _selection_rules().main([str(run), "--splits", "3", "--min-per-class", "2"])
    out = capsys.readouterr().out
    rows = _table(out)
    assert {"ba", "auroc", "last"} <= set(rows)
    for rule in ("ba", "auroc", "last"):
        assert float(rows[rule][2]) == 1.0  # mean kept epoch
        assert 0 <= float(rows[rule][0].split("+-")[0]) <= 1
    assert "epochs >= 1" in out


def test_rules_still_skip_epochs_before_min_epochs(tmp_path, capsys):
    run = fake_run(tmp_path / "run", epochs=4, min_epochs=3)
    _selection_rules().main([str(run), "--splits", "3", "--min-per-class", "2"])
    out = capsys.readouterr().out
    rows = _table(out)
    assert all(3.0 <= float(rows[rule][2]) <= 4.0 for rule in ("ba", "auroc", "last")) and float(rows["last"][2]) == 4.0
    assert "epochs >= 3" in out


def test_rules_with_no_epoch_left_is_one_clear_sentence(tmp_path):
    """A config that says 10 epochs (min 5) next to folds that hold 2: a sentence, not a traceback."""
    run = fake_run(tmp_path / "run", epochs=10, min_epochs=5, trained=2)
    with pytest.raises(SystemExit, match="fold 0: no epoch to compare") as err:
        _selection_rules().main([str(run), "--splits", "3", "--min-per-class", "2"])
    assert "epoch 5" in str(err.value.code) and "1, 2" in str(err.value.code)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "selection_rules.py"), str(run), "--splits", "3",
                           "--min-per-class", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "no epoch to compare" in proc.stderr and "Traceback" not in proc.stderr


# -------------------------------------------------------------------------------- mitobench models check
def test_check_has_no_empty_warning_field(tmp_path):
    from mitobench.models.doctor import check_model

    out = check_model("efficientnet_lite0", image_path=make_png(tmp_path / "rgb.png"), seconds=0.05)
    assert out["pretrained"] and out["dim"] == 1280
    assert "warning" not in out and "error" not in out


def test_check_reports_the_rgba_conversion(tmp_path):
    from mitobench.models.doctor import check_model

    rgba = make_png(tmp_path / "rgba.png", mode="RGBA")
    out = check_model("efficientnet_lite0", image_path=rgba, seconds=0.05)
    assert out["warning"] == f"{rgba}: converted from RGBA to RGB" and "error" not in out


def test_check_of_a_card_with_published_weights_but_none_found_is_an_error(tmp_path):
    from mitobench.models.doctor import check_model

    out = check_model("lunit_vits16", image_path=make_png(tmp_path / "rgb.png"), seconds=0.05)
    assert out["pretrained"] is False and out["weights_id"] == "random-init"
    assert "weights not found" in out["error"] and "--weights PATH" in out["error"]
    assert "MITOBENCH_WEIGHTS" in out["error"] and "warning" not in out


@pytest.mark.parametrize("key", ["timm/resnet18", "efficientnetv2_m"])
def test_check_of_a_card_without_published_weights_is_not_an_error(tmp_path, key):
    from mitobench.models.doctor import check_model

    out = check_model(key, image_path=make_png(tmp_path / "rgb.png"), seconds=0.05)
    assert out["pretrained"] is False and "error" not in out and "RANDOM INIT" in out["warning"]


def test_cli_check_prints_no_empty_warning_and_the_rgba_conversion(tmp_path, cli):
    proc = cli("models", "check", "efficientnet_lite0", env={"COLUMNS": "1000"})  # default patch: data root or skimage
    lines = proc.stdout.splitlines()
    if proc.returncode == 0:  # no default patch on this machine is the other test's business
        assert not any(line.startswith("warning") for line in lines), proc.stdout
    rgba = make_png(tmp_path / "rgba.png", mode="RGBA")
    proc = cli("models", "check", "efficientnet_lite0", "--image", str(rgba), env={"COLUMNS": "1000"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"warning: {rgba}: converted from RGBA to RGB" in proc.stdout.splitlines()


def test_cli_check_exits_1_when_published_weights_are_not_found(tmp_path, cli):
    image = str(make_png(tmp_path / "rgb.png"))
    proc = cli("models", "check", "lunit_vits16", "--image", image, env={"COLUMNS": "1000"})
    assert "weights not found" in proc.stdout and "--weights PATH" in proc.stdout
    ok = cli("models", "check", "timm/resnet18", "--image", image, env={"COLUMNS": "1000"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr


def test_cli_show_prints_a_card_in_full_with_its_lora_regex(cli):
    from mitobench.models.cards import VIT_LORA, get_card

    proc = cli("models", "show", "virchow2", env={"COLUMNS": "1000"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert lines["lora_target (peft target_modules regex)"] == VIT_LORA == get_card("virchow2").lora_target
    assert lines["hf_repo"] == "paige-ai/Virchow2" and lines["embed_dim"] == "2560"
    assert lines["weights"] == "no"  # nothing on this machine; `models list` says the same
    unknown = cli("models", "show", "no_such_model")
    assert unknown.returncode == 2 and "unknown model 'no_such_model'" in unknown.stdout + unknown.stderr
