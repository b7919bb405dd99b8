"""Apply a finished run's 5 fold models (and their ensemble) to new patches, or to the mitotic figures at given
points of whole-slide images.

Patches: a folder of ``Atypical``/``Normal`` sub-folders (labels known: metrics are printed), any other folder of
images (searched recursively), or a CSV with a ``path`` column (and optionally ``label``). Slides: one slide file,
or a folder of them, with the figures' points (``data/slides.py`` reads and crops them).
Output: a new CSV (never overwriting) with each fold model's probability, the ensemble probability and the
predicted class at the run's threshold; for slides also GeoJSON for QuPath.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mitobench.data.cache import PatchCache
from mitobench.data.records import IMAGE_SUFFIXES, load_custom, parse_label, read_csv
from mitobench.data.slides import SLIDE_SUFFIXES
from mitobench.errors import MitobenchError
from mitobench.io import atomic_write, atomic_write_csv
from mitobench.runs import load_run_config, require_complete_run


def _blank(value: object) -> bool:
    return pd.isna(value) or not str(value).strip()


def _records(source: Path) -> pd.DataFrame:
    if source.is_dir():
        subdirs = {p.name.lower() for p in source.iterdir() if p.is_dir()}
        if {"atypical", "normal"} <= subdirs:
            return load_custom(source)
        paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            slides = any(p.suffix.lower() in SLIDE_SUFFIXES for p in source.rglob("*"))
            hint = "; for whole-slide images give the figures' points with --points" if slides else ""
            raise MitobenchError(f"{source}: no images found ({sorted(IMAGE_SUFFIXES)}){hint}.")
        return pd.DataFrame({"image": [str(p.relative_to(source)) for p in paths], "path": [str(p.resolve()) for p in paths],
                             "label": np.nan})
    if source.is_file():
        if source.suffix.lower() in SLIDE_SUFFIXES:
            raise MitobenchError(f"{source}: a whole-slide image; give the mitotic figures to classify on it with "
                                 "--points (a CSV x, y or a GeoJSON).")
        table = read_csv(source, ["path"])
        paths = [Path(p) if Path(p).is_absolute() else source.parent / p for p in table["path"].astype(str)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MitobenchError(f"{source}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}.")
        resolved = pd.Series([str(p.resolve()) for p in paths])
        if resolved.duplicated().any():  # scored twice, it would count twice in the metrics
            row = int(np.flatnonzero(resolved.duplicated())[0])
            raise MitobenchError(f"{source} row {row + 2}: {table['path'].iloc[row]} is listed twice; list each image "
                                 "once.")
        labels = ([parse_label(v, f"{source} row {i + 2}") if not _blank(v) else np.nan  # blank: unknown
                   for i, v in enumerate(table["label"])] if "label" in table else np.nan)
        return pd.DataFrame({"image": table["path"].astype(str), "path": resolved.tolist(), "label": labels})
    raise MitobenchError(f"{source}: no such folder or CSV.")


class FoldPredictor:
    """Rebuilds the run's model for one fold from its saved checkpoint."""

    def __init__(self, run_dir: Path, device: torch.device):
        self.run_dir = run_dir
        self.config = load_run_config(run_dir)
        self.device = device
        if device.type == "cpu":
            from mitobench.methods.cpu_memory import keep_freed_memory

            keep_freed_memory()  # 1.6-1.7x the images/s of a 16-view fine-tuned Lite0 here (methods/cpu_memory.py)
        from mitobench.models.registry import create_backbone

        self.backbone = create_backbone(self.config.model, self.config.weights,
                                        allow_download=self.config.allow_download).to(device)

    def checkpoint(self, fold: int) -> Path:
        """The file holding this fold's trained model (probe, fine-tuned model, or LoRA adapter and head)."""
        name = {"probe": "probe.safetensors", "finetune": "model.safetensors"}.get(self.config.method,
                                                                                 "adapter_and_head.safetensors")
        return self.run_dir / "folds" / f"fold_{fold}" / name

    def _damaged(self, path: Path, why: str) -> MitobenchError:
        return MitobenchError(f"{path} {why}: the run folder is damaged or does not match its config.yaml "
                              f"({self.config.model}, {self.config.method}). Restore the run folder, or train a "
                              "new one with `mitobench run`.")

    def probabilities(self, fold: int, patches: np.ndarray, batch_size: int) -> np.ndarray:
        if self.config.method == "probe":
            from mitobench.embed import extract, shutdown_workers
            from mitobench.device import cpu_workers

            if not hasattr(self, "_feats"):
                from mitobench.device import pick_dtype

                dtype = pick_dtype(self.config.dtype, self.device, self.backbone.card.dtype)  # as the run embedded
                try:  # on CPU: the frozen graph in one single-threaded worker per core, batch size chosen for it
                    self._feats = extract(self.backbone, patches, None if self.device.type == "cpu" else batch_size,
                                          self.device, dtype, name="embed", workers=cpu_workers(self.config.embed_workers))
                finally:
                    shutdown_workers()
            w, b = self._probe(fold, self._feats.shape[1])
            return 1 / (1 + np.exp(-(self._feats.astype(np.float64) @ w + b)))
        return self._trained(fold, patches, batch_size)

    def _probe(self, fold: int, dim: int) -> tuple[np.ndarray, float]:
        """The fold's linear probe, checked: readable, one weight per embedding dimension, all finite."""
        from mitobench.methods.probe import load_linear

        path = self._checked(self.checkpoint(fold))
        try:
            w, b = load_linear(path)
            w = np.asarray(w, dtype=np.float64)
        except Exception as exc:  # safetensors, KeyError, IndexError, ...: any unreadable probe
            raise self._damaged(path, f"is not a readable probe checkpoint ({type(exc).__name__}: {exc})") from exc
        if w.shape != (dim,):
            raise self._damaged(path, f"holds a weight of shape {w.shape}, but {self.config.model} gives "
                                      f"embeddings of length {dim} (the checkpoint does not fit the model)")
        if not (np.isfinite(w).all() and np.isfinite(b)):
            raise self._damaged(path, "holds NaN or infinite weights")
        return w, b

    def _checked(self, path: Path) -> Path:
        if not path.is_file():
            raise MitobenchError(f"{path} is missing: this run folder has no saved model for that fold.")
        return path

    def _trained(self, fold: int, patches: np.ndarray, batch_size: int) -> np.ndarray:
        import copy

        from safetensors.torch import load_file

        from mitobench.methods.engine import Classifier, TrainMethod, _method_module

        from mitobench.methods.engine import match_input_size

        backbone = copy.deepcopy(self.backbone)
        match_input_size(backbone, self.config.train.img_size)
        model = Classifier(backbone)
        model = _method_module(self.config.method).prepare(model, self.config)
        path = self._checked(self.checkpoint(fold))
        try:
            state = load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError: truncated, empty or not a safetensors file
            raise self._damaged(path, f"is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
        self._check_keys(path, model.state_dict(), state, strict=self.config.method == "finetune")
        try:
            model.load_state_dict(state, strict=self.config.method == "finetune")
        except RuntimeError as exc:  # torch's message lists every key: keep the first line
            raise self._damaged(path, f"does not fit {self.config.model} ({str(exc).splitlines()[0][:200]})") from exc
        method = TrainMethod(self.config)
        method.device = self.device
        images = torch.from_numpy(np.array(patches))
        return method.predict(model.to(self.device), images, self.config.train.tta, batch_size)

    def _check_keys(self, path: Path, expected: dict, state: dict, strict: bool) -> None:
        """A short message naming a few keys, instead of torch's list of hundreds, when a checkpoint is another
        model's. ``strict`` (fine-tuning saves the whole model): every key of the model must be there."""
        unexpected = [k for k in state if k not in expected]
        missing = [k for k in expected if k not in state] if strict else []
        reshaped = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
        problems = [f"{len(keys)} {what} key(s), e.g. {keys[:3]}"
                    for what, keys in (("unexpected", unexpected), ("missing", missing), ("wrongly shaped", reshaped))
                    if keys]
        if problems:
            raise self._damaged(path, f"does not fit {self.config.model}: " + "; ".join(problems))


def _read_json(path: Path) -> dict:
    """A run folder's JSON file, or one clear error saying the folder is damaged."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MitobenchError(f"{path}: cannot read it ({exc}); the run folder is damaged. Restore it, or train a "
                             "new run with `mitobench run`.") from exc
    if not isinstance(value, dict):
        raise MitobenchError(f"{path}: not a JSON object; the run folder is damaged.")
    return value


def _thresholds(run_dir: Path, info: dict, status: dict, n_folds: int) -> list[float]:
    """Each fold's threshold from ``fold_info.json`` (``info``); ``status``: the run's status.json."""
    path = run_dir / "fold_info.json"
    failed = sorted(f for f in range(1, n_folds + 1) if str(f) not in info)
    if failed and status.get("failed_folds"):
        raise MitobenchError(f"{run_dir}: fold(s) {failed} failed in training, so the run has no {n_folds}-fold ensemble "
                             f"to apply. Retry them with `mitobench run --resume {run_dir}` first.")
    try:
        thresholds = [float(info[str(f)]["threshold"]) for f in range(1, n_folds + 1)]
    except (KeyError, TypeError, ValueError) as exc:
        raise MitobenchError(f"{path}: no usable threshold for every fold 1-{n_folds} ({type(exc).__name__}: {exc}); "
                             "the run folder is damaged or does not match its config.yaml.") from exc
    if not np.isfinite(thresholds).all():
        raise MitobenchError(f"{path}: a fold's threshold is not finite ({thresholds}); the run folder is damaged.")
    return thresholds


def _check_backbone(run_dir: Path, info: dict, config, weights_id: str) -> None:
    """A probe or LoRA fold model only fits the frozen backbone it was trained on: refuse another (other weights
    found now) or a random-init one (its draw cannot be rebuilt). Runs from before this record are not checked."""
    if config.method == "finetune":  # the checkpoint holds every weight
        return
    from mitobench.models.cards import RANDOM_INIT

    used = {fold.get("backbone_weights") for fold in info.values() if isinstance(fold, dict)} - {None}
    if RANDOM_INIT in used:
        raise MitobenchError(f"{run_dir}: this {config.method} run's backbone ({config.model}) was random init; its fold "
                             "models only fit the weights drawn then, which cannot be rebuilt. Train with pretrained "
                             "weights (--weights) to get a run that predict can apply.")
    if used and used != {weights_id}:
        raise MitobenchError(f"{run_dir}: the run's {config.method} models were trained on a backbone with weights "
                             f"{', '.join(sorted(used))}, but the backbone built now ({config.model}, config.yaml) has "
                             f"{weights_id}. Make the run's weights ({config.weights or 'the default resolution'}) "
                             "available again, and leave config.yaml as the run wrote it.")


def _check_folder(out: Path) -> None:
    """Fail before any work when ``out`` cannot be created: its nearest existing ancestor is a file."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MitobenchError(f"{out}: cannot create it: {parent} is a file, not a folder. Choose another --out.")


def _write_new(out: Path, table: pd.DataFrame, explicit: bool) -> Path:
    """Create the output CSV exclusively, so two predicts at once never replace each other's file: an explicit
    --out that exists by now is an error; the default name takes the next free ``-1``, ``-2``, ... suffix."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MitobenchError(f"{out}: cannot create its folder {out.parent} ({exc}). Choose another --out.") from exc
    for path in _candidates(out, explicit):
        try:
            return atomic_write_csv(path, table, exclusive=True)
        except FileExistsError:
            if explicit:
                raise MitobenchError(f"{out} exists; mitobench never overwrites results. Choose another --out.")
        except OSError as exc:
            raise MitobenchError(f"{path}: cannot write the predictions ({exc}). Choose another --out.") from exc
    raise MitobenchError(f"cannot find a free name for {out} in {out.parent}; choose an --out.")


def _candidates(out: Path, explicit: bool):
    """The names a new result may take: ``out``, then for a default name ``<stem>-1``, ``<stem>-2``, ..."""
    yield out
    if not explicit:
        for i in range(1, 1000):
            yield out.with_name(f"{out.stem}-{i}{out.suffix}")


def _open_run(run_dir: Path):
    """``(config, fold_info, thresholds)`` of a complete run folder, or one clear error."""
    require_complete_run(run_dir)
    status = _read_json(run_dir / "status.json")
    config = load_run_config(run_dir)
    fold_info = _read_json(run_dir / "fold_info.json")
    return config, fold_info, _thresholds(run_dir, fold_info, status, config.n_folds)


def _output_path(out: str | Path | None, run_dir: Path, default_name: str) -> tuple[Path, bool]:
    """``(path, explicit)``: ``out`` as given, our name inside ``out`` when it is a folder, or the run's
    ``predictions/`` folder; refused at once when an explicit file exists or cannot be created."""
    if out is not None and (str(out).endswith(("/", os.sep)) or Path(out).is_dir()):  # a folder: our name inside it
        out, explicit = Path(out) / default_name, False
    else:
        explicit = out is not None
        out = Path(out) if out else run_dir / "predictions" / default_name
    if out.suffix.lower() != ".csv":
        raise MitobenchError(f"--out {out}: name a .csv file (a slide's GeoJSON, summary and crops take its stem) or "
                             "a folder ending in /.")
    if explicit and (out.exists() or out.is_symlink()):
        raise MitobenchError(f"{out} exists; mitobench never overwrites results. Choose another --out.")
    _check_folder(out)
    return out, explicit


def _score(run_dir: Path, config, fold_info: dict, thresholds: list[float], patches: np.ndarray, table: pd.DataFrame,
           batch_size: int, device: str) -> pd.DataFrame:
    """``table`` with each fold model's probability, the ensemble's, the predicted class and the threshold."""
    from mitobench.device import pick_device

    predictor = FoldPredictor(run_dir, pick_device(device))
    _check_backbone(run_dir, fold_info, config, predictor.backbone.weights_id)
    table = table.copy()
    for fold in range(1, config.n_folds + 1):
        p = np.asarray(predictor.probabilities(fold, patches, batch_size), dtype=np.float64)
        why = ("non-finite" if p.shape == (len(table),) else f"{p.shape}-shaped (not {len(table)})")
        if p.shape != (len(table),) or not np.isfinite(p).all():  # never an ensemble silently over fewer folds
            raise MitobenchError(f"fold {fold} ({predictor.checkpoint(fold)}) gives {why} probabilities; "
                                 "the run folder is damaged. Nothing was written.")
        calibration = fold_info.get(str(fold), {}).get("calibration")
        if calibration:  # as the run scored its hold-out sets (evaluation/calibration.py)
            from mitobench.evaluation.calibration import apply_platt

            p = apply_platt(p, calibration)
        table[f"p_fold{fold}"] = p
    table["p_ensemble"] = table[[f"p_fold{f}" for f in range(1, config.n_folds + 1)]].mean(axis=1)
    threshold = float(np.mean(thresholds))
    table["predicted"] = np.where(table["p_ensemble"] >= threshold, "Atypical", "Normal")
    table["threshold"] = threshold
    return table


def predict(run_dir: str | Path, source: str | Path, out: str | Path | None = None, batch_size: int = 64,
            device: str = "auto", cache_dir: str | None = None) -> tuple[Path, pd.DataFrame]:
    """Predict ``source`` with every fold model of ``run_dir``; write a new CSV, refuse anything doubtful."""
    from mitobench.protocol import default_cache_dir

    run_dir, source = Path(run_dir), Path(source).expanduser().resolve()
    config, fold_info, thresholds = _open_run(run_dir)
    out, explicit = _output_path(out, run_dir, f"{source.stem}-{datetime.now():%Y%m%d-%H%M%S}.csv")
    records = _records(source)
    if cache_dir:
        config.cache_dir = cache_dir
    patches, _ = PatchCache(default_cache_dir(config), config.patch_size).load(records, source.name, verify=True)
    table = _score(run_dir, config, fold_info, thresholds, patches, records[["image", "path", "label"]], batch_size,
                   device)
    return _write_new(out, table, explicit), table


QUPATH_COLOURS = {"Atypical": [220, 40, 40], "Normal": [40, 160, 60]}


def slide_geojson(table: pd.DataFrame) -> dict:
    """The predictions as a GeoJSON FeatureCollection of points that QuPath imports (class and probabilities)."""
    folds = [c for c in table.columns if c.startswith("p_fold")]
    features = [{"type": "Feature", "id": str(row.id),
                 "geometry": {"type": "Point", "coordinates": [float(row.x), float(row.y)]},
                 "properties": {"objectType": "annotation", "name": str(row.id),
                                "classification": {"name": row.predicted, "color": QUPATH_COLOURS[row.predicted]},
                                "measurements": {"p_atypical": float(row.p_ensemble),
                                                 **{c: float(getattr(row, c)) for c in folds}}}}
                for row in table.itertuples(index=False)]
    return {"type": "FeatureCollection", "features": features}


def predict_slide(run_dir: str | Path, source: str | Path, points: str | Path, out: str | Path | None = None,
                  batch_size: int = 64, device: str = "auto", slide_mpp: float | None = None,
                  target_mpp: float | None = None, save_patches: bool = False) -> tuple[Path, pd.DataFrame]:
    """Classify the mitotic figures at ``points`` of a whole-slide image ``source`` with every fold model of
    ``run_dir``; ``source`` may also be a folder of slides (a cohort), with a points CSV whose ``slide`` column
    names each point's.

    Writes a new CSV (``[slide,] id, x, y, label, edge_padded, slide_mpp, crop_mpp``, each fold's probability, the
    ensemble's, the class) and the companions ``slide_outputs`` names: GeoJSON for QuPath, for a cohort a summary
    per slide and, with ``save_patches``, each crop as a PNG, to review what the models saw. The CSV is written
    last: it is there only when everything is."""
    from mitobench.data.slides import TRAINING_MPP, crop_mpp, crop_patches, open_slide, read_points
    from mitobench.data.slides import slide_mpp as read_mpp

    run_dir, given = Path(run_dir), Path(source).expanduser()
    source = given.resolve()
    cohort = source.is_dir()
    target_mpp = TRAINING_MPP if target_mpp is None else target_mpp
    config, fold_info, thresholds = _open_run(run_dir)
    out, explicit = _output_path(out, run_dir, f"{source.stem}-{datetime.now():%Y%m%d-%H%M%S}.csv")
    taken = [p for p in slide_outputs(out, cohort, save_patches).values() if p.exists()]
    if explicit and taken:
        raise MitobenchError(f"{taken[0]} exists; mitobench never overwrites results. Choose another --out.")
    table = read_points(points)
    slides = _slides_of(given, table, Path(points))
    size = config.patch_size
    patches = np.empty((len(table), size, size, 3), dtype=np.uint8)
    columns = {"edge_padded": np.zeros(len(table), dtype=bool), "slide_mpp": np.zeros(len(table)),
               "crop_mpp": np.zeros(len(table))}
    for path, rows in slides.items():
        handle = open_slide(path)
        try:
            mpp = read_mpp(handle, path, slide_mpp)
            patches[rows], columns["edge_padded"][rows] = crop_patches(handle, table.iloc[rows], mpp, path, size,
                                                                       target_mpp)
        finally:
            handle.close()
        columns["slide_mpp"][rows], columns["crop_mpp"][rows] = mpp, crop_mpp(mpp, target_mpp)
    table = _score(run_dir, config, fold_info, thresholds, patches, table.assign(**columns), batch_size, device)
    for path in _candidates(out, explicit):  # a default name takes the next stem free for the CSV and companions
        if not any(p.exists() for p in [path, *slide_outputs(path, cohort, save_patches).values()]):
            return _write_slide_results(path, table, patches if save_patches else None, cohort), table
        if explicit:
            raise MitobenchError(f"{path} or its GeoJSON or patches appeared meanwhile; mitobench never overwrites "
                                 "results. Choose another --out.")
    raise MitobenchError(f"cannot find a free name for {out} in {out.parent}; choose an --out.")


def slide_outputs(csv: Path, cohort: bool, save_patches: bool) -> dict[str, Path]:
    """What a slide prediction writes beside its CSV: ``geojson`` (a file; for a cohort a folder of one per slide),
    for a cohort ``summary`` (a CSV of one row per slide) and, with ``save_patches``, ``patches`` (a folder)."""
    outputs = {"geojson": csv.with_name(f"{csv.stem}-geojson") if cohort else csv.with_suffix(".geojson")}
    if cohort:
        outputs["summary"] = csv.with_name(f"{csv.stem}-summary.csv")
    if save_patches:
        outputs["patches"] = csv.with_name(f"{csv.stem}-patches")
    return outputs


def slide_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per slide: its figures, how many the ensemble calls atypical and their fraction (the atypical
    mitosis proportion, at the run's threshold), and the expected number of atypical ones (the sum of the
    ensemble's probabilities, free of the threshold)."""
    slides = table["slide"] if "slide" in table else pd.Series("", index=table.index)
    atypical = table["predicted"] == "Atypical"
    summary = pd.DataFrame({"slide": slides, "atypical": atypical, "p": table["p_ensemble"]}).groupby(
        "slide", sort=False).agg(figures=("p", "size"), predicted_atypical=("atypical", "sum"),
                                 expected_atypical=("p", "sum"))
    summary["atypical_fraction"] = summary["predicted_atypical"] / summary["figures"]
    return summary.reset_index()[["slide", "figures", "predicted_atypical", "atypical_fraction", "expected_atypical"]]


def _slides_of(given: Path, table: pd.DataFrame, points: Path) -> dict[Path, np.ndarray]:
    """Each slide file and the rows of ``table`` on it: the slide ``given`` itself, or, when ``given`` is a folder,
    the files its ``slide`` column names in it (one name per file)."""
    source = given.resolve()
    if not source.is_dir():
        if "slide" in table:  # a cohort's CSV cut to this slide: its rows may name it by path, name or stem
            known = {given.name, source.name, given.stem, source.stem}
            other = table["slide"][[Path(v).name not in known and v not in known for v in table["slide"]]]
            if len(other) or table["slide"].nunique() > 1:
                example = other.iloc[0] if len(other) else sorted(table["slide"].unique())[1]
                raise MitobenchError(f"{points}: points on other slides than {given.name}, or this slide named in "
                                     f"several ways (e.g. {example!r}); give the folder of the slides as SOURCE to "
                                     "classify them all, or list only this slide's points under one name.")
        return {source: np.arange(len(table))}
    if "slide" not in table:
        raise MitobenchError(f"{given} is a folder: give a points CSV with a slide column naming each point's slide "
                             "file in it, or give one slide file as SOURCE.")
    slides: dict[Path, np.ndarray] = {}
    names: dict[Path, str] = {}
    for name, rows in table.groupby("slide", sort=False).indices.items():
        path = (Path(name) if Path(name).is_absolute() else source / name).resolve()
        if not path.is_file():
            raise MitobenchError(f"{points}: slide {name!r} (row {int(rows[0]) + 2}) is not a file in {given}; "
                                 f"{len(rows)} point(s) are on it. Name each slide file as it is in the folder.")
        if path in names:
            raise MitobenchError(f"{points}: slide {path.name} is named two ways ({names[path]!r} and {name!r}); "
                                 "name each slide one way.")
        slides[path], names[path] = rows, name
    basenames = pd.Series([p.name for p in slides])
    if basenames.duplicated().any():  # their GeoJSON files would take the same name
        raise MitobenchError(f"{points}: two slides named {basenames[basenames.duplicated()].iloc[0]!r} in different "
                             "folders; give each slide a file name of its own.")
    return slides


def _write_slide_results(path: Path, table: pd.DataFrame, patches: np.ndarray | None, cohort: bool) -> Path:
    """The GeoJSON (one file, or for a cohort one per slide in a new folder), the patches (if given), then the
    CSV, each created exclusively. What fails or is interrupted before the CSV is written is removed again."""
    outputs = slide_outputs(path, cohort, patches is not None)
    geojson = outputs["geojson"]
    made: list[Path] = []

    def write_json(target: Path, rows: pd.DataFrame) -> None:
        atomic_write(target, lambda tmp: tmp.write_text(json.dumps(slide_geojson(rows)), encoding="utf-8"),
                     exclusive=True)

    try:
        if cohort:
            geojson.mkdir(parents=True)
            made.append(geojson)
            for name, rows in table.groupby("slide", sort=False):
                write_json(geojson / f"{Path(name).name}.geojson", rows)
        else:
            write_json(geojson, table)  # FileExistsError: another's file, never removed
            made.append(geojson)
        if "summary" in outputs:
            atomic_write_csv(outputs["summary"], slide_summary(table), exclusive=True)
            made.append(outputs["summary"])
        if "patches" in outputs:
            folder = outputs["patches"]
            folder.mkdir(parents=True)
            made.append(folder)
            names = (table["slide"].map(lambda v: Path(v).stem) + "-" if cohort else "") + table["id"].astype(str)
            for i, (name, patch, predicted) in enumerate(zip(names, patches, table["predicted"])):
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
                Image.fromarray(patch).save(folder / f"{i + 1:05d}-{safe}-{predicted}.png", "PNG")
        atomic_write_csv(path, table, exclusive=True)
        return path
    except BaseException as exc:  # KeyboardInterrupt (SIGTERM too) included: no companions without their CSV
        for made_path in made:
            if made_path.is_dir():
                shutil.rmtree(made_path, ignore_errors=True)
            else:
                made_path.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError):
            raise MitobenchError(f"{exc.filename or path}: appeared while the results were written; mitobench never "
                                 "overwrites results. Nothing was kept; run again.") from exc
        if isinstance(exc, OSError):
            raise MitobenchError(f"{path.parent}: cannot write the slide's results ({exc}); nothing was kept. "
                                 "Choose another --out.") from exc
        raise
