"""The run configuration: YAML file, overrides, unknown options, the saved copy in each run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mitobench.config import RunConfig, load_config, save_config
from mitobench.errors import MitobenchError


def test_defaults():
    config = load_config()
    assert config.model == "efficientnet_lite0" and config.method == "probe"
    assert config.n_folds == 5 and config.seed == 42 and config.threshold == "fixed"
    assert config.probe.head == "logistic"
    assert config.to_dict() == RunConfig().to_dict()


def test_yaml_sets_options_and_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "timm/resnet10t", "method": "finetune", "n_boot": 50,
                                    "train": {"epochs": 7, "lr": 0.01}, "probe": {"Cs": [0.1, 1.0]}}))
    config = load_config(path)
    assert config.model == "timm/resnet10t" and config.method == "finetune" and config.n_boot == 50
    assert config.train.epochs == 7 and config.train.lr == 0.01 and config.probe.Cs == [0.1, 1.0]
    assert config.train.batch_size == 8  # untouched default
    flagged = load_config(path, {"train.epochs": 2, "model": None, "method": "lora", "train.lr": None})
    assert flagged.train.epochs == 2 and flagged.method == "lora"
    assert flagged.model == "timm/resnet10t" and flagged.train.lr == 0.01  # None = flag not given


@pytest.mark.parametrize("values, name", [({"modle": "x"}, "modle"), ({"train": {"epochz": 3}}, "epochz"),
                                          ({"probe": {"C": 1}}, "'C'")])
def test_unknown_option_in_yaml(tmp_path, values, name):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(MitobenchError, match=name) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_unknown_override():
    with pytest.raises(MitobenchError, match="lrr"):
        load_config(None, {"train.lrr": 1})
    with pytest.raises(MitobenchError, match="mapping"):
        load_config(None, {"train": 3})


def test_bad_values_and_files(tmp_path):
    with pytest.raises(MitobenchError, match="unknown method"):
        load_config(None, {"method": "svm"})
    with pytest.raises(MitobenchError, match="threshold"):
        load_config(None, {"threshold": "best"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(MitobenchError, match="bad.yaml"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(MitobenchError, match="mapping"):
        load_config(bad)
    with pytest.raises(MitobenchError):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).to_dict() == RunConfig().to_dict()


@pytest.mark.parametrize("key, value, expected", [("train.freeze_stages", "abc", "int"), ("train.lr", "fast", "float"),
                                                  ("train.tta", "yes", "bool"), ("train.epochs", 2.5, "int"),
                                                  ("train.epochs", True, "int"), ("probe.Cs", [0.1, "x"], "list"),
                                                  ("datasets", "a.csv", "list"), ("weights", 3, "str or None")])
def test_wrong_type_is_one_clear_error(tmp_path, key, value, expected):
    """A wrong type stops at load time, naming the option and the type it needs."""
    with pytest.raises(MitobenchError, match=f"{key.split('.')[-1]}.*must be {expected}"):
        load_config(None, {key: value})
    section, _, leaf = key.rpartition(".")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({section: {leaf: value}} if section else {leaf: value}))
    with pytest.raises(MitobenchError, match=str(path)):
        load_config(path)


def test_right_types_are_accepted():
    config = load_config(None, {"train.lr": 1, "train.layer_decay": None, "train.ema": 0.99, "probe.Cs": [1, 0.5],
                                "weights": "w.safetensors", "train.freeze_norm_stats": False})
    assert config.train.lr == 1 and config.probe.Cs == [1, 0.5] and config.train.freeze_norm_stats is False


def test_save_load_round_trip(tmp_path):
    config = load_config(None, {"model": "timm/resnet10t", "method": "lora", "train.lora_r": 4, "datasets": ["a.csv"],
                                "probe.Cs": [0.5], "train.ema": 0.999, "cache_dir": str(tmp_path)})
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    again = load_config(path)
    assert again.to_dict() == config.to_dict()
    assert yaml.safe_load(path.read_text())["train"]["lora_r"] == 4
    assert not [p for p in path.parent.iterdir() if p.name != "config.yaml"]  # atomic: no temp files left


def test_preset_then_yaml_then_flags(tmp_path):
    """A named preset fills the defaults; the YAML file and then the flags override it."""
    path = tmp_path / "c.yaml"
    path.write_text("method: finetune\ntrain:\n  preset: cpu\n  epochs: 4\n  lr: 0.0005\n")
    config = load_config(path, {"train.lr": 0.002})
    assert config.train.preset == "cpu"
    assert config.train.img_size == 128 and config.train.loss == "weighted_bce"  # from the preset
    assert config.train.epochs == 4  # YAML over preset
    assert config.train.lr == 0.002  # flag over YAML


def test_a_preset_flag_the_yaml_would_overrule_is_refused(tmp_path):
    """--preset with a YAML naming another preset, or setting the preset's own options otherwise, would train the
    YAML's recipe under the flag's preset name: refused, naming the keys. The shipped cpu file with --preset cpu,
    or a YAML setting options the preset leaves alone, is fine."""
    cpu_file = Path(__file__).parents[1] / "configs" / "cpu_finetune.yaml"
    with pytest.raises(MitobenchError, match=r"--preset paper and .*cpu_finetune.yaml \(train.preset: cpu\)"):
        load_config(cpu_file, {"train.preset": "paper"})
    assert load_config(cpu_file, {"train.preset": "cpu"}).train.lr == 0.001
    tweaks = tmp_path / "t.yaml"
    tweaks.write_text("method: finetune\ntrain:\n  lr: 0.001\n  epochs: 100\n")  # epochs as the paper's
    with pytest.raises(MitobenchError, match=r"t.yaml sets train.lr=0.001, which the preset sets otherwise"):
        load_config(tweaks, {"train.preset": "paper"})
    other = tmp_path / "o.yaml"
    other.write_text("method: finetune\ntrain:\n  epochs: 100\n  ema: 0.99\n")
    config = load_config(other, {"train.preset": "paper"})
    assert config.train.preset == "paper" and config.train.ema == 0.99 and config.train.lr == 5e-5


@pytest.mark.parametrize("key, value, expected", [
    ("device", "nosuch", "device='nosuch'"), ("n_folds", 1, "n_folds=1"), ("n_boot", -5, "n_boot=-5"),
    ("probe.Cs", [], "probe.Cs"), ("probe.Cs", [-1.0], "probe.Cs"), ("probe.inner_splits", 1, "probe.inner_splits"),
    ("train.batch_size", 0, "train.batch_size=0"), ("train.lr", -1.0, "train.lr=-1"), ("train.augment", "foo", "none"),
    ("train.optimizer", "sgd", "adamw"), ("train.loss", "hinge", "focal"), ("probe.head", "svm", "logistic"),
    ("dtype", "int8", "float16"), ("train.lora_dropout", 1.0, "lora_dropout"), ("train.ema", 1.5, "train.ema"),
    ("train.epochs", 0, "train.epochs=0"), ("embed_workers", 0, "embed_workers=0"),
    ("train.lora_targets", "blocks\\.(qkv", "not a valid regular expression")])
def test_out_of_range_values_stop_before_a_run_starts(key, value, expected):
    with pytest.raises(MitobenchError, match=re.escape(expected)):
        load_config(None, {"method": "finetune", "train.epochs": 1, key: value})


def test_every_preset_and_the_defaults_pass_the_value_checks():
    from mitobench.methods.presets import PRESETS

    for method in ("probe", "finetune", "lora"):
        for preset in (None, *PRESETS):
            load_config(None, {"method": method, "train.preset": preset})


def test_training_flags_on_a_probe_run_are_refused_not_ignored(cli, fixture_root, tmp_path):
    """Else config.yaml would claim a preset or epochs the linear probe never used."""
    result = cli("run", "--data-root", str(fixture_root), "--runs-dir", str(tmp_path / "runs"), "--preset", "paper",
                 "--epochs", "3", "--tta", "--set", "train.lr=0.1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--preset, --epochs, --tta, --set train.lr: training settings" in " ".join(result.stderr.split())
    assert not (tmp_path / "runs").exists()
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert load_config(None, {"device": device}).device == device


def test_config_knows_every_augmentation_of_the_engine():
    from mitobench.config import AUGMENTS
    from mitobench.methods.augment import PRESETS

    assert set(AUGMENTS) == set(PRESETS)


def _shipped_config(name: str):
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "configs" / name


@pytest.mark.parametrize("name, preset, method", [("cpu_finetune.yaml", "cpu", "finetune"),
                                                  ("virchow2_lora_paper.yaml", "paper", "lora")])
def test_shipped_configs_write_out_their_preset(name, preset, method):
    """A config file that says it is a preset written out resolves to exactly what the preset gives."""
    from_file = load_config(_shipped_config(name))
    from_preset = load_config(None, {"method": method, "train.preset": preset, "model": from_file.model})
    assert from_file.to_dict() == from_preset.to_dict()
    from mitobench.methods.presets import LORA_OVERRIDES, PRESETS

    written = yaml.safe_load(_shipped_config(name).read_text())["train"]
    expected = {**PRESETS[preset], **(LORA_OVERRIDES.get(preset, {}) if method == "lora" else {})}
    assert set(expected) <= set(written), f"{name} leaves out {sorted(set(expected) - set(written))}"


def test_default_config_file_is_the_default_job():
    assert load_config(_shipped_config("default.yaml")).to_dict() == load_config().to_dict()


def test_exponent_floats_without_a_decimal_point_are_numbers(tmp_path):
    """``3e-4`` is a string to YAML 1.1 (PyYAML); a learning rate written so must still be a number."""
    from mitobench.config import read_yaml

    path = tmp_path / "lr.yaml"
    path.write_text("method: finetune\ntrain:\n  lr: 1e-3\n  tta_crops: [1e0, 875e-3]\n")
    config = load_config(path, {"train.weight_decay": read_yaml("5E-2")})
    assert config.train.lr == 0.001 and config.train.weight_decay == 0.05 and config.train.tta_crops == [1.0, 0.875]
    assert read_yaml("3e-4") == 0.0003 and read_yaml("e5") == "e5" and read_yaml("12") == 12
    assert read_yaml("1.5e3") == 1500.0 and read_yaml("2.5E4") == 25000.0 and read_yaml(".5e-1") == 0.05
    assert read_yaml("1.5") == 1.5 and read_yaml("1e") == "1e" and read_yaml("0x10") == 16


def test_set_accepts_the_help_texts_example(cli, fixture_root, tmp_path):
    result = cli("run", "--data-root", str(fixture_root), "--runs-dir", str(tmp_path / "runs"), "--method", "finetune",
                 "--set", "train.lr=3e-4", "--set", "train.epochs=abc")
    assert result.returncode == 2 and "'epochs' must be int, not 'abc'" in result.stderr  # lr passed the type check
