"""The training engine (fine-tuning, LoRA), its batched augmentation, losses and presets, on the fixture."""

from __future__ import annotations

import copy
import io
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import mitobench.methods.engine as engine_mod
import mitobench.methods.losses as losses_mod
from mitobench.config import load_config
from mitobench.errors import FoldFailedError, MitobenchError
from mitobench.methods.augment import PRESETS, AugmentConfig, BatchAugment, colour_jitter, dihedral, geometric, hed_jitter
from mitobench.methods.engine import (TrainMethod, centre_crop, improves, load_trained_state, make_optimizer,
                                      settle_best, staged_best, stream_seed)
from mitobench.methods.losses import make_loss
from mitobench.methods.mixup import mixup
from mitobench.methods.presets import PRESETS as TRAIN_PRESETS
from mitobench.methods.presets import apply_preset
from mitobench.models import cards as registry
from mitobench.models.cards import VIT_LORA
from mitobench.models.registry import ModelCard, create_backbone
from mitobench.protocol import build_context, load_sets, run_benchmark
from mitobench.runs import RunDir
from mitobench.splits import paper_folds

TINY_VIT = "test/vit-tiny-32"


def make_config(root, tmp_path, **overrides):
    train = {"epochs": 2, "img_size": 64, "batch_size": 8, "tta": False, "augment": "paper", "num_threads": 1,
             **overrides.pop("train", {})}
    values = {"data_root": str(root), "cache_dir": str(tmp_path / "cache"), "runs_dir": str(tmp_path / "runs"),
              "method": "finetune", "n_boot": 100, **overrides}
    values.update({f"train.{k}": v for k, v in train.items()})
    return load_config(None, values)


def make_context(config):
    sets, _ = load_sets(config)
    return build_context(config, sets, paper_folds(sets["AMi-Br-train"], config.n_folds, config.seed))


def fold_indices(ctx, fold=1):
    return np.flatnonzero(ctx.folds != fold), np.flatnonzero(ctx.folds == fold)


def fit_fold(config, scratch, fold=1):
    """Prepare a TrainMethod on ``config``'s data and train ``fold`` into ``scratch``: (method, ctx, va, result)."""
    ctx = make_context(config)
    method = TrainMethod(config)
    method.prepare(ctx)
    tr, va = fold_indices(ctx, fold)
    scratch.mkdir(exist_ok=True)
    return method, ctx, va, method.fit_predict(fold, tr, va, ctx, scratch)


@pytest.fixture
def tiny_vit_card(monkeypatch):
    """A ViT-Tiny/16 built for 32 px input (2 x 2 patches), random init, with the usual LoRA regex."""
    registry.list_cards()
    card = ModelCard(key=TINY_VIT, family="test", arch="vit_tiny_patch16_224",
                     build_kwargs={"num_classes": 0, "img_size": 32}, input_size=32, embedding="pooled",
                     lora_target=VIT_LORA)
    monkeypatch.setitem(registry._REGISTRY, TINY_VIT, card)
    return card


# -- fine-tuning -----------------------------------------------------------------------------------

def test_finetune_fold(fixture_root, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MITOBENCH_QUIET")  # each epoch's validation line is printed (a log shows progress too)
    scratch = tmp_path / "fold_1"
    method, ctx, va, result = fit_fold(make_config(fixture_root, tmp_path), scratch)
    printed = capsys.readouterr().err
    for h in result.info["history"]:
        assert f"fold 1 epoch {h['epoch']}/2: validation BA {h['val_ba']:.4f}, AUROC {h['val_auroc']:.4f}" in printed
    assert set(result.probs) == {"validation", "validation_by_epoch", *ctx.holdouts}
    assert len(result.probs["validation"]) == len(va)
    by_epoch = result.probs["validation_by_epoch"]  # one row per evaluated epoch, for analyses of the selection rule
    assert by_epoch.shape == (2, len(va))
    y_val = ctx.sets["AMi-Br-train"]["label"].to_numpy()[va]
    for row, h in zip(by_epoch, result.info["history"]):
        assert balanced_accuracy_score(y_val, row >= 0.5) == pytest.approx(h["val_ba"])
        assert roc_auc_score(y_val, row) == pytest.approx(h["val_auroc"])
    for name in ctx.holdouts:
        p = result.probs[name]
        assert p.shape == (len(ctx.sets[name]),)
        assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert result.info["epochs_run"] == 2 and 1 <= result.info["best_epoch"] <= 2
    assert len(result.info["history"]) == 2
    weights = load_file(str(scratch / "model.safetensors"))
    assert any(k.startswith("backbone.") for k in weights) and "head.weight" in weights
    assert len(weights) == len(method._build().state_dict())
    assert (scratch / "last.pt").is_file() and (scratch / "best.pt").is_file()
    assert not list(scratch.glob("*.tmp"))


@pytest.mark.parametrize("rule", ["auroc", "last"])
def test_select_rule_keeps_its_epoch(fixture_root, tmp_path, rule):
    """``train.select``: the kept weights are those of the best-AUROC epoch, or of the last epoch."""
    scratch = tmp_path / "fold_1"
    config = make_config(fixture_root, tmp_path, train={"epochs": 3, "select": rule})
    method, ctx, va, result = fit_fold(config, scratch)
    history = result.info["history"]
    # best AUROC, ties broken by BA, the first of full ties
    ranked = max(history, key=lambda h: (h["val_auroc"], h["val_ba"], -h["epoch"]))
    expected = 3 if rule == "last" else ranked["epoch"]
    assert result.info["best_epoch"] == expected
    kept = history[expected - 1]
    model = method._build()
    model.load_state_dict(torch.load(scratch / "best.pt", weights_only=True))
    p_val = method.predict(model, method.images["AMi-Br-train"][va], tta=False)
    np.testing.assert_allclose(p_val, result.probs["validation_by_epoch"][expected - 1], rtol=0, atol=1e-6)
    y_val = ctx.sets["AMi-Br-train"]["label"].to_numpy()[va]
    assert roc_auc_score(y_val, p_val) == pytest.approx(kept["val_auroc"])
    if rule == "last":
        last = torch.load(scratch / "last.pt", weights_only=True)["model"]
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, last[key], rtol=0, atol=0, msg=key)


def test_centre_crop_keeps_the_middle():
    images = torch.arange(8 * 8, dtype=torch.uint8).view(1, 8, 8, 1).expand(2, 8, 8, 3)
    assert centre_crop(images, 1.0) is images
    middle = centre_crop(images, 0.5)
    assert middle.shape == (2, 4, 4, 3)
    assert torch.equal(middle[0, :, :, 0], images[0, 2:6, 2:6, 0])


def test_tta_crops_average_every_view(fixture_root, tmp_path):
    """With tta_crops, the probability is the mean over 8 dihedral views of each centre crop, resized."""
    method = TrainMethod(make_config(fixture_root, tmp_path, train={"img_size": 32}))
    method.device = torch.device("cpu")
    model = method._build()
    images = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    per_crop = []
    for crops in ([1.0], [0.5]):
        method.config.train.tta_crops = crops
        per_crop.append(method.predict(model, images, tta=True))
    method.config.train.tta_crops = [1.0, 0.5]
    both = method.predict(model, images, tta=True)
    np.testing.assert_allclose(both, np.mean(per_crop, axis=0), rtol=0, atol=1e-6)
    assert not np.allclose(per_crop[0], per_crop[1])
    without_tta = method.predict(model, images, tta=False)  # crops [1.0, 0.5] set, but TTA off: the whole patch only
    method.config.train.tta_crops = [1.0]
    assert np.array_equal(without_tta, method.predict(model, images, tta=False))


@pytest.mark.parametrize("crops", [[], [1.2], [0.0, 1.0]])
def test_tta_crops_must_be_fractions(fixture_root, tmp_path, crops):
    with pytest.raises(MitobenchError, match="train.tta_crops"):
        make_config(fixture_root, tmp_path, train={"tta_crops": crops})


def test_tta_view_check_reproduces_a_run_and_adds_views(fixture_root, tmp_path, capsys):
    """benchmarks/tta_views.py: --crops 1.0 re-predicts the run's own validation probabilities (the fixture's patches are
    solid colours, so other crops are checked by test_tta_crops_average_every_view, not here)."""
    views = load_benchmark_script("tta_views")
    config = make_config(fixture_root, tmp_path, train={"epochs": 1, "img_size": 32, "tta": True})
    run = run_benchmark(config, console=Console(file=io.StringIO()))
    # the script re-predicts in fp32 on the CPU; a run made on CUDA predicted under bf16 autocast (rounding ~1e-3)
    atol = 5e-3 if torch.cuda.is_available() else 1e-6
    for fold in views.validation_predictions(run, [1.0]).values():
        np.testing.assert_allclose(fold["new"], fold["recorded"], rtol=0, atol=atol)
    views.main([str(run), "--crops", "1.0", "0.75"])
    table = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "views" not in line]
    assert [r[0].strip() for r in rows] == ["the run's own (8 dihedral)", "8 dihedral x crops [1.0, 0.75]"]
    for row in rows:
        assert all(0 <= float(cell.split("+-")[0]) <= 1 for cell in row[1:3])


def test_improves_follows_each_rule():
    assert improves("ba", 0.8, 0.7, 0.79, 0.9) and not improves("ba", 0.79, 0.95, 0.8, 0.9)
    assert improves("ba", 0.8, 0.91, 0.8, 0.9) and not improves("ba", 0.8, 0.9, 0.8, 0.9)
    assert improves("auroc", 0.7, 0.91, 0.8, 0.9) and not improves("auroc", 0.9, 0.89, 0.8, 0.9)
    assert improves("auroc", 0.81, 0.9, 0.8, 0.9) and not improves("auroc", 0.8, 0.9, 0.8, 0.9)
    assert improves("last", 0.1, 0.1, 0.9, 0.9)


def load_benchmark_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selection_rule_check_reads_a_run_and_agrees_with_the_engine(fixture_root, tmp_path, capsys):
    """benchmarks/selection_rules.py: picks epochs with the engine's rules and tie-breaks, on validation only."""
    rules = load_benchmark_script("selection_rules")
    rng = np.random.default_rng(0)
    for _ in range(200):  # coarse values, so ties happen
        ba, auc = rng.integers(0, 4, 6) / 4, rng.integers(0, 4, 6) / 4
        for rule in ("ba", "auroc", "last"):
            kept, best_ba, best_auc = 0, -1.0, -1.0
            for i in range(6):
                if improves(rule, ba[i], auc[i], best_ba, best_auc):
                    kept, best_ba, best_auc = i, ba[i], auc[i]
            assert rules.pick(rule, ba, auc) == kept, (rule, ba, auc)

    run = run_benchmark(make_config(fixture_root, tmp_path, train={"epochs": 3, "img_size": 32}),
                        console=Console(file=io.StringIO()))
    rules.main([str(run), "--splits", "5", "--min-per-class", "1"])
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in table.splitlines() if line.startswith("| ")}
    assert {"ba", "auroc", "last"} <= set(rows)
    for rule in ("ba", "auroc", "last"):
        mean_ba = float(rows[rule][0].split("+-")[0])
        assert 0 <= mean_ba <= 1 and 1 <= float(rows[rule][2]) <= 3
    assert float(rows["last"][2]) == 3.0

    (run / "folds" / "fold_2.npz").unlink()
    RunDir(run).save_fold(2, {"validation": np.zeros(3)}, {"history": []})  # a fold without per-epoch probabilities
    with pytest.raises(SystemExit, match="fold_2.npz has no per-epoch validation probabilities"):
        rules.main([str(run), "--splits", "5", "--min-per-class", "1"])


def test_threshold_check_reads_a_run_and_scores_on_the_other_half(fixture_root, tmp_path, capsys):
    """benchmarks/threshold_rules.py: a threshold chosen on one half of the validation slides, scored on the other."""
    thresholds = load_benchmark_script("threshold_rules")
    run = run_benchmark(make_config(fixture_root, tmp_path, method="probe"), console=Console(file=io.StringIO()))
    thresholds.main([str(run), "--splits", "5", "--min-per-class", "1"])
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| `")}
    assert {"fixed", "validation"} <= set(rows)
    assert float(rows["fixed"][1]) == 0.5
    assert all(0 <= float(rows[mode][0].split("+-")[0]) <= 1 for mode in ("fixed", "validation"))

    # perfectly ranked but all above 0.5: the fixed threshold calls everything atypical, a chosen one separates
    folds = pd.read_csv(run / "folds.csv")
    labels = folds.loc[folds["fold"] == 1, "label"].to_numpy()
    (run / "folds" / "fold_1.npz").unlink()
    RunDir(run).save_fold(1, {"validation": 0.6 + 0.3 * labels}, {"history": []})
    scores = thresholds.fold_scores(run, 1, folds, n_splits=5, seed=0, min_per_class=1)
    assert scores["fixed"]["ba"] == 0.5 and scores["validation"]["ba"] == 1.0

    RunDir(run).save_fold(1, {"validation": np.zeros(3)}, {"history": []})
    with pytest.raises(SystemExit, match="fold 1: 3 validation probabilities"):
        thresholds.main([str(run), "--splits", "5", "--min-per-class", "1"])


def test_patience_counts_epochs_when_evaluating_every_other_epoch(fixture_root, tmp_path, monkeypatch):
    # a validation score that never improves: the fold stops `patience` epochs after its first evaluation,
    # and the plateau halves the lr once more than 3 epochs went without improvement (not 3 evaluations)
    import mitobench.methods.engine as engine_mod

    monkeypatch.setattr(engine_mod, "balanced_accuracy_score", lambda y, p: 0.5)
    monkeypatch.setattr(engine_mod, "roc_auc_score", lambda y, p: 0.5)
    train = {"epochs": 8, "eval_every": 2, "optimizer": "adam", "lr": 1e-5, "augment": "none", "img_size": 32}
    _, _, _, stopped = fit_fold(make_config(fixture_root, tmp_path, train={**train, "patience": 2}), tmp_path / "a")
    assert [h["epoch"] for h in stopped.info["history"]] == [2, 4]
    _, _, _, full = fit_fold(make_config(fixture_root, tmp_path, train={**train, "patience": 50}), tmp_path / "b")
    lrs = [(h["epoch"], h["lr"]) for h in full.info["history"]]
    assert lrs == [(2, 1e-5), (4, 1e-5), (6, 1e-5), (8, 5e-6)]  # halved after epoch 6: 4 epochs since epoch 2


def test_unknown_select_rule_is_a_clear_error(fixture_root, tmp_path):
    with pytest.raises(MitobenchError, match="train.select 'best'.*ba, auroc, last"):
        make_config(fixture_root, tmp_path, train={"select": "best"})


def test_ema_averages_batchnorm_statistics(fixture_root, tmp_path):
    """With ``ema`` the kept weights are the average, and BatchNorm running stats move with training."""
    scratch = tmp_path / "fold_1"
    method, *_ = fit_fold(make_config(fixture_root, tmp_path, train={"ema": 0.5, "img_size": 32}), scratch)
    start = method._build().state_dict()
    kept = load_file(str(scratch / "model.safetensors"))
    means = [k for k in kept if k.endswith("running_mean")]
    assert means and any(not torch.equal(kept[k], start[k].cpu()) for k in means)  # built on CUDA where there is one
    assert all(torch.isfinite(v.float()).all() for v in kept.values())


def test_dropout_and_stochastic_depth_reach_the_model(fixture_root, tmp_path):
    """train.dropout sits before the head; train.drop_path is timm's per-block stochastic depth (0 at the stem,
    rising to the rate at the last block); both act in training only."""
    method = TrainMethod(make_config(fixture_root, tmp_path, train={"dropout": 0.2, "drop_path": 0.1}))
    method.device = torch.device("cpu")
    model = method._build()
    assert model.dropout.p == 0.2
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and 0 < max(rates) <= 0.1
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model.train()(x))
        assert torch.equal(model.eval()(x), model.eval()(x))
    plain = TrainMethod(make_config(fixture_root, tmp_path))
    plain.device = torch.device("cpu")
    plain_model = plain._build()
    assert plain_model.dropout.p == 0
    assert not [m for m in plain_model.modules() if type(m).__name__ == "DropPath"]


@pytest.mark.parametrize("option,rate", [("dropout", 1.0), ("drop_path", -0.1)])
def test_drop_rates_must_be_probabilities(fixture_root, tmp_path, option, rate):
    with pytest.raises(MitobenchError, match=f"train.{option}"):
        make_config(fixture_root, tmp_path, train={option: rate})


def test_model_without_stochastic_depth_is_a_clear_error(monkeypatch):
    from mitobench.models.registry import create_backbone

    registry.list_cards()
    card = ModelCard(key="test/no-drop-path", family="test", arch="plain", builder=lambda: torch.nn.Flatten(),
                     input_size=32, embedding="pooled")
    monkeypatch.setitem(registry._REGISTRY, card.key, card)
    with pytest.raises(MitobenchError, match="test/no-drop-path.*train.drop_path"):
        create_backbone(card.key, pretrained=False, drop_path=0.1)


def test_finetune_trains_every_weight(fixture_root, tmp_path):
    method = TrainMethod(make_config(fixture_root, tmp_path))
    method.device = torch.device("cpu")
    model = method._build()
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_stages_keep_weights_and_batchnorm_statistics(fixture_root, tmp_path):
    """freeze_stages=2: the stem and stages 0-1 (weights and BatchNorm running stats) end bit-identical;
    the later stages and the head train."""
    config = make_config(fixture_root, tmp_path, train={"freeze_stages": 2, "img_size": 32, "epochs": 1, "lr": 1e-2})
    ctx = make_context(config)
    method = TrainMethod(config)
    method.prepare(ctx)
    torch.manual_seed(config.seed + 1)  # fit_predict seeds the same way before building
    model = method._build()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(("backbone.model.conv_stem", "backbone.model.bn1", "backbone.model.blocks.0.",
                                       "backbone.model.blocks.1."))}
    model.train()
    assert model.frozen_norms and not any(m.training for m in model.frozen_norms)
    assert model.backbone.model.blocks[2][0].bn1.training
    tr, va = fold_indices(ctx)
    method.fit_predict(1, tr, va, ctx, tmp_path)
    final = load_file(str(tmp_path / "model.safetensors"))  # the fold's model, frozen weights included
    assert frozen.isdisjoint(torch.load(tmp_path / "last.pt", weights_only=True)["model"])  # rebuilt on resume
    early = ("backbone.model.conv_stem", "backbone.model.bn1.", "backbone.model.blocks.0.", "backbone.model.blocks.1.")
    changed = {k for k in initial if not torch.equal(initial[k], final[k])}
    assert changed and not any(k.startswith(early) for k in changed)
    assert "head.weight" in changed and any(k.startswith("backbone.model.blocks.2.") and "running_mean" in k for k in changed)


def test_frozen_stages_can_keep_batch_statistics(fixture_root, tmp_path):
    """freeze_norm_stats=False: frozen stages' weights stay, their BatchNorm running statistics move."""
    config = make_config(fixture_root, tmp_path, train={"freeze_stages": 2, "freeze_norm_stats": False,
                                                        "img_size": 32, "epochs": 1})
    ctx = make_context(config)
    method = TrainMethod(config)
    method.prepare(ctx)
    torch.manual_seed(config.seed + 1)
    initial = {k: v.clone() for k, v in method._build().state_dict().items()}
    tr, va = fold_indices(ctx)
    method.fit_predict(1, tr, va, ctx, tmp_path)
    final = load_file(str(tmp_path / "model.safetensors"))
    stem = [k for k in initial if k.startswith("backbone.model.bn1.")]
    assert not torch.equal(initial["backbone.model.bn1.running_mean"], final["backbone.model.bn1.running_mean"])
    assert all(torch.equal(initial[k], final[k]) for k in stem if not k.startswith("backbone.model.bn1.running")
               and not k.endswith("num_batches_tracked"))
    assert torch.equal(initial["backbone.model.conv_stem.weight"], final["backbone.model.conv_stem.weight"])


def test_freezing_every_stage_is_a_clear_error(fixture_root, tmp_path):
    method = TrainMethod(make_config(fixture_root, tmp_path, train={"freeze_stages": 7}))
    method.device = torch.device("cpu")
    with pytest.raises(MitobenchError, match="freeze_stages=7 leaves no stage .* use at most 6"):
        method._build()


@pytest.mark.parametrize("options", [{"mixup": None}, {"mixup": 0.4}, {"grad_accum": 3, "img_size": 32}])
def test_resume_inside_a_fold_gives_the_same_weights(fixture_root, tmp_path, monkeypatch, options):
    """Kill after epoch 1 of 2 (right after last.pt is written), continue: same weights as 2 epochs straight."""
    assert_resume_matches(make_config(fixture_root, tmp_path, train={"augment": "strong", **options}), tmp_path, monkeypatch)


def test_lora_resume_inside_a_fold_draws_the_same_dropout(fixture_root, tmp_path, monkeypatch, tiny_vit_card):
    """LoRA with dropout. On the CPU this checks the CPU generator's state; where the tests run on a GPU, the
    dropout draws on the CUDA generator, whose state the checkpoint keeps there."""
    config = make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT,
                         train={"img_size": 32, "lora_dropout": 0.3, "augment": "dihedral"})
    assert_resume_matches(config, tmp_path, monkeypatch)


def kill_after_writing(name: str, train, monkeypatch) -> None:
    """Call ``train()`` and stop it (as a kill would) right after the engine has written the file ``name``."""
    real_save = TrainMethod._atomic_torch_save

    class Killed(BaseException):
        pass

    def save_then_die(obj, path):
        real_save(obj, path)
        if path.name == name:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(TrainMethod, "_atomic_torch_save", staticmethod(save_then_die))
        with pytest.raises(Killed):
            train()


def assert_resume_matches(config, tmp_path, monkeypatch):
    ctx = make_context(config)
    tr, va = fold_indices(ctx, 2)

    def run(scratch):
        method = TrainMethod(config)
        method.prepare(ctx)
        return method.fit_predict(2, tr, va, ctx, scratch)

    straight = tmp_path / "straight"
    straight.mkdir()
    ref = run(straight)

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    kill_after_writing("last.pt", lambda: run(resumed_dir), monkeypatch)
    assert torch.load(resumed_dir / "last.pt", weights_only=True)["state"].count('"epoch": 1') >= 1
    resumed = run(resumed_dir)

    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed_dir / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    saved = "model.safetensors" if config.method == "finetune" else "adapter_and_head.safetensors"
    fa, fb = load_file(str(straight / saved)), load_file(str(resumed_dir / saved))
    for key in fa:
        torch.testing.assert_close(fa[key], fb[key], rtol=0, atol=0, msg=key)
    for name in ref.probs:
        np.testing.assert_array_equal(ref.probs[name], resumed.probs[name])
    assert ref.info["history"] == [
        {**h, "seconds": ref.info["history"][i]["seconds"]} for i, h in enumerate(resumed.info["history"])]


def test_a_kill_between_the_best_weights_and_last_pt_keeps_them_agreeing(fixture_root, tmp_path, monkeypatch):
    """Epoch 2 improves: its weights are staged, then the run dies before last.pt records epoch 2. The resume drops
    the staged weights (epoch 2 is trained again), so best.pt never holds an epoch that last.pt does not know."""
    config = make_config(fixture_root, tmp_path, train={"select": "last", "img_size": 32})
    straight = fit_fold(config, tmp_path / "straight")[3]
    killed = tmp_path / "killed"
    kill_after_writing("best.pt.epoch2", lambda: fit_fold(config, killed), monkeypatch)
    assert (killed / "best.pt").is_file() and (killed / "best.pt.epoch2").is_file()
    assert json.loads(torch.load(killed / "last.pt", weights_only=True)["state"])["best_epoch"] == 1
    resumed = fit_fold(config, killed)[3]
    assert not list(killed.glob("best.pt.epoch*"))
    assert resumed.info["best_epoch"] == straight.info["best_epoch"] == 2
    for name in straight.probs:
        np.testing.assert_array_equal(straight.probs[name], resumed.probs[name])


@pytest.mark.parametrize("model, preset, expected", [("conch_v1", None, 448), ("efficientnet_lite0", None, 224),
                                                     ("conch_v1", "paper", 224), ("conch_v1", "cpu", 128)])
def test_img_size_defaults_to_the_cards_input_size(tmp_path, model, preset, expected):
    values = {"method": "finetune", "model": model, "runs_dir": str(tmp_path), **({"train.preset": preset} if preset else {})}
    config = load_config(None, values)
    assert config.train.img_size == (None if preset is None else expected)
    assert TrainMethod(config).config.train.img_size == expected


def test_sampler_and_augmentation_draw_from_independent_streams():
    """Seeded alike, the two generators would draw the same numbers (image order tied to augmentation)."""
    seeds = {stream_seed(seed, stream) for seed in (42, 43) for stream in ("augment", "sampler")}
    assert len(seeds) == 4 and stream_seed(42, "augment") == stream_seed(42, "augment")
    a = torch.Generator().manual_seed(stream_seed(42, "augment"))
    b = torch.Generator().manual_seed(stream_seed(42, "sampler"))
    assert not torch.equal(torch.rand(64, generator=a), torch.rand(64, generator=b))


def test_resume_refuses_a_checkpoint_trained_on_other_backbone_weights(fixture_root, tmp_path):
    """last.pt leaves the frozen weights out; a resume that would rebuild other ones says so instead of going on."""
    config = make_config(fixture_root, tmp_path, train={"epochs": 1, "img_size": 32})
    scratch = tmp_path / "fold"
    fit_fold(config, scratch)
    saved = torch.load(scratch / "last.pt", weights_only=True)
    assert saved["backbone_weights"] and saved["backbone_weights"] != "random-init"  # Lite0's package weights
    torch.save({**saved, "backbone_weights": "random-init"}, scratch / "last.pt")
    with pytest.raises(MitobenchError, match=r"trained on backbone weights 'random-init'.*Delete the folder"):
        fit_fold(config, scratch)


def test_settle_best_publishes_only_the_epoch_last_pt_records(tmp_path):
    for epoch in (2, 3):
        staged_best(tmp_path, epoch).write_text(str(epoch))
    settle_best(tmp_path, 3)
    assert (tmp_path / "best.pt").read_text() == "3" and not list(tmp_path.glob("best.pt.epoch*"))
    staged_best(tmp_path, 4).write_text("4")
    settle_best(tmp_path, 3)  # epoch 4 was never recorded: dropped, best.pt kept
    assert (tmp_path / "best.pt").read_text() == "3" and not list(tmp_path.glob("best.pt.epoch*"))


def test_a_checkpoint_of_another_model_is_one_clear_error(fixture_root, tmp_path, tiny_vit_card):
    method = TrainMethod(make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT, train={"img_size": 32}))
    method.device = torch.device("cpu")
    model = method._build()
    foreign = {"head.weight": torch.zeros(1, 7), "backbone.model.no_such.weight": torch.zeros(3)}
    for state in (foreign, {}):
        with pytest.raises(MitobenchError, match=r"last\.pt does not fit this fold's model.*Delete the folder"):
            load_trained_state(model, state, tmp_path / "last.pt")


def test_mixup_mixes_images_and_targets_with_one_lambda():
    x, t = torch.randn(16, 3, 8, 8), torch.rand(16)
    mixed_x, mixed_t, lam = mixup(x, t, 0.4, torch.Generator().manual_seed(3))
    assert 0 <= lam <= 1 and 0 < lam < 1  # Beta(0.4, 0.4) almost surely strictly inside
    # a convex mix with a permutation keeps batch sums, and each item is lam * own + (1 - lam) * partner
    torch.testing.assert_close(mixed_t.sum(), t.sum())
    torch.testing.assert_close(mixed_x.sum(0), x.sum(0))
    partner_t = (mixed_t - lam * t) / (1 - lam)
    partner = [int(torch.argmin((t - v).abs())) for v in partner_t]
    assert sorted(partner) == list(range(16))
    torch.testing.assert_close(mixed_x, lam * x + (1 - lam) * x[partner])
    again = mixup(x, t, 0.4, torch.Generator().manual_seed(3))
    assert again[2] == lam and torch.equal(again[0], mixed_x)


def test_mixup_lambda_follows_its_beta():
    gen = torch.Generator().manual_seed(0)
    lams = np.array([mixup(torch.zeros(2, 1), torch.zeros(2), 0.2, gen)[2] for _ in range(2000)])
    assert abs(lams.mean() - 0.5) < 0.03  # Beta(0.2, 0.2): mean 0.5, mass near 0 and 1
    assert ((lams < 0.1) | (lams > 0.9)).mean() > 0.5
    assert abs(np.var(lams) - 0.25 * 1 / (2 * 0.2 + 1)) < 0.02  # var = 1 / (4 (2 alpha + 1))


@pytest.mark.parametrize("alpha", [0, -0.2])
def test_mixup_needs_a_positive_alpha(fixture_root, tmp_path, alpha):
    with pytest.raises(MitobenchError, match="train.mixup"):
        make_config(fixture_root, tmp_path, train={"mixup": alpha})


def test_nan_loss_stops_only_its_fold(fixture_root, tmp_path, monkeypatch):
    """A NaN loss in fold 2: that fold stops with a clear error, the others are kept and reported, and
    ``--resume`` retries it."""
    real = losses_mod.make_loss
    calls = []

    def nan_on_second_fold(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss if len(calls) != 2 else (lambda z, t: loss(z, t) * float("nan"))

    monkeypatch.setattr(losses_mod, "make_loss", nan_on_second_fold)
    config = make_config(fixture_root, tmp_path, train={"epochs": 1, "img_size": 32})
    out = io.StringIO()
    run = run_benchmark(config, console=Console(file=out, width=300))
    assert "fold 2 FAILED" in out.getvalue() and "nan" in out.getvalue().lower()
    status = RunDir(run).status()
    assert status["state"] == "complete" and list(status["failed_folds"]) == ["2"]
    assert "fold 2" in status["failed_folds"]["2"] and "train.lr" in status["failed_folds"]["2"]
    for k in (1, 3, 4, 5):
        assert RunDir(run).load_fold(k)[0], k
    report = (run / "report.txt").read_text()
    assert "FAILED" in report and "[2]" in report and "--resume" in report
    preds = pd.read_csv(run / "predictions.csv", dtype={"fold": str})
    assert set(preds["fold"]) == {"1", "3", "4", "5", "ensemble"}

    # resume retries only the failed fold
    monkeypatch.setattr(losses_mod, "make_loss", real)
    fitted = []
    real_fit = TrainMethod.fit_predict

    def counting(self, fold, *args, **kwargs):
        fitted.append(fold)
        return real_fit(self, fold, *args, **kwargs)

    monkeypatch.setattr(TrainMethod, "fit_predict", counting)
    run_benchmark(resume=run, console=Console(file=io.StringIO()))
    assert fitted == [2]
    status = RunDir(run).status()
    assert status["state"] == "complete" and not status["failed_folds"]
    preds = pd.read_csv(run / "predictions.csv", dtype={"fold": str})
    assert set(preds["fold"]) == {"1", "2", "3", "4", "5", "ensemble"}
    assert "FAILED" not in (run / "report.txt").read_text()


def test_non_finite_predictions_fail_their_fold_only(fixture_root, tmp_path, monkeypatch):
    """A fold model whose predictions hold a NaN (without a NaN loss) is a failed fold, not a source of metrics."""
    real_fit = TrainMethod.fit_predict

    def nan_on_fold_3(self, fold, *args, **kwargs):
        result = real_fit(self, fold, *args, **kwargs)
        if fold == 3:
            result.probs["AtNorM-Br"][0] = np.nan
        return result

    monkeypatch.setattr(TrainMethod, "fit_predict", nan_on_fold_3)
    out = io.StringIO()
    run = run_benchmark(make_config(fixture_root, tmp_path, train={"epochs": 1, "img_size": 32}),
                        console=Console(file=out, width=300))
    assert "fold 3 FAILED" in out.getvalue() and "non-finite probabilities" in out.getvalue()
    assert list(RunDir(run).status()["failed_folds"]) == ["3"]
    assert np.isfinite(pd.read_csv(run / "predictions.csv")["probability"]).all()


def test_non_finite_validation_predictions_fail_their_fold_only(fixture_root, tmp_path, monkeypatch):
    """The same inside training: a NaN in an epoch's validation probabilities stops that fold, not the run."""
    real = TrainMethod._predict
    folds = []

    def nan_in_fold_2(self, model, images, tta, batch_size):
        p = real(self, model, images, tta, batch_size)
        if self.fold_now == 2:
            p[0] = np.nan
        return p

    real_fit = TrainMethod.fit_predict

    def tracking(self, fold, *args, **kwargs):
        self.fold_now = fold
        folds.append(fold)
        return real_fit(self, fold, *args, **kwargs)

    monkeypatch.setattr(TrainMethod, "_predict", nan_in_fold_2)
    monkeypatch.setattr(TrainMethod, "fit_predict", tracking)
    out = io.StringIO()
    run = run_benchmark(make_config(fixture_root, tmp_path, train={"epochs": 1, "img_size": 32}),
                        console=Console(file=out, width=300))
    assert folds == [1, 2, 3, 4, 5]
    assert "fold 2 FAILED" in out.getvalue() and "validation fold at epoch 1" in out.getvalue()
    assert list(RunDir(run).status()["failed_folds"]) == ["2"]


def test_huge_lr_gives_nan_error(fixture_root, tmp_path):
    config = make_config(fixture_root, tmp_path, train={"epochs": 3, "img_size": 32, "lr": 1e30, "warmup_epochs": 0})
    ctx = make_context(config)
    method = TrainMethod(config)
    method.prepare(ctx)
    tr, va = fold_indices(ctx, 3)
    with pytest.raises(MitobenchError, match="fold 3"):
        method.fit_predict(3, tr, va, ctx, tmp_path)


def test_one_nonfinite_step_stops_the_fold_when_the_flag_is_read_lazily(fixture_root, tmp_path, monkeypatch):
    """As on CUDA, where the flag is read every 16 steps: one NaN loss early in an epoch shorter than that still
    stops the fold by the epoch's end, before anything is selected or saved."""
    monkeypatch.setattr(engine_mod, "nonfinite_check_every", lambda device: 16)
    real = losses_mod.make_loss

    def nan_at_third_step(*args, **kwargs):
        loss, calls = real(*args, **kwargs), []

        def maybe_nan(z, t):
            calls.append(1)
            return loss(z, t) * (float("nan") if len(calls) == 3 else 1.0)
        return maybe_nan

    monkeypatch.setattr(losses_mod, "make_loss", nan_at_third_step)
    config = make_config(fixture_root, tmp_path, train={"epochs": 1, "img_size": 32, "batch_size": 8})
    ctx = make_context(config)
    method = TrainMethod(config)
    method.prepare(ctx)
    tr, va = fold_indices(ctx, 3)
    assert 3 < len(tr) / 8 <= 16  # the NaN step exists, and the epoch ends before a 16-step read
    with pytest.raises(FoldFailedError, match="fold 3"):
        method.fit_predict(3, tr, va, ctx, tmp_path)
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()


# -- LoRA ------------------------------------------------------------------------------------------

def test_lora_trains_only_adapters_and_head(fixture_root, tmp_path, tiny_vit_card):
    config = make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT,
                         train={"img_size": 32, "epochs": 1, "augment": "dihedral"})
    method = TrainMethod(config)
    method.device = torch.device("cpu")
    model = method._build()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any("lora_A" in n for n in trainable) and "head.weight" in trainable
    assert {n.split(".lora_")[0].split(".")[-1] for n in trainable if "lora_" in n} == {"qkv", "proj", "fc1", "fc2"}
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train < 0.1 * sum(p.numel() for p in model.parameters())

    ctx = make_context(config)
    method.prepare(ctx)
    tr, va = fold_indices(ctx)
    result = method.fit_predict(1, tr, va, ctx, tmp_path)
    ckpt = tmp_path / "adapter_and_head.safetensors"
    full_bytes = 4 * sum(p.numel() for p in model.parameters())
    # adapters (r=8 on qkv/proj/fc1/fc2 of 12 blocks, ~1.2 MB for ViT-Tiny) + head: nothing else
    assert ckpt.is_file() and ckpt.stat().st_size < 4 * n_train + 100_000
    assert ckpt.stat().st_size < 0.1 * full_bytes
    keys = load_file(str(ckpt)).keys()
    assert keys and all("lora_" in k or k.startswith("head.") for k in keys)
    assert not (tmp_path / "model.safetensors").exists()
    for p in result.probs.values():
        assert ((p >= 0) & (p <= 1)).all()

    # the same adapters in peft's layout load into a plain backbone with peft alone
    from peft import PeftModel

    saved = load_file(str(ckpt))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(create_backbone(TINY_VIT, pretrained=False).model, str(tmp_path / "adapter"))
    assert not [w for w in caught if "missing" in str(w.message).lower()]  # peft only warns when keys are missing
    loaded = {k.split("base_model.model.", 1)[1].replace(".default", ""): v
              for k, v in peft_model.state_dict().items() if "lora_" in k}
    ours = {k.removeprefix("backbone.model.").replace(".default", ""): v for k, v in saved.items() if "lora_" in k}
    assert loaded and set(loaded) == set(ours)
    for key, value in loaded.items():
        assert torch.equal(value, ours[key]), key
    assert peft_model.peft_config["default"].r == 8 and peft_model.peft_config["default"].lora_alpha == 16


def test_lora_changes_only_adapters_and_head(fixture_root, tmp_path, tiny_vit_card):
    """After training, frozen weights are bit-identical to the built model's."""
    config = make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT,
                         train={"img_size": 32, "epochs": 1, "augment": "none", "lr": 1e-2})
    ctx = make_context(config)
    method = TrainMethod(config)
    method.prepare(ctx)
    torch.manual_seed(config.seed + 1)  # fit_predict seeds the same way before building
    initial = {k: v.clone() for k, v in method._build().state_dict().items()}
    tr, va = fold_indices(ctx)
    method.fit_predict(1, tr, va, ctx, tmp_path)
    final = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    # the resume checkpoint holds what trains (adapters, head) and buffers, not the frozen backbone
    trained = {k for k in initial if "lora_" in k or k.startswith("head.")}
    buffers = {k for k, _ in method._build().named_buffers()}
    assert trained and set(final) == trained | (buffers & set(initial))
    changed = [k for k in final if not torch.equal(initial[k], final[k])]
    assert changed and all("lora_" in k or k.startswith("head.") for k in changed)
    torch.manual_seed(config.seed + 1)
    model = method._build()  # the fold's selected model = rebuilt backbone + best.pt, as the engine loads it
    load_trained_state(model, torch.load(tmp_path / "best.pt", weights_only=True), tmp_path / "best.pt")
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items() if k not in trained)


@pytest.mark.parametrize("dropout", [0.0, 0.3])  # 0.3: the recomputation must draw the same LoRA dropout masks
def test_grad_checkpointing_gives_the_same_gradients(fixture_root, tmp_path, tiny_vit_card, dropout):
    """Gradient checkpointing recomputes the blocks' activations in the backward pass: same loss, same gradients."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        method = TrainMethod(make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT,
                                         train={"img_size": 32, "lora_dropout": dropout, "grad_checkpointing": checkpointing}))
        method.device = torch.device("cpu")
        model = method._build().train()
        assert model.backbone.model.grad_checkpointing is checkpointing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # B starts at zero: A's gradients would all be zero
        calls, attn = [], model.backbone.model.blocks[0].attn
        attn.forward = lambda *a, forward=attn.forward, **k: calls.append(1) or forward(*a, **k)
        torch.manual_seed(1)
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_grad_checkpointing_on_a_model_without_it_is_a_clear_error(fixture_root, tmp_path, tiny_vit_card, monkeypatch):
    from timm.models.vision_transformer import VisionTransformer

    monkeypatch.delattr(VisionTransformer, "set_grad_checkpointing")
    method = TrainMethod(make_config(fixture_root, tmp_path, model=TINY_VIT,
                                     train={"img_size": 32, "grad_checkpointing": True}))
    method.device = torch.device("cpu")
    with pytest.raises(MitobenchError, match="does not support gradient checkpointing.*train.grad_accum"):
        method._build()


def test_lora_without_regex_is_a_clear_error(fixture_root, tmp_path):
    config = make_config(fixture_root, tmp_path, method="lora", model="timm/resnet10t")
    with pytest.raises(MitobenchError, match="no LoRA target regex.*train.lora_targets"):
        TrainMethod(config)
    with pytest.raises(MitobenchError, match="LoRA"):
        run_benchmark(config, console=Console(file=io.StringIO()))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_lora_targets_matching_nothing(fixture_root, tmp_path, tiny_vit_card):
    config = make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT, train={"lora_targets": r"nothing\.here$"})
    method = TrainMethod(config)
    method.device = torch.device("cpu")
    with pytest.raises(MitobenchError, match="match no layer"):
        method._build()


@pytest.mark.parametrize("method, model, train, error", [
    ("lora", "timm/vit_tiny_patch16_224", {"lora_targets": r"nothing\.here$"}, "match no layer of timm/vit_tiny"),
    ("lora", "timm/vit_tiny_patch16_224", {"lora_targets": r".*norm1$"},
     "match 12 module\\(s\\) of timm/vit_tiny_patch16_224 \\(e.g. blocks.0.norm1\\), of kind LayerNorm, which LoRA "
     "cannot adapt"),
    ("finetune", "efficientnet_lite0", {"freeze_stages": 7}, "freeze_stages=7 leaves no stage"),
    # timm's VGG has set_grad_checkpointing, which asserts; and it takes no drop_path_rate
    ("finetune", "timm/vgg11", {"grad_checkpointing": True}, "'timm/vgg11' does not support gradient checkpointing"),
    ("finetune", "timm/vgg11", {"drop_path": 0.1}, "'timm/vgg11' does not take a stochastic-depth rate"),
])
def test_a_recipe_the_model_cannot_take_is_refused_before_any_run_folder(fixture_root, tmp_path, method, model, train,
                                                                          error):
    """Checked on the bare architecture (meta tensors: a ViT-H in a second, no weights needed), not in fold 1 of a
    run folder that then reads 'failed'."""
    config = make_config(fixture_root, tmp_path, method=method, model=model, train=train)
    with pytest.raises(MitobenchError, match=error):
        run_benchmark(config, console=Console(file=io.StringIO()))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_optimizer_is_fused_and_updates_like_the_plain_one(cls):
    """This torch fuses AdamW/Adam on the CPU; the fused update follows the plain one (float rounding apart)."""
    gen = torch.Generator().manual_seed(0)
    fused_model = torch.nn.Linear(8, 3)
    plain_model = copy.deepcopy(fused_model)
    fused = make_optimizer(cls, [{"params": list(fused_model.parameters()), "weight_decay": 0.01}], 1e-2)
    plain = cls([{"params": list(plain_model.parameters()), "weight_decay": 0.01}], lr=1e-2)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(5):
        x = torch.randn(16, 8, generator=gen)
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(fused_model.parameters(), plain_model.parameters()):
        assert not torch.equal(p, torch.zeros_like(p))
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- augmentation ----------------------------------------------------------------------------------

def asymmetric(size=8):
    return torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size) / (size * size)


def test_dihedral_group():
    x = asymmetric()
    views = [dihedral(x, k) for k in range(8)]
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(views[i], views[j]), (i, j)
    for k, v in enumerate(views):
        inverse = (4 - k) % 4 if k < 4 else k  # rotations invert by the opposite rotation, flips are involutions
        assert torch.equal(dihedral(v, inverse), x), k
    assert torch.equal(views[0], x)


def test_batch_augment_shape_and_range():
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, (6, 128, 128, 3), dtype=np.uint8))
    for name, cfg in PRESETS.items():
        out = BatchAugment(cfg, 64, seed=1)(batch)
        assert out.shape == (6, 3, 64, 64) and out.dtype == torch.float32, name
        assert out.min() >= 0 and out.max() <= 1, name
    a = BatchAugment(PRESETS["strong"], 64, seed=3)
    b = BatchAugment(PRESETS["strong"], 64, seed=3)
    assert torch.equal(a(batch), b(batch))  # seeded
    state = a.state()
    first = a(batch)
    a.set_state(state)
    assert torch.equal(a(batch), first)  # the generator state round-trips (resume)


def test_no_augmentation_is_plain_resize():
    rng = np.random.default_rng(1)
    batch = torch.from_numpy(rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8))
    out = BatchAugment(PRESETS["none"], 64)(batch)
    x = batch.permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(out, F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True,
                                                  align_corners=False))
    assert torch.equal(BatchAugment(PRESETS["none"], 128)(batch), x)


def test_hed_jitter_zero_is_identity():
    x = torch.rand(3, 3, 16, 16) * 0.98 + 0.01
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(hed_jitter(x, 0.0, 0.0, gen), x, atol=1e-4, rtol=0)
    y = hed_jitter(x, 0.3, 0.1, gen)
    assert y.shape == x.shape and (y - x).abs().max() > 1e-3 and y.min() >= 0 and y.max() <= 1


def _draws(gen: torch.Generator, n: int, amount: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * 2 * amount - amount


def test_hed_jitter_is_the_stain_space_recipe():
    """One affine map per image equals the recipe step by step: OD -> HED, scale and shift, -> OD -> RGB."""
    from mitobench.methods.augment import _HED_FROM_RGB, _RGB_FROM_HED

    x = (torch.rand(4, 3, 16, 16) * 0.98 + 0.01).contiguous(memory_format=torch.channels_last)
    out = hed_jitter(x, 0.3, 0.1, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    alpha, beta = 1 + _draws(gen, 12, 0.3).view(4, 3, 1, 1), _draws(gen, 12, 0.1).view(4, 3, 1, 1)
    hed = torch.einsum("bchw,cd->bdhw", -torch.log(x), _HED_FROM_RGB) * alpha + beta
    expected = torch.exp(-torch.einsum("bdhw,dc->bchw", hed, _RGB_FROM_HED)).clamp(0, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_colour_jitter_is_brightness_contrast_saturation_hue_in_turn():
    """The composed per-image colour map equals the four operations applied one after another."""
    cfg = AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.4, hue=0.05)
    x = torch.rand(5, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    out = colour_jitter(x, cfg, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    b, c, s, hue = (1 + _draws(gen, 5, 0.3), 1 + _draws(gen, 5, 0.3), 1 + _draws(gen, 5, 0.4), _draws(gen, 5, 0.05))
    y = x * b.view(5, 1, 1, 1)
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * c.view(5, 1, 1, 1) + mean
    grey = 0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]
    y = (y - grey) * s.view(5, 1, 1, 1) + grey
    theta = hue * 2 * math.pi
    k = 1 / math.sqrt(3)
    cross = torch.tensor([[0, -k, k], [k, 0, -k], [-k, k, 0]])
    for i in range(5):  # Rodrigues' rotation about the grey axis (1, 1, 1) / sqrt(3)
        rot = math.cos(theta[i]) * torch.eye(3) + math.sin(theta[i]) * cross + (1 - math.cos(theta[i])) / 3
        y[i] = torch.einsum("ij,jhw->ihw", rot, y[i])
    torch.testing.assert_close(out, y.clamp(0, 1), rtol=0, atol=1e-5)
    assert ((out > 0) & (out < 1)).float().mean() > 0.5  # not just clamped to the bounds
    grey_pixels = torch.full((2, 3, 4, 4), 0.5)
    torch.testing.assert_close(colour_jitter(grey_pixels, AugmentConfig(saturation=0.5, hue=0.1),
                                             torch.Generator().manual_seed(0)), grey_pixels)  # grey stays grey


def _mark_centroid(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    size = out.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    mass = out[:, 0]
    return (mass * ys).sum((1, 2)) / mass.sum((1, 2)), (mass * xs).sum((1, 2)) / mass.sum((1, 2))


def _centre_mark(n=64):
    img = torch.zeros(n, 3, 128, 128)
    img[:, :, 56:72, 56:72] = 1.0  # a 16 x 16 px mark around the centre, where the mitotic figure is
    return img


@pytest.mark.parametrize("preset", ["paper", "strong"])
def test_centre_stays_near_the_middle_with_the_presets(preset):
    out = geometric(_centre_mark(), 64, PRESETS[preset], torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 64, 64)
    assert (out.amax(dim=(1, 2, 3)) > 0.9).all()
    cy, cx = _mark_centroid(out)
    assert ((cy - 31.5).abs() < 0.3 * 32).all() and ((cx - 31.5).abs() < 0.3 * 32).all()


def test_centre_stays_in_view_at_the_strongest_crop():
    """Smallest crop (half the side) with the largest shift allowed: the centre mark is still in every view."""
    cfg = AugmentConfig(dihedral=False, rotate_deg=0, crop_scale=(0.5, 1.0), max_shift=0.5)
    out = geometric(_centre_mark(256), 64, cfg, torch.Generator().manual_seed(0))
    assert (out.amax(dim=(1, 2, 3)) > 0.5).all()


def test_training_resize_below_the_patch_size_is_anti_aliased():
    """128 -> 32 px with a small rotation: pixel noise is averaged away as in an anti-aliased resize,
    not point-sampled (which keeps about half its amplitude and aliases it)."""
    noise = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    cfg = AugmentConfig(dihedral=False, rotate_deg=5, crop_scale=(0.9, 1.0))
    out = geometric(noise, 32, cfg, torch.Generator().manual_seed(1))
    reference = F.interpolate(noise, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    point_sampled = F.grid_sample(noise, F.affine_grid(torch.eye(2, 3).expand(8, 2, 3), (8, 3, 32, 32),
                                                       align_corners=False), align_corners=False)
    assert out.std() < 1.5 * reference.std()
    assert out.std() < 0.6 * point_sampled.std()


# -- losses ----------------------------------------------------------------------------------------

def _zt(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 2, (torch.rand(n, generator=g) < 0.3).float()


def test_weighted_bce_equals_manual():
    z, t = _zt()
    pw = 3.5
    p = torch.sigmoid(z)
    manual = -(pw * t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    torch.testing.assert_close(make_loss("weighted_bce", pw)(z, t), manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(make_loss("bce", pw)(z, t), -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean(),
                               rtol=1e-5, atol=1e-6)


def test_focal_gamma_zero_is_alpha_weighted_bce():
    z, t = _zt(1)
    pw = 2.0
    alpha = pw / (1 + pw)
    ce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    expected = ((alpha * t + (1 - alpha) * (1 - t)) * ce).mean()
    torch.testing.assert_close(make_loss("focal", pw, gamma=0.0)(z, t), expected)
    # gamma > 0 down-weights easy examples
    assert make_loss("focal", pw, gamma=2.0)(z, t) < expected


def test_label_smoothing_and_soft_targets():
    z, t = _zt(2)
    smoothed = make_loss("bce", 1.0, smoothing=0.2)(z, t)
    torch.testing.assert_close(smoothed, F.binary_cross_entropy_with_logits(z, t * 0.8 + 0.1))
    soft = torch.full_like(t, 2 / 3)  # a 2-of-3 expert vote
    assert math.isfinite(make_loss("focal", 1.0)(z, soft).item())
    with pytest.raises(MitobenchError, match="unknown loss"):
        make_loss("hinge", 1.0)


# -- presets ---------------------------------------------------------------------------------------

def test_apply_preset_keeps_explicit_options():
    config = load_config(None, {"method": "finetune", "train.epochs": 3, "train.lr": 0.123})
    apply_preset(config, "cpu", explicit={"train.epochs"})
    assert config.train.epochs == 3  # given explicitly
    assert config.train.lr == TRAIN_PRESETS["cpu"]["lr"]  # not explicit: the preset's
    assert config.train.img_size == TRAIN_PRESETS["cpu"]["img_size"] and config.train.preset == "cpu"
    paper = apply_preset(load_config(None, {"method": "lora"}), "paper")
    assert paper.train.patience == 10 and paper.train.lora_r == 8 and paper.train.lora_alpha == 16
    assert paper.train.lora_dropout == 0.3 and paper.train.optimizer == "adam" and paper.train.lr == 5e-5
    assert apply_preset(load_config(None, {"method": "finetune"}), "paper").train.patience == 15
    with pytest.raises(MitobenchError, match="unknown preset"):
        apply_preset(load_config(None, {}), "turbo")


def test_gpu_benchmark_lora_dropout_switch_restores_the_layers(fixture_root, tmp_path, tiny_vit_card):
    """benchmarks/gpu_train.py times LoRA without dropout, then the reference with it: the switch must undo."""
    gpu_train = load_benchmark_script("gpu_train")
    method = TrainMethod(make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT, train={"img_size": 32}))
    method.device = torch.device("cpu")
    model = method._build()

    def dropouts():
        return [layer for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                for layer in m.lora_dropout.values()]

    before = dropouts()
    assert len(before) == 4 * 12 and all(isinstance(d, torch.nn.Dropout) and d.p == 0.3 for d in before)
    with gpu_train.without_lora_dropout(model) as n:
        assert n == len(before) and all(isinstance(d, torch.nn.Identity) for d in dropouts())
    assert all(a is b for a, b in zip(dropouts(), before))


def test_lora_layers_keep_the_autocast_input(fixture_root, tmp_path, tiny_vit_card):
    """lora.prepare turns off peft's cast of each adapted layer's input to float32; under autocast the values
    are the same either way."""
    method = TrainMethod(make_config(fixture_root, tmp_path, method="lora", model=TINY_VIT, train={"img_size": 32}))
    method.device = torch.device("cpu")
    model = method._build().eval()
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # peft starts B at zero, which would hide any difference
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        without_cast = model(x)
        for m in layers:
            m.cast_input_dtype_enabled = True
        assert torch.equal(model(x), without_cast)


def test_a_damaged_fold_checkpoint_says_how_to_train_the_fold_again(tmp_path):
    from mitobench.methods.engine import load_fold_checkpoint

    path = tmp_path / "fold_2" / "last.pt"
    path.parent.mkdir()
    torch.save({"model": {"w": torch.ones(1000)}, "state": "{}"}, path)
    assert torch.equal(load_fold_checkpoint(path)["model"]["w"], torch.ones(1000))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(MitobenchError, match="Delete the folder") as err:
        load_fold_checkpoint(path)
    assert str(path) in str(err.value) and str(path.parent) in str(err.value)


# -- review fixes (2026-12-02) ----------------------------------------------------------------------

@pytest.mark.parametrize("accum", [2, 3])
def test_grad_accumulation_flushes_every_epoch_and_schedules_the_steps_it_takes(fixture_root, tmp_path, accum):
    """The last, shorter accumulation window of an epoch is stepped (nothing carries into the next epoch), and
    the warm-up + cosine schedule counts the optimiser steps actually taken, so it ends at 0."""
    config = make_config(fixture_root, tmp_path, train={"img_size": 32, "epochs": 2, "grad_accum": accum,
                                                       "batch_size": 8, "optimizer": "adamw"})
    ctx = make_context(config)
    tr, _ = fold_indices(ctx)
    batches = math.ceil(len(tr) / 8)
    assert batches % accum, "the fixture should leave a short last window"
    _, _, _, result = fit_fold(config, tmp_path / "fold")
    saved = torch.load(tmp_path / "fold" / "last.pt", weights_only=True)
    steps = 2 * math.ceil(batches / accum)
    assert {int(s["step"]) for s in saved["opt"]["state"].values()} == {steps}
    assert saved["sched"]["last_epoch"] == steps
    assert result.info["history"][-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_grad_accumulation_averages_each_window_over_its_micro_batches(fixture_root, tmp_path, monkeypatch):
    """A window of k micro-batches sums loss / k: the gradient of the window's mean loss, also for the short one."""
    config = make_config(fixture_root, tmp_path, train={"img_size": 32, "epochs": 1, "grad_accum": 3, "batch_size": 8})
    ctx = make_context(config)
    tr, _ = fold_indices(ctx)
    n_batches = math.ceil(len(tr) / 8)
    divisors = []
    real_make_loss = losses_mod.make_loss

    class DivisionRecorder:
        """Stands for the loss in ``loss / window``: records the divisor, returns the real quotient."""

        def __init__(self, loss):
            self.loss = loss

        def __truediv__(self, k):
            divisors.append(k)
            return self.loss / k

    def recording_make_loss(*args, **kwargs):
        loss_fn = real_make_loss(*args, **kwargs)
        return lambda logits, y: DivisionRecorder(loss_fn(logits, y))

    monkeypatch.setattr(losses_mod, "make_loss", recording_make_loss)
    fit_fold(config, tmp_path / "fold")
    expected = [min(3, n_batches - (s - s % 3)) for s in range(n_batches)]
    assert divisors == expected and expected[-1] < 3


def test_lora_keeps_batchnorm_statistics_so_predict_matches_the_run(fixture_root, tmp_path):
    """LoRA on a BatchNorm CNN: the frozen backbone's running statistics stay the pretrained ones (the checkpoint,
    adapters + head, does not hold them), so the saved fold model scores as the run did."""
    config = make_config(fixture_root, tmp_path, method="lora", model="efficientnet_lite0",
                         train={"img_size": 32, "epochs": 1, "lr": 1e-2})
    method, ctx, va, result = fit_fold(config, tmp_path / "fold")
    initial = create_backbone("efficientnet_lite0").model.state_dict()
    final = torch.load(tmp_path / "fold" / "best.pt", weights_only=True)
    stats = [k for k in initial if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        torch.testing.assert_close(final[f"backbone.model.{key}"], initial[key], rtol=0, atol=0, msg=key)

    from mitobench.methods import lora
    from mitobench.methods.engine import Classifier

    fresh = lora.prepare(Classifier(create_backbone("efficientnet_lite0")), config)
    fresh.load_state_dict(load_file(str(tmp_path / "fold" / "adapter_and_head.safetensors")), strict=False)
    x_val = method.images["AMi-Br-train"][va]
    np.testing.assert_allclose(method.predict(fresh.to(method.device), x_val, False), result.probs["validation"],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 2147483648 bytes.")])
def test_out_of_memory_in_the_optimiser_step_or_evaluation_names_the_knob(fixture_root, tmp_path, monkeypatch, error):
    """On a GPU (OutOfMemoryError) and on the CPU (the allocator's plain RuntimeError) alike."""
    config = make_config(fixture_root, tmp_path, train={"img_size": 32, "epochs": 1})

    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch.optim.AdamW, "step", no_memory)
    with pytest.raises(MitobenchError, match=r"out of memory .* batch size 8 .*train\.batch_size.*new run"):
        fit_fold(config, tmp_path / "a")
    monkeypatch.undo()
    monkeypatch.setattr(TrainMethod, "_predict", no_memory)
    with pytest.raises(MitobenchError, match=r"predicting .* batch size 128 .*train\.eval_batch_size=N.*--batch-size"):
        fit_fold(config, tmp_path / "b")
    monkeypatch.undo()
    monkeypatch.setattr(TrainMethod, "_build", no_memory)  # the model alone does not fit: no batch size helps
    with pytest.raises(MitobenchError, match=r"placing efficientnet_lite0 .* does not fit.*precision=bf16.*--device cpu"):
        fit_fold(config, tmp_path / "c")


def test_evaluation_batch_size_is_a_setting(fixture_root, tmp_path, monkeypatch):
    config = make_config(fixture_root, tmp_path, train={"img_size": 32, "epochs": 1, "eval_batch_size": 5})
    seen = []
    real = TrainMethod._predict

    def spy(self, model, images, tta, batch_size):
        seen.append(batch_size)
        return real(self, model, images, tta, batch_size)

    monkeypatch.setattr(TrainMethod, "_predict", spy)
    fit_fold(config, tmp_path / "fold")
    assert seen and set(seen) == {5}
    with pytest.raises(MitobenchError, match="eval_batch_size=0"):
        make_config(fixture_root, tmp_path, train={"eval_batch_size": 0})


@pytest.mark.parametrize("arch, bottom, top", [
    ("vit_tiny_patch16_224", ("patch_embed.proj.weight", "cls_token", "pos_embed"),
     ("norm.weight", "blocks.11.mlp.fc2.weight")),
    ("efficientnet_lite0", ("conv_stem.weight", "bn1.weight"), ("conv_head.weight", "bn2.weight")),
    ("swin_tiny_patch4_window7_224", ("patch_embed.proj.weight",), ("norm.weight", "layers.3.blocks.1.mlp.fc2.weight")),
])
def test_layer_decay_follows_timm_layers_from_the_stem_to_the_head(arch, bottom, top):
    """train.layer_decay: the stem / patch embedding lowest, every scale at most 1, the final norm and the head at 1,
    depth rising through the blocks (a Swin's stages counted in order, not restarted per stage)."""
    import timm

    from mitobench.methods.engine import Classifier, layer_scales, param_groups
    from mitobench.models.registry import Backbone

    model = timm.create_model(arch, pretrained=False, num_classes=0)
    scales = layer_scales(model, 0.8)
    assert set(scales) == {n for n, _ in model.named_parameters()}
    assert max(scales.values()) == 1.0 and all(0 < s <= 1 for s in scales.values())
    low = min(scales.values())
    assert all(scales[n] == low for n in bottom)
    assert all(scales[n] == 1.0 for n in top)
    names = list(scales)
    blocks = [n for n in names if ".blocks." in f".{n}" and n.endswith("weight")]
    assert [scales[n] for n in blocks] == sorted(scales[n] for n in blocks)  # non-decreasing with depth

    card = ModelCard(key=f"test/{arch}", family="test", arch=arch, input_size=224, embedding="pooled")
    classifier = Classifier(Backbone(model, card, "random-init", "test"))
    groups = param_groups(classifier, 1e-3, 0.01, 0.8)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(classifier.head.weight)]["lr"] == pytest.approx(1e-3)
    for name, p in model.named_parameters():
        assert by_param[id(p)]["lr"] == pytest.approx(1e-3 * scales[name])
    flat = param_groups(classifier, 1e-3, 0.01, None)  # no decay: one lr for all, decay off for norms and biases
    assert {g["lr"] for g in flat} == {1e-3} and len(flat) == 2
    # and off for what timm lists as no_weight_decay (position embeddings, class tokens, Swin's bias tables)
    decay_of = {id(p): g["weight_decay"] for g in flat for p in g["params"]}
    listed = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    for name, p in model.named_parameters():
        expected = 0.0 if (p.ndim <= 1 or name in listed or name.split(".")[-1] in listed) else 0.01
        assert decay_of[id(p)] == expected, name
    if arch.startswith("vit"):
        assert decay_of[id(model.pos_embed)] == decay_of[id(model.cls_token)] == 0.0


def test_layer_decay_on_a_model_without_layer_groups_is_a_clear_error():
    from mitobench.methods.engine import layer_scales

    with pytest.raises(MitobenchError, match="layer_decay.*group_matcher"):
        layer_scales(torch.nn.Linear(2, 2), 0.8)


def test_evaluation_sees_the_patch_as_training_does(tiny_vit_card, monkeypatch, fixture_root, tmp_path):
    """A card with its own Resize + CenterCrop (e.g. 256 -> 224): the fine-tuned model is evaluated on the whole
    patch resized to the input size, the geometry its training batches had, not on the card's centre crop."""
    card = registry._REGISTRY[TINY_VIT]
    monkeypatch.setitem(registry._REGISTRY, TINY_VIT, ModelCard(**{**card.__dict__, "resize": 40,
                                                                    "interpolation": "bicubic"}))
    config = make_config(fixture_root, tmp_path, model=TINY_VIT, train={"img_size": 32, "augment": "none"})
    method = TrainMethod(config)
    method.device = torch.device("cpu")
    model = method._build().eval()
    patches = torch.randint(0, 256, (3, 48, 48, 3), dtype=torch.uint8)
    seen = []
    monkeypatch.setattr(model.backbone, "forward", lambda x: seen.append(x) or torch.zeros(len(x), card.embed_dim or 192))
    method.predict(model, patches, tta=False)
    trained = BatchAugment(PRESETS["none"], 32, 0)(patches)
    expected = (trained - model.backbone._mean) / model.backbone._std
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-5)


def test_train_seed_changes_only_the_training(fixture_root, tmp_path):
    """The default run, a run with train_seed equal to seed, and another seed: the first two train identically, the
    third differently (the folds stay the paper's: tests/test_repeats.py)."""
    results = {}
    for name, seed in (("default", None), ("same", 42), ("other", 7)):
        config = make_config(fixture_root, tmp_path / name, train={"epochs": 1}, train_seed=seed)
        _, ctx, _, result = fit_fold(config, tmp_path / name / "fold_1")
        results[name] = (ctx.folds, result.probs["validation"])
    np.testing.assert_array_equal(results["default"][1], results["same"][1])
    assert not np.allclose(results["default"][1], results["other"][1])


def test_fold_seeds_of_different_train_seeds_never_coincide():
    """train_seed + fold would give seed 43's fold 1 the streams of seed 42's fold 2; derived seeds do not."""
    from mitobench.config import RunConfig

    default = {RunConfig().fold_seed(k) for k in range(1, 6)}
    assert default == {43, 44, 45, 46, 47}
    assert RunConfig(train_seed=42).fold_seed(3) == 45
    repeats = [RunConfig(train_seed=s) for s in (43, 44, 0)]
    seeds = [c.fold_seed(k) for c in repeats for k in range(1, 6)]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & default
    assert RunConfig(train_seed=43).fold_seed(1) == RunConfig(train_seed=43).fold_seed(1)  # reproducible
