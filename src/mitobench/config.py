"""Run configuration: defaults here, a YAML file may set any field, command-line flags override both.

The resolved configuration is saved as ``config.yaml`` in every run folder, so a run can be
repeated (or resumed) from its folder alone.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mitobench.device import DTYPES
from mitobench.errors import MitobenchError


@dataclass
class ProbeConfig:
    head: str = "logistic"  # logistic (standardised, C by inner slide-grouped CV) | torch (the paper's head)
    Cs: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    inner_splits: int = 3
    max_iter: int = 2000
    # logistic head: fold models fitted in this many forked processes (Linux); None: one per CPU core, 1: serial.
    # The fits are single-threaded and deterministic, so the results do not depend on it.
    workers: int | None = None
    # torch head (paper parity): BCE, Adam 5e-5, weighted sampler, early stopping on the validation fold
    lr: float = 5e-5
    weight_decay: float = 1e-5
    batch_size: int = 8
    max_epochs: int = 100
    patience: int = 15


@dataclass
class TrainConfig:
    """End-to-end fine-tuning and LoRA (``mitobench.methods.engine``)."""

    preset: str | None = None
    img_size: int | None = None  # None: the model card's input size, written into config.yaml when a run starts
    epochs: int = 100
    batch_size: int = 8
    optimizer: str = "adamw"  # adamw (warm-up + cosine) | adam (+ ReduceLROnPlateau on val BA, the paper's)
    lr: float = 5e-5
    weight_decay: float = 1e-5
    warmup_epochs: float = 1.0
    layer_decay: float | None = None  # layer-wise lr decay (fine-tuning)
    freeze_stages: int = 0  # the stem and the first N stages keep their pretrained weights (methods/freeze.py)
    freeze_norm_stats: bool = True  # ... and their BatchNorm statistics (False: batch statistics, as in training)
    patience: int = 15
    min_epochs: int = 0
    # which epoch's weights a fold keeps, judged on the validation fold: ba (best BA, ties by AUROC; the paper's),
    # auroc (best AUROC, ties by BA), last (the last epoch: no selection, no early stopping)
    select: str = "ba"
    sampler: str = "weighted"  # weighted | shuffle
    loss: str = "bce"  # bce | weighted_bce | focal
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    soft_labels: bool = False  # fraction of experts voting atypical, where published
    augment: str = "paper"  # none | paper | strong
    grad_accum: int = 1
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile, block by block, in place (methods/compile.py)
    compile_mode: str | None = None  # torch.compile's mode: None (default) | max-autotune-no-cudagraphs | ...
    # auto: bf16 autocast on CUDA, float32 on the CPU; fp32; bf16 (on the CPU with the fast depthwise backward of
    # methods/depthwise.py: ~1.6-1.7x faster CNN training where the CPU has native bf16); native: bf16 where the
    # device has it natively, else fp32, resolved when a run starts (methods/precision.py)
    precision: str = "auto"
    channels_last: bool = True
    tta: bool = False  # 8 dihedral views at evaluation
    # with tta: each view also of the patch's central fraction (1.0: the whole patch), resized to the input size
    tta_crops: list[float] = field(default_factory=lambda: [1.0])
    eval_every: int = 1
    eval_batch_size: int = 128  # images per forward pass when predicting the validation fold and hold-out sets
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.3
    lora_targets: str | None = None  # regex; default: the model card's
    fused_lora: bool = True  # peft's LoRA layers computed by one autograd function, same arithmetic (methods/fused_lora.py)
    num_threads: int | None = None
    ema: float | None = None  # exponential moving average of weights, selected on the validation fold
    mixup: float | None = None  # Beta(alpha, alpha) mixup of images and targets (methods/mixup.py); None: off
    dropout: float = 0.0  # dropout before the classification head
    drop_path: float = 0.0  # stochastic depth of the backbone's residual blocks (timm's drop_path_rate)


@dataclass
class RunConfig:
    data_root: str | None = None
    cache_dir: str | None = None
    runs_dir: str = "runs"
    model: str = "efficientnet_lite0"
    weights: str | None = None
    method: str = "probe"  # probe | finetune | lora
    threshold: str = "fixed"  # fixed (0.5, the paper's) | validation (Youden on the validation fold)
    # none | platt: each fold model's probabilities Platt-scaled on its validation fold (evaluation/calibration.py),
    # its threshold mapped alike, so its decisions stay and its probabilities mean the training split's prevalence
    calibration: str = "none"
    n_folds: int = 5
    seed: int = 42  # the folds (the paper's: 42) and the bootstrap; also the training seed unless train_seed is set
    # seeds the training alone (weights' init, sampler, augmentation, dropout; the probe's inner CV), the folds staying
    # the paper's: repeat a run with other train_seed values to measure seed variance (`mitobench report --seeds`).
    # None or equal to seed: train as seed says
    train_seed: int | None = None
    patch_size: int = 128
    batch_size: int | None = None  # embedding extraction; None: 8 on CPU (cache-friendly, fastest here), 128 on GPU
    # CPU embedding in this many single-threaded worker processes (faster than threads on a small CPU);
    # None: one per CPU core, 1: in this process
    embed_workers: int | None = None
    # finetune/lora: train this many folds at once, each in its own process with a share of the CPU cores
    # (small CNNs train faster as k one-thread processes than as one k-thread process); 1: one fold at a time
    fold_workers: int = 1
    device: str = "auto"
    dtype: str = "auto"  # auto: the card's dtype on CUDA, float32 on CPU
    datasets: list[str] = field(default_factory=list)  # extra hold-out sets: class folders or CSVs
    dedup: bool = False  # also evaluate de-duplicated hold-out sets
    n_boot: int = 1000
    # the ensemble's bootstrap CI resamples figures (stratified by class; the default) or slides: figures of one
    # slide are not independent draws, so "slide" gives the wider CI for new slides, on sets that name each
    # figure's slide (AMi-Br test, a --dataset CSV's group column); the others stay per figure (metrics.csv ci_unit)
    bootstrap: str = "figure"
    allow_download: bool = False
    # a probe or LoRA of a model with published weights that are not found here is refused (its features would be
    # random); true runs it on random init anyway
    allow_random_init: bool = False
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def seed_repeat(self) -> bool:
        """Whether ``train_seed`` makes this run train differently from the default (unset or equal to ``seed``: no)."""
        return self.train_seed is not None and self.train_seed != self.seed

    def fold_seed(self, fold: int) -> int:
        """The seed of fold ``fold``'s training. Without a seed repeat it is ``seed + fold``, as runs always
        trained; another ``train_seed`` gets streams independent of every other seed's, not ``train_seed + fold``
        (which would reuse a neighbouring seed's fold streams)."""
        if not self.seed_repeat:
            return self.seed + fold
        return int(np.random.SeedSequence([self.train_seed, fold]).generate_state(1, np.uint64)[0] >> 1)

    @property
    def training_seed(self) -> int:
        """The seed of a whole-run estimator (the probe): ``train_seed`` when set, else ``seed``."""
        return self.seed if self.train_seed is None else self.train_seed


SELECT_RULES = ("ba", "auroc", "last")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's exponent floats that YAML 1.1 reads as strings (``3e-4``, ``1E-3``,
    ``1.5e3``: no decimal point, or no sign in the exponent): the way learning rates are usually written."""


_YamlLoader.add_implicit_resolver(  # consulted after YAML 1.1's own int and float patterns, so it changes no other value
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def read_yaml(text: str) -> Any:
    """A YAML document (a config file or a ``--set`` value) with ``_YamlLoader``."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass

_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                       "None": (type(None),), "list[float]": (list,), "list[str]": (list,)}
_ITEMS: dict[str, tuple[type, ...]] = {"list[float]": (int, float), "list[str]": (str,)}


def _check_type(value: Any, annotation: str, where: str, key: str) -> None:
    """A wrong type in a YAML file or ``--set`` stops here, not deep inside a fold."""
    parts = [part.strip() for part in annotation.split("|")]
    allowed = tuple(t for part in parts for t in _TYPES.get(part, (object,)))
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if ok and isinstance(value, list):
        items = tuple(t for part in parts for t in _ITEMS.get(part, (object,)))
        ok = all(isinstance(v, items) and not isinstance(v, bool) for v in value)
    if not ok:
        raise MitobenchError(f"{where}: option {key!r} must be {' or '.join(parts)}, not {value!r}")


def _merge(obj: Any, values: dict[str, Any], where: str) -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise MitobenchError(f"{where}: unknown option {key!r}. Known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise MitobenchError(f"{where}: option {key!r} must be a mapping")
            _merge(current, value, f"{where}.{key}")
        else:
            _check_type(value, str(names[key].type), where, key)
            setattr(obj, key, value)


PRECISIONS = ("auto", "native", "fp32", "bf16")  # train.precision; methods/precision.py says what each does


def check_precision(name: str) -> None:
    """Here, not in methods/precision.py, so that reading a config never imports torch (warm probe runs)."""
    if name not in PRECISIONS:
        raise MitobenchError(f"unknown train.precision {name!r}: use auto (bf16 on CUDA, float32 on the CPU), native "
                             "(bf16 where the device has it natively, else float32), fp32 or bf16")


def _check_preset_flag_against_yaml(config: RunConfig, train_values: dict, path: Path) -> None:
    """``--preset`` with a ``--config`` YAML that names another preset, or sets some of the preset's own options
    otherwise: the YAML would silently win (defaults <- preset <- YAML <- flags) under the flag's preset name."""
    named = train_values.get("preset")
    preset = config.train.preset
    if named and named != preset:
        raise MitobenchError(f"--preset {preset} and {path} (train.preset: {named}) name two presets; the YAML's "
                             f"values would train under the name {preset}. Drop --preset, or edit the YAML.")
    if named:
        return
    preset_keys = _preset_keys(preset, config.method)
    clash = sorted(f"train.{key}={value!r}" for key, value in train_values.items()
                   if key in preset_keys and value != getattr(config.train, key))
    if clash:
        raise MitobenchError(f"--preset {preset}: {path} sets {', '.join(clash)}, which the preset sets otherwise, "
                             "and the YAML wins over a preset. Drop --preset, remove those keys from the YAML, or "
                             "give them with --set on top of the preset.")


def _preset_keys(name: str, method: str) -> set[str]:
    from mitobench.methods.presets import LORA_OVERRIDES, PRESETS

    return set(PRESETS[name]) | (set(LORA_OVERRIDES.get(name, {})) if method == "lora" else set())


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- training preset (if one is named) <- YAML file <- overrides (``None`` values ignored)."""
    config = RunConfig()
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = read_yaml(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise MitobenchError(f"{path}: cannot read this config ({exc.strerror or exc}).") from exc
        except UnicodeDecodeError as exc:
            raise MitobenchError(f"{path} is not a text (UTF-8) YAML config (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}): "
                                 "pass the config file itself; in a run folder, restore config.yaml (the folder is "
                                 "damaged).") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            if context and start is not None:
                what += f" ({context} that starts at line {start.line + 1})"
            raise MitobenchError(f"{path} is not valid YAML{where}: {what}. Fix it (YAML needs `key: value` "
                                 "lines, nested keys indented by spaces).") from exc
        if not isinstance(values, dict):
            raise MitobenchError(f"{path}: a config must be a mapping of option: value")
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    train_values = values.get("train") if isinstance(values.get("train"), dict) else {}
    preset = flags.get("train.preset") or train_values.get("preset")
    config.method = flags.get("method") or values.get("method") or config.method
    if preset:
        from mitobench.methods.presets import apply_preset

        apply_preset(config, preset)
        if flags.get("train.preset") and path is not None:
            _check_preset_flag_against_yaml(config, train_values, path)
    if values:
        _merge(config, values, str(path))
    if overrides:
        nested: dict[str, Any] = {}
        for key, value in overrides.items():
            if value is None:
                continue
            target = nested
            *parents, leaf = key.split(".")
            for p in parents:
                target = target.setdefault(p, {})
            target[leaf] = value
        _merge(config, nested, "command line")
    if config.method not in ("probe", "finetune", "lora"):
        raise MitobenchError(f"unknown method {config.method!r}: use probe, finetune or lora")
    if config.threshold not in ("fixed", "validation"):
        raise MitobenchError(f"unknown threshold mode {config.threshold!r}: use fixed or validation")
    if config.train.select not in SELECT_RULES:
        raise MitobenchError(f"unknown train.select {config.train.select!r}: use one of {', '.join(SELECT_RULES)}")
    if config.train.mixup is not None and not config.train.mixup > 0:
        raise MitobenchError(f"train.mixup={config.train.mixup!r}: mixup needs a Beta concentration above 0 "
                             "(0.2-0.4 is usual); leave it unset (null) for no mixup.")
    if not config.train.tta_crops or not all(0 < c <= 1 for c in config.train.tta_crops):
        raise MitobenchError(f"train.tta_crops={config.train.tta_crops!r}: give fractions of the patch side in (0, 1] "
                             "kept around the centre, e.g. [1.0, 0.875]; [1.0] is the whole patch only.")
    check_precision(config.train.precision)
    if config.fold_workers < 1:
        raise MitobenchError(f"fold_workers={config.fold_workers!r}: give how many folds train at once (1: one at a time)")
    if config.fold_workers > 1 and config.method == "probe":
        raise MitobenchError("fold_workers is for --method finetune or lora; the probe already fits its folds in "
                             "parallel (probe.workers).")
    for name in ("dropout", "drop_path"):
        rate = getattr(config.train, name)
        if not 0 <= rate < 1:
            raise MitobenchError(f"train.{name}={rate!r}: a drop rate is a probability in [0, 1) (0.1-0.2 is usual; 0: off)")
    check_values(config)
    return config


# names the engine and the probe accept; here so that a typo stops the run before its folder exists
# (methods/augment.py's PRESETS must list the same augmentations: tests/test_config.py checks it)
AUGMENTS = ("none", "dihedral", "paper", "strong")
CHOICES = {"train.optimizer": ("adamw", "adam"), "train.sampler": ("weighted", "shuffle"),
           "train.loss": ("bce", "weighted_bce", "focal"), "train.augment": AUGMENTS,
           "probe.head": ("logistic", "torch"), "dtype": ("auto", *DTYPES), "calibration": ("none", "platt"),
           "bootstrap": ("figure", "slide")}
DEVICE = re.compile(r"(auto|cpu|mps|(cuda|xpu)(:\d+)?)")


def _get(config: RunConfig, key: str) -> Any:
    obj = config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check_values(config: RunConfig) -> None:
    """Every numeric option in its range and every named choice known, before a run folder exists: a bad value
    found inside a fold would cost the folds before it (or a whole trained fold)."""
    for key, allowed in CHOICES.items():
        if _get(config, key) not in allowed:
            raise MitobenchError(f"{key}={_get(config, key)!r} is unknown: use one of {', '.join(allowed)}.")
    if not DEVICE.fullmatch(str(config.device)):
        raise MitobenchError(f"device={config.device!r} is unknown: use auto, cpu, cuda, cuda:N (e.g. cuda:1) or mps.")
    at_least = {"n_folds": 2, "n_boot": 1, "patch_size": 16, "probe.inner_splits": 2, "probe.max_iter": 1,
                "probe.batch_size": 1, "probe.max_epochs": 1, "probe.patience": 1, "train.img_size": 16,
                "train.epochs": 1, "train.batch_size": 1, "train.patience": 1, "train.min_epochs": 0,
                "train.grad_accum": 1, "train.eval_every": 1, "train.eval_batch_size": 1, "train.freeze_stages": 0, "train.lora_r": 1}
    optional_at_least = {"batch_size": 1, "embed_workers": 1, "probe.workers": 1, "train.num_threads": 1}
    for key, low in [*at_least.items(), *optional_at_least.items()]:
        value = _get(config, key)
        if value is not None and value < low:
            raise MitobenchError(f"{key}={value!r}: it must be at least {low}.")
    for key in ("seed", "train_seed"):  # numpy and scikit-learn take seeds in [0, 2**32)
        value = _get(config, key)
        if value is not None and not 0 <= value < 2**32:
            raise MitobenchError(f"{key}={value!r}: a seed is a whole number from 0 to 4294967295.")
    for key in ("probe.lr", "train.lr", "train.lora_alpha"):
        if not _get(config, key) > 0:
            raise MitobenchError(f"{key}={_get(config, key)!r}: it must be above 0.")
    for key in ("probe.weight_decay", "train.weight_decay", "train.warmup_epochs", "train.focal_gamma"):
        if _get(config, key) < 0:
            raise MitobenchError(f"{key}={_get(config, key)!r}: it must be 0 or more.")
    if not config.probe.Cs or not all(c > 0 for c in config.probe.Cs):
        raise MitobenchError(f"probe.Cs={config.probe.Cs!r}: give the inverse regularisation strengths to try, each "
                             "above 0, e.g. [0.001, 0.01, 0.1].")
    train = config.train
    if not 0 <= train.lora_dropout < 1:
        raise MitobenchError(f"train.lora_dropout={train.lora_dropout!r}: a drop rate is a probability in [0, 1).")
    if not 0 <= train.label_smoothing < 0.5:
        raise MitobenchError(f"train.label_smoothing={train.label_smoothing!r}: use a value in [0, 0.5) (0.1 is usual).")
    if train.ema is not None and not 0 < train.ema < 1:
        raise MitobenchError(f"train.ema={train.ema!r}: an EMA decay is in (0, 1), e.g. 0.999; null turns it off.")
    if train.layer_decay is not None and not 0 < train.layer_decay <= 1:
        raise MitobenchError(f"train.layer_decay={train.layer_decay!r}: a layer-wise decay is in (0, 1], e.g. 0.75.")
    if train.lora_targets is not None:
        try:
            re.compile(str(train.lora_targets))
        except re.error as exc:
            raise MitobenchError(f"train.lora_targets={train.lora_targets!r} is not a valid regular expression ({exc}). "
                                 "Give a regex over module names, e.g. '.*blocks\\.\\d+\\.attn\\.qkv$'.") from exc


def save_config(config: RunConfig, path: str | Path) -> None:
    from mitobench.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
