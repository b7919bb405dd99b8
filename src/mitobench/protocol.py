"""The paper's protocol end to end: data -> folds -> method per fold -> every hold-out set -> report.

Every method (probe, fine-tune, LoRA) plugs in through ``Method.fit_predict``; this module owns the
folds, the run folder, resume, thresholds, the ensemble and the metrics, so all methods are
evaluated identically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape

from mitobench.config import RunConfig, save_config
from mitobench.data.cache import PatchCache
from mitobench.data.records import HOLDOUT_SETS, discover, evaluation_sets, load_custom, resolve_data_root
from mitobench.errors import FoldFailedError, MitobenchError
from mitobench.evaluation.agreement import (agreement_metrics, calls_by_votes, rater_agreement,
                                            render_agreement_report, votes_of_sets)
from mitobench.evaluation.report import VALIDATION, domain_metrics, render_domain_report, render_report, tidy_metrics
from mitobench.io import atomic_write_csv, atomic_write_json, atomic_write_text
from mitobench.runs import (RunDir, complete_environment, environment, load_run_config, new_run_dir,
                            require_run_dir)
from mitobench.splits import paper_folds

log = logging.getLogger(__name__)


def default_cache_dir(config: RunConfig) -> Path:
    from platformdirs import user_cache_dir

    return Path(config.cache_dir or os.environ.get("MITOBENCH_CACHE") or user_cache_dir("mitobench"))


@dataclass
class Context:
    """What a method sees: the records, decoded patches and folds of this run."""

    config: RunConfig
    sets: dict[str, pd.DataFrame]  # AMi-Br-train plus every hold-out set present
    patches: dict[str, np.ndarray]
    patch_keys: dict[str, str]
    folds: np.ndarray
    cache_dir: Path
    holdouts: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class FoldResult:
    probs: dict[str, np.ndarray]  # "validation" and every hold-out set
    info: dict


class Method(Protocol):
    name: str
    pretrained: bool

    def prepare(self, ctx: Context) -> None: ...

    def fit_predict(self, fold: int, train_idx: np.ndarray, val_idx: np.ndarray, ctx: Context,
                    scratch: Path) -> FoldResult: ...


def make_method(config: RunConfig) -> Method:
    if config.method == "probe":
        from mitobench.methods.probe import ProbeMethod

        return ProbeMethod(config)
    from mitobench.methods.engine import TrainMethod

    return TrainMethod(config)


def best_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """Threshold maximising balanced accuracy (Youden's J) on the validation fold."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(labels, probs)
    j = tpr - fpr
    return float(np.clip(thr[int(np.argmax(j))], 0.0, 1.0))


def load_user_sets(sources, taken: set[str]) -> dict[str, pd.DataFrame]:
    """Each ``--dataset`` source by its name; a name already ``taken`` by a built-in set, or used twice, would
    replace that set silently: refused."""
    out: dict[str, pd.DataFrame] = {}
    for source in sources:
        frame = load_custom(source)
        name = frame["dataset"].iloc[0]
        if name in out or name in taken:
            what = "a built-in set" if name in taken else "another --dataset"
            raise MitobenchError(f"--dataset {source}: its name {name!r} is already taken by {what}; a set is named "
                                 f"after its folder or CSV file, so rename it (e.g. my-{name}) to evaluate it too.")
        out[name] = frame
    return out


def load_sets(config: RunConfig) -> tuple[dict[str, pd.DataFrame], list[str]]:
    root = resolve_data_root(config.data_root)
    sets = evaluation_sets(discover(root))
    sets.update(load_user_sets(config.datasets, taken=set(sets) | set(HOLDOUT_SETS)))
    if "AMi-Br-train" not in sets:
        raise MitobenchError(f"data root {root} has no AMi-Br training split; training needs AMi-Br/, "
                             "amibr_train_split.csv and AMI-BR.csv (run `mitobench data fetch`).")
    if config.dedup:
        from mitobench.data.check import deduplicate

        for name in [n for n in sets if n != "AMi-Br-train"]:
            dedup = deduplicate(sets[name])
            if len(dedup) != len(sets[name]):
                sets[f"{name} (dedup)"] = dedup.reset_index(drop=True)
    absent = [h for h in HOLDOUT_SETS if h not in sets]
    return sets, absent


def refuse_leaked_datasets(config: RunConfig, sets: dict[str, pd.DataFrame]) -> None:
    """A ``--dataset`` set holding a copy of an AMi-Br training image (same bytes or re-encoded) would score the
    model on what it trained on: refused before any run folder exists. Decodes through the patch cache, so the
    run reuses what this reads."""
    from mitobench.data.check import leaked_copies

    names = [n for n in sets if n != "AMi-Br-train" and n not in HOLDOUT_SETS and not n.endswith(" (dedup)")]
    if not names:
        return
    cache = PatchCache(default_cache_dir(config), config.patch_size)
    train = sets["AMi-Br-train"]
    train_patches, _ = cache.load(train, "AMi-Br-train")
    for name in names:
        patches, _ = cache.load(sets[name], name)
        pairs = leaked_copies(train_patches, patches)
        if pairs:
            shown = "; ".join(f"{sets[name]['path'].iloc[j]} = AMi-Br-train:{train['image'].iloc[i]}"
                              for i, j in pairs[:5])
            more = f"; and {len(pairs) - 5} more" if len(pairs) > 5 else ""
            raise MitobenchError(f"--dataset {name}: {len(pairs)} image(s) are copies of AMi-Br training images "
                                 f"(identical pixels): {shown}{more}. Scores on them would be leaky: remove them "
                                 f"from the set (`mitobench data check --dataset PATH` lists every one).")


def build_context(config: RunConfig, sets: dict[str, pd.DataFrame], folds: np.ndarray) -> Context:
    """The decoded patches of every set (from the patch cache) and the folds: what a method sees."""
    t0 = time.perf_counter()
    cache = PatchCache(default_cache_dir(config), config.patch_size)
    patches, keys = {}, {}
    # training reads every pixel anyway, so a same-size corruption of the cached arrays is worth a digest check
    # (under a second); a warm probe run never reads the pixels and stays as fast as it is
    verify = config.method != "probe"
    for name, frame in sets.items():
        patches[name], keys[name] = cache.load(frame, name, verify=verify)
    holdouts = [n for n in sets if n != "AMi-Br-train"]
    ctx = Context(config, sets, patches, keys, folds, default_cache_dir(config), holdouts)
    ctx.timings["decode_s"] = time.perf_counter() - t0
    return ctx


def _calibrate(result: FoldResult, val_labels: np.ndarray, fold: int) -> None:
    """Platt-map the fold's probabilities and threshold (fitted on its validation fold): monotone, the threshold
    mapped alike, so the fold model's decisions stay; the map goes into fold_info.json for ``predict``."""
    from mitobench.evaluation.calibration import calibrate_fold

    try:
        result.probs, threshold, params = calibrate_fold(result.probs, val_labels, result.info["threshold"])
    except MitobenchError as exc:
        raise FoldFailedError(f"fold {fold}: {exc}") from exc
    result.info["calibration"] = {"method": "platt", **params, "threshold_before": result.info["threshold"]}
    result.info["threshold"] = threshold


def fit_fold(method: Method, ctx: Context, run: RunDir, fold: int, console: Console) -> tuple[FoldResult | None, str]:
    """Train and predict one fold and save it in the run folder; a failed fold (e.g. a NaN loss) is saved as
    failed, said so, and returned as ``(None, why)`` so the other folds go on."""
    config, folds = ctx.config, ctx.folds
    val_idx, train_idx = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
    t_fold = time.perf_counter()
    try:
        result = method.fit_predict(fold, train_idx, val_idx, ctx, run.scratch(fold))
        broken = [name for name, p in result.probs.items() if not np.isfinite(p).all()]
        if broken:
            raise FoldFailedError(f"fold {fold}: the fold model predicted non-finite probabilities (NaN or inf) on "
                                  f"{', '.join(broken)}; this fold was stopped, the other folds go on. Lower the "
                                  "learning rate (train.lr) or train in float32 (train.precision=fp32).")
        val_labels = ctx.sets["AMi-Br-train"]["label"].to_numpy()[val_idx]
        result.info["threshold"] = (best_threshold(val_labels, result.probs["validation"])
                                    if config.threshold == "validation" else 0.5)
        if config.calibration == "platt":
            _calibrate(result, val_labels, fold)
    except FoldFailedError as exc:
        console.print(f"[bold red]fold {fold} FAILED:[/] {escape(str(exc))}")
        run.save_fold(fold, {}, {"failed": str(exc)})
        (run.scratch(fold) / "last.pt").unlink(missing_ok=True)  # a resume retries it from scratch
        return None, str(exc)
    result.info["seconds"] = time.perf_counter() - t_fold
    result.info["sets"] = fold_set_signatures(ctx.sets, ctx.folds, fold)
    run.save_fold(fold, result.probs, result.info)
    run.drop_checkpoints(fold)
    if result.info.get("fitted_in_parallel"):  # the folds' fits ran at once in worker processes
        console.print(f"fold {fold}/{config.n_folds} done (fitted in {result.info['fit_seconds']:.1f}s in a worker "
                      "process, alongside the other folds)")
    else:
        console.print(f"fold {fold}/{config.n_folds} done in {result.info['seconds']:.1f}s")
    return result, ""


def set_signature(frame: pd.DataFrame) -> str:
    """Which figures, in which order, with which labels: a saved fold's probabilities are rows of exactly these."""
    text = "\n".join(f"{image}\t{label}" for image, label in zip(frame["image"], frame["label"]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fold_set_signatures(sets: dict[str, pd.DataFrame], folds: np.ndarray, fold: int) -> dict[str, str]:
    """The signature of every set a fold model predicts: its validation fold and each hold-out set."""
    signatures = {"validation": set_signature(sets["AMi-Br-train"].iloc[np.flatnonzero(folds == fold)])}
    signatures.update({name: set_signature(frame) for name, frame in sets.items() if name != "AMi-Br-train"})
    return signatures


def check_saved_folds(run_path: Path, finished: dict[int, tuple[dict, dict]], sets: dict[str, pd.DataFrame],
                      folds: np.ndarray) -> None:
    """Refuse to resume a run whose finished folds predicted other sets than those found now (a hold-out set
    fetched or removed since, a ``--dataset`` folder changed, another data root): their models are not kept, so
    they cannot be re-scored, and mixing them with new folds would pair probabilities with the wrong figures.
    Runs saved before fold signatures existed are checked on set names and sizes."""
    for fold, (probs, info) in finished.items():
        if "sets" in info:
            then, now = info["sets"], fold_set_signatures(sets, folds, fold)
        else:
            then = {name: len(p) for name, p in probs.items() if name != "validation_by_epoch"}
            now = {"validation": int(np.sum(folds == fold)),
                   **{name: len(frame) for name, frame in sets.items() if name != "AMi-Br-train"}}
        if then == now:
            continue
        gone = sorted(set(then) - set(now))
        new = sorted(set(now) - set(then))
        changed = sorted(n for n in set(then) & set(now) if then[n] != now[n])
        what = "; ".join(part for part in (
            f"gone now: {', '.join(gone)}" if gone else "", f"new now: {', '.join(new)}" if new else "",
            f"different figures or labels now: {', '.join(changed)}" if changed else "") if part)
        raise MitobenchError(
            f"{run_path}: fold {fold} finished on other data than is found now ({what}). Its model is not kept, so "
            "it cannot be re-scored: resume with --data-root (and --dataset folders) as they were when the run "
            "started, or start a new run.")


def check_saved_backbone(run_path: Path, finished: dict[int, tuple[dict, dict]], config: RunConfig) -> None:
    """Refuse to resume when the finished folds trained on other backbone weights than the model builds with now
    (``--weights`` file replaced, ``MITOBENCH_WEIGHTS`` or the HF cache changed, weights gone: random init): the
    remaining folds would train from other weights, and the run would report one recipe that is two."""
    from mitobench.models.cards import backbone_identity

    used = {fold: info["backbone_weights"] for fold, (_, info) in finished.items() if info.get("backbone_weights")}
    if not used:
        return
    now = backbone_identity(config.model, config.weights)
    if now is None:  # not knowable without a build (weights to download): the fold's own checkpoint check remains
        return
    other = {fold: weights for fold, weights in used.items() if weights != now}
    if other:
        folds = ", ".join(str(f) for f in other)
        raise MitobenchError(
            f"{run_path}: fold(s) {folds} trained on backbone weights {sorted(set(other.values()))[0]!r}, but "
            f"{config.model} now builds with {now!r} (weights found, moved or changed since: --weights, "
            "MITOBENCH_WEIGHTS, the Hugging Face cache). The remaining folds would train from other weights. Restore "
            "the weights the run started with, or start a new run.")


def pin_precision(config: RunConfig, card_dtype: str) -> None:
    """Resolve the device-dependent precisions (``train.precision`` auto/native, the probe's embedding ``dtype``
    auto) for the device this run starts on; saved so in ``config.yaml``, a resume on another machine trains on in
    the run's precision and ``mitobench predict`` embeds and predicts as the run did."""
    from mitobench.device import device_type, dtype_name, pick_device

    if config.method == "probe":  # without importing torch: a warm probe run never does
        config.dtype = dtype_name(config.dtype, device_type(config.device), card_dtype)
        return
    from mitobench.methods.precision import resolve_precision

    device = pick_device(config.device)
    if config.train.precision == "auto":
        config.train.precision = "bf16" if device.type == "cuda" else "fp32"
    else:
        config.train.precision = resolve_precision(config.train.precision, device)


def recipe(config: RunConfig) -> str:
    """How the fold models were made, in a few words for the report's title: the probe's head, or for finetune/LoRA
    the preset, precision, input size, epochs and TTA."""
    extra = f", train seed {config.train_seed}" if config.seed_repeat else ""
    extra += ", Platt-calibrated on each validation fold, thresholds mapped alike" if config.calibration == "platt" else ""
    if config.method == "probe":
        return ("logistic head, C by inner CV" if config.probe.head == "logistic" else "torch head (the paper's)") + extra
    from mitobench.device import pick_device
    from mitobench.methods.precision import autocast_dtype

    train = config.train
    dtype = autocast_dtype(train.precision, pick_device(config.device))
    parts = [f"preset {train.preset}"] if train.preset else []
    parts += ["bf16" if dtype is not None else "float32", f"{train.img_size} px", f"{train.epochs} epoch" + ("s" if train.epochs != 1 else "")]
    if train.tta:
        parts.append(f"TTA {8 * len(train.tta_crops)} views")
    return ", ".join(parts) + extra


def check_weights_found(config: RunConfig) -> None:
    """A probe, LoRA or fine-tune of a model with published weights that are not on this machine would train on
    random-init weights for hours (and a probe or LoRA give a run `predict` refuses): one clear error instead, before
    any folder exists. Cards without published weights (the paper's from-scratch baselines, ``timm/<name>``) pass."""
    if config.weights or config.allow_download or config.allow_random_init:
        return
    from mitobench.models.cards import get_card  # not the registry: a warm probe run never imports torch

    card = get_card(config.model)
    if card.hf_repo is None:
        return
    from mitobench.models.weights import ENV_MAPPING, locate_weights

    path, where = locate_weights(card)
    if path is None:
        raise MitobenchError(
            f"{card.key}: its weights ({card.hf_repo}) are not on this machine ({where}), so this {config.method} "
            f"run would use RANDOM INIT {'weights' if config.method == 'finetune' else 'features'}. Pass --weights PATH (the weights file or snapshot folder), list it "
            f"in the file named by ${ENV_MAPPING}, or add --allow-download (gated models: accept their terms and set "
            "HF_TOKEN); --set allow_random_init=true runs it on random init anyway.")


def check_weights_fit(config: RunConfig) -> None:
    """Another model's checkpoint (or one in a layout mitobench cannot convert) is refused before any folder
    exists, with the load's own report: the names and shapes in the file are checked against the architecture
    without reading the tensors (``models.weights.check_weights_fit``: about a second, even for a ViT-g)."""
    from mitobench.models.cards import get_card

    card = get_card(config.model)
    if config.weights:
        path = Path(config.weights)
    elif card.weights_loader is not None:
        return  # weights a package ships, loaded by the card's own loader
    else:
        from mitobench.models.weights import resolve_weights

        path = resolve_weights(card, allow_download=False)  # the mapping file or the HF cache, as the load finds them
        if path is None:
            return
    from mitobench.models.weights import check_weights_fit as check_file

    check_file(path, card)


def absolute_paths(config: RunConfig) -> None:
    """The paths a run reads, made absolute (the data root resolved as it is now), so that ``--resume``, fold
    workers and ``predict`` find them from any working directory and environment."""
    config.data_root = str(resolve_data_root(config.data_root))
    if config.cache_dir:
        config.cache_dir = str(Path(config.cache_dir).expanduser().resolve())
    config.datasets = [str(Path(d).expanduser().resolve()) for d in config.datasets]
    if config.weights:
        if not Path(config.weights).expanduser().exists():
            raise MitobenchError(f"--weights {config.weights}: no such file or folder. Give the weights file or the "
                                 "Hugging Face snapshot folder of the model (`mitobench models list` says what each "
                                 "model needs).")
        # absolute, but links kept: an HF snapshot's file links into blobs/, and its config.json sits beside the link
        config.weights = os.path.abspath(Path(config.weights).expanduser())


#: settings a resumed run may change (``--resume RUN --set KEY=VALUE``): they leave every result as it is
RESUME_SETTINGS = ("train.eval_batch_size",)


def run_benchmark(config: RunConfig | None = None, resume: str | Path | None = None,
                  console: Console | None = None, relocate: dict[str, str] | None = None,
                  adjust: dict[str, Any] | None = None) -> Path:
    """Run (or resume) the protocol; return the run folder. On resume, ``relocate`` gives ``data_root`` and/or
    ``cache_dir`` to use instead of the saved ones (the data or the cache moved) and ``adjust`` new values of
    ``RESUME_SETTINGS``; the run's ``config.yaml`` is updated (fold workers read it), nothing else of a run changes."""
    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    if resume is not None:
        run = require_run_dir(resume)
        run.lock()  # before anything is changed: a run still training elsewhere is refused
        if run.status().get("state") == "complete" and not run.status().get("failed_folds"):
            raise MitobenchError(f"{run.path} is already complete; start a new run instead.")
        config = load_run_config(run.path)
        changes = {key: str(Path(value).expanduser().resolve()) for key, value in (relocate or {}).items() if value}
        unknown = set(adjust or {}) - set(RESUME_SETTINGS)
        if unknown:
            raise MitobenchError(f"a resumed run cannot change {', '.join(sorted(unknown))}: start a new run instead.")
        changes.update(adjust or {})
        if changes:
            config = load_run_config(run.path, changes)  # checked like any option; saved once the resume is accepted
    config = config or RunConfig()
    if resume is None:
        absolute_paths(config)
        check_weights_found(config)
        check_weights_fit(config)
        if config.device not in ("auto", "cpu"):  # a GPU this machine lacks: refused before any folder exists
            from mitobench.device import pick_device

            pick_device(config.device)
    method = make_method(config)  # unknown model keys fail here, before any folder exists
    if resume is None and hasattr(method, "preflight"):
        method.preflight()  # LoRA targets, layer decay, frozen stages: on the bare architecture, still no folder
    sets, absent = load_sets(config)
    train = sets["AMi-Br-train"]
    folds = paper_folds(train, config.n_folds, config.seed)
    refuse_leaked_datasets(config, sets)
    if resume is None:
        pin_precision(config, method.card.dtype)
        run = RunDir(new_run_dir(config.runs_dir, config.model, config.method,
                                 f"seed{config.train_seed}" if config.seed_repeat else ""))
        run.lock()
        save_config(config, run.path / "config.yaml")
        atomic_write_json(run.path / "environment.json", environment())
        console.print(f"run folder: {run.path}", soft_wrap=True, markup=False)  # one line: a path to copy
        finished = {}
    else:
        finished = run.finished_folds(config.n_folds)
        check_saved_folds(run.path, finished, sets, folds)  # before the status changes: the run stays resumable
        check_saved_backbone(run.path, finished, config)
        if changes:  # only now: a refused resume leaves config.yaml as it was, the record of what the run used
            save_config(config, run.path / "config.yaml")
            console.print("config.yaml updated for the resumed run: "
                          + ", ".join(f"{k}={v}" for k, v in changes.items()), soft_wrap=True)
        console.print(f"resuming {run.path}", soft_wrap=True, markup=False)
    run.set_status("running")
    try:
        fold_table = train[["image", "group", "domain", "label"]].assign(fold=folds)
        atomic_write_csv(run.path / "folds.csv", fold_table)
        for name in absent:
            console.print(f"[yellow]hold-out set {name} is ABSENT under the data root: it will not be evaluated[/]")

        ctx = build_context(config, sets, folds)
        results: dict[int, FoldResult] = {}
        failed: dict[int, str] = {}
        pending = []
        for fold in range(1, config.n_folds + 1):
            if fold in finished:
                results[fold] = FoldResult(*finished[fold])
                run.drop_checkpoints(fold)  # left if the process died between saving the fold and deleting them
            else:
                pending.append(fold)
        if config.fold_workers > 1 and pending:  # the workers prepare the method themselves
            from mitobench.fold_workers import run_folds

            run_folds(run, pending, config.fold_workers, config.train.num_threads, console, config.n_folds,
                      config.device)
            for fold in pending:
                probs, info = run.load_fold(fold) or ({}, {"failed": "its worker saved no result"})
                if info.get("failed"):
                    failed[fold] = info["failed"]
                else:
                    results[fold] = FoldResult(probs, info)
        else:
            method.prepare(ctx)
            for fold in pending:
                result, error = fit_fold(method, ctx, run, fold, console)
                if result is None:
                    failed[fold] = error
                else:
                    results[fold] = result
        results = dict(sorted(results.items()))
        if any("pretrained" in r.info for r in results.values()):  # the fold models' own record, also when resumed
            method.pretrained = all(r.info.get("pretrained", True) for r in results.values())
        if not results:
            raise MitobenchError("every fold failed; no results. See the messages above.")
        _finalise(run, config, ctx, results, absent, method, console, failed)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        run.set_status("interrupted" if interrupted else "failed",
                       error=str(exc) if isinstance(exc, MitobenchError) else f"{type(exc).__name__}: {exc}")
        if interrupted:
            console.print(f"interrupted: finished folds and each fold's last epoch are kept; continue with "
                          f"`mitobench run --resume {run.path}`", soft_wrap=True, markup=False)
        raise
    complete_environment(run.path / "environment.json")
    ctx.timings["total_s"] = time.perf_counter() - t_start
    run.set_status("complete", timings=ctx.timings, failed_folds=failed)
    return run.path


def _finalise(run: RunDir, config: RunConfig, ctx: Context, results: dict[int, FoldResult], absent: list[str],
              method: Method, console: Console, failed: dict[int, str] | None = None) -> None:
    rows = []
    train = ctx.sets["AMi-Br-train"]
    for fold, result in results.items():
        val_idx = np.flatnonzero(ctx.folds == fold)
        rows.append(pd.DataFrame({"image": train["image"].to_numpy()[val_idx], "dataset": VALIDATION, "fold": str(fold),
                                  "probability": result.probs["validation"], "label": train["label"].to_numpy()[val_idx]}))
        for name in ctx.holdouts:
            frame = ctx.sets[name]
            rows.append(pd.DataFrame({"image": frame["image"], "dataset": name, "fold": str(fold),
                                      "probability": result.probs[name], "label": frame["label"]}))
    for name in ctx.holdouts:
        frame = ctx.sets[name]
        mean = np.mean([results[f].probs[name] for f in results], axis=0)
        rows.append(pd.DataFrame({"image": frame["image"], "dataset": name, "fold": "ensemble",
                                  "probability": mean, "label": frame["label"]}))
    predictions = pd.concat(rows, ignore_index=True)
    thresholds = {str(f): float(r.info["threshold"]) for f, r in results.items()}
    thresholds["ensemble"] = float(np.mean(list(thresholds.values())))
    slides = ({name: dict(zip(ctx.sets[name]["image"], ctx.sets[name]["group"])) for name in ctx.holdouts}
              if config.bootstrap == "slide" else None)
    metrics = tidy_metrics(predictions, thresholds, config.model, config.method, config.n_boot, config.seed, slides)
    domains = {VALIDATION: dict(zip(train["image"], train["domain"])),
               **{name: dict(zip(ctx.sets[name]["image"], ctx.sets[name]["domain"])) for name in ctx.holdouts}}
    by_domain = domain_metrics(predictions, domains, thresholds, config.model, config.method, config.n_boot,
                               config.seed, slides)
    atomic_write_csv(run.path / "predictions.csv", predictions)
    atomic_write_csv(run.path / "metrics.csv", metrics)
    text = render_report(metrics, config.model, config.method, [VALIDATION, *ctx.holdouts], absent,
                         getattr(method, "pretrained", True), recipe=recipe(config), threshold=config.threshold,
                         calibration=config.calibration)
    if not by_domain.empty:
        atomic_write_csv(run.path / "metrics_by_domain.csv", by_domain)
        text += render_domain_report(by_domain)
    votes = votes_of_sets(ctx.sets)
    by_agreement = agreement_metrics(predictions, votes, thresholds, config.model, config.method, config.n_boot,
                                     config.seed, slides)
    by_votes = calls_by_votes(predictions, votes, thresholds)
    raters = rater_agreement(predictions, votes, thresholds)
    for name, frame in (("metrics_by_agreement", by_agreement), ("calls_by_votes", by_votes),
                        ("rater_agreement", raters)):
        if not frame.empty:
            atomic_write_csv(run.path / f"{name}.csv", frame)
    text += render_agreement_report(by_agreement, by_votes, raters)
    if failed:
        note = (f"WARNING: fold(s) {sorted(failed)} FAILED and are excluded: the mean, SD and ensemble use "
                f"{len(results)} fold models. Rerun them with `mitobench run --resume {run.path}`.")
        Console(stderr=True, soft_wrap=True).print(note, style="bold red", markup=False)
        text = note + "\n" + text
    atomic_write_text(run.path / "report.txt", text)
    atomic_write_json(run.path / "fold_info.json", {str(f): r.info for f, r in results.items()})
