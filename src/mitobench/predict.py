"""Apply a finished run's 5 fold models (and their ensemble) to new patches.

Input: a folder of ``Atypical``/``Normal`` sub-folders (labels known: metrics are printed), any other
folder of images (searched recursively), or a CSV with a ``path`` column (and optionally ``label``).
Output: a new CSV (never overwriting) with each fold model's probability, the ensemble probability
and the predicted class at the run's threshold.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mitobench.config import load_config
from mitobench.data.cache import PatchCache
from mitobench.data.records import IMAGE_SUFFIXES, load_custom, parse_label, read_csv
from mitobench.errors import MitobenchError
from mitobench.io import atomic_write_csv


def _records(source: Path) -> pd.DataFrame:
    if source.is_dir():
        subdirs = {p.name.lower() for p in source.iterdir() if p.is_dir()}
        if {"atypical", "normal"} <= subdirs:
            return load_custom(source)
        paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise MitobenchError(f"{source}: no images found ({sorted(IMAGE_SUFFIXES)}).")
        return pd.DataFrame({"image": [str(p.relative_to(source)) for p in paths], "path": [str(p.resolve()) for p in paths],
                             "label": np.nan})
    if source.is_file():
        table = read_csv(source, ["path"])
        paths = [Path(p) if Path(p).is_absolute() else source.parent / p for p in table["path"].astype(str)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MitobenchError(f"{source}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}.")
        labels = ([parse_label(v, f"{source} row {i + 2}") for i, v in enumerate(table["label"])]
                  if "label" in table else np.nan)
        return pd.DataFrame({"image": table["path"].astype(str), "path": [str(p.resolve()) for p in paths], "label": labels})
    raise MitobenchError(f"{source}: no such folder or CSV.")


class FoldPredictor:
    """Rebuilds the run's model for one fold from its saved checkpoint."""

    def __init__(self, run_dir: Path, device: torch.device):
        self.run_dir = run_dir
        self.config = load_config(run_dir / "config.yaml")
        self.device = device
        if device.type == "cpu":
            from mitobench.methods.cpu_memory import keep_freed_memory

            keep_freed_memory()  # 1.6-1.7x the images/s of a 16-view fine-tuned Lite0 here (methods/cpu_memory.py)
        from mitobench.models.registry import create_backbone

        self.backbone = create_backbone(self.config.model, self.config.weights,
                                        allow_download=self.config.allow_download).to(device)

    def probabilities(self, fold: int, patches: np.ndarray, batch_size: int) -> np.ndarray:
        scratch = self.run_dir / "folds" / f"fold_{fold}"
        if self.config.method == "probe":
            from mitobench.embed import extract, shutdown_workers
            from mitobench.device import cpu_workers
            from mitobench.methods.probe import load_linear

            if not hasattr(self, "_feats"):
                try:  # on CPU: the frozen graph in one single-threaded worker per core, batch size chosen for it
                    self._feats = extract(self.backbone, patches, None if self.device.type == "cpu" else batch_size,
                                          self.device, name="embed", workers=cpu_workers(self.config.embed_workers))
                finally:
                    shutdown_workers()
            w, b = load_linear(self._checked(scratch / "probe.safetensors"))
            return 1 / (1 + np.exp(-(self._feats.astype(np.float64) @ w + b)))
        return self._trained(fold, scratch, patches, batch_size)

    def _checked(self, path: Path) -> Path:
        if not path.is_file():
            raise MitobenchError(f"{path} is missing: this run folder has no saved model for that fold.")
        return path

    def _trained(self, fold: int, scratch: Path, patches: np.ndarray, batch_size: int) -> np.ndarray:
        import copy

        from safetensors.torch import load_file

        from mitobench.methods.engine import Classifier, TrainMethod, _method_module

        from mitobench.methods.engine import match_input_size

        backbone = copy.deepcopy(self.backbone)
        match_input_size(backbone, self.config.train.img_size)
        model = Classifier(backbone)
        model = _method_module(self.config.method).prepare(model, self.config)
        name = "model.safetensors" if self.config.method == "finetune" else "adapter_and_head.safetensors"
        state = load_file(str(self._checked(scratch / name)))
        result = model.load_state_dict(state, strict=self.config.method == "finetune")
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise MitobenchError(f"{scratch / name} does not fit {self.config.model}: unexpected keys {unexpected[:3]}.")
        method = TrainMethod(self.config)
        method.device = self.device
        images = torch.from_numpy(np.array(patches))
        return method.predict(model.to(self.device), images, self.config.train.tta, batch_size)


def predict(run_dir: str | Path, source: str | Path, out: str | Path | None = None, batch_size: int = 64,
            device: str = "auto", cache_dir: str | None = None) -> tuple[Path, pd.DataFrame]:
    from mitobench.device import pick_device
    from mitobench.protocol import default_cache_dir

    run_dir, source = Path(run_dir), Path(source).expanduser().resolve()
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
    if status.get("state") != "complete":
        raise MitobenchError(f"{run_dir} is not a complete mitobench run (status {status.get('state', 'missing')}); "
                             "finish it with `mitobench run --resume` first.")
    config = load_config(run_dir / "config.yaml")
    fold_info = json.loads((run_dir / "fold_info.json").read_text())
    thresholds = [float(fold_info[str(f)]["threshold"]) for f in range(1, config.n_folds + 1)]
    out = Path(out) if out else run_dir / "predictions" / f"{source.stem}-{datetime.now():%Y%m%d-%H%M%S}.csv"
    if out.exists():
        raise MitobenchError(f"{out} exists; mitobench never overwrites results. Choose another --out.")
    records = _records(source)
    if cache_dir:
        config.cache_dir = cache_dir
    patches, _ = PatchCache(default_cache_dir(config), config.patch_size).load(records, source.name)
    predictor = FoldPredictor(run_dir, pick_device(device))
    table = records[["image", "path", "label"]].copy()
    for fold in range(1, config.n_folds + 1):
        table[f"p_fold{fold}"] = predictor.probabilities(fold, patches, batch_size)
    table["p_ensemble"] = table[[f"p_fold{f}" for f in range(1, config.n_folds + 1)]].mean(axis=1)
    threshold = float(np.mean(thresholds))
    table["predicted"] = np.where(table["p_ensemble"] >= threshold, "Atypical", "Normal")
    table["threshold"] = threshold
    atomic_write_csv(out, table)
    return out, table
