"""The ``mitobench`` command."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from mitobench.errors import MitobenchError

app = typer.Typer(help="Atypical vs normal mitotic figures: the AMi-Br benchmark protocol, honest and fast.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Download, inspect and cache the datasets.", no_args_is_help=True)
models_app = typer.Typer(help="The backbone registry: list cards, check weights.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
console = Console(width=max(Console().width, 140))
err = Console(stderr=True, soft_wrap=True)  # a message's URLs and paths stay whole for copying; the terminal wraps

DataRoot = typer.Option(None, "--data-root", help="Folder holding AMi-Br/, AtNorM-Br/, ... (default: $MITOBENCH_DATA, "
                        "else a per-user cache folder).")


def _yaml_value(item: str, value: str):
    """The value of ``--set key=value``, read as YAML."""
    import yaml

    from mitobench.config import read_yaml

    try:
        return read_yaml(value)
    except yaml.YAMLError as exc:
        raise MitobenchError(f"--set {item!r}: the value is not valid YAML ({exc.__class__.__name__}); quote "
                             "it for the shell, e.g. --set 'train.tta_crops=[1.0, 0.875]'.") from exc


def _flag(key: str, value: object = None) -> str:
    """The command-line flag that sets option ``key`` of ``mitobench run`` (``train.epochs`` -> ``--epochs``; a
    switch given as off by its off-form: ``allow_download`` False -> ``--offline``, ``train.tta`` False ->
    ``--no-tta``)."""
    if value is False:
        off = {"allow_download": "--offline", "train.tta": "--no-tta", "dedup": "--no-dedup"}
        if key in off:
            return off[key]
    return {"probe.head": "--probe-head", "datasets": "--dataset"}.get(key, "--" + key.split(".")[-1].replace("_", "-"))


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with any option; flags override it."),
    data_root: Optional[str] = DataRoot,
    model: Optional[str] = typer.Option(None, help="Registry key (`mitobench models list`) or timm/<name>. Default efficientnet_lite0."),
    weights: Optional[str] = typer.Option(None, help="Weights file or Hugging Face snapshot folder for the model."),
    method: Optional[str] = typer.Option(None, help="probe (default) | finetune | lora."),
    preset: Optional[str] = typer.Option(None, help="Training preset: paper | cpu (finetune/lora)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Training epochs (finetune/lora)."),
    probe_head: Optional[str] = typer.Option(None, help="logistic (default) | torch (the paper's head)."),
    threshold: Optional[str] = typer.Option(None, help="fixed (0.5, default) | validation (chosen on the validation fold)."),
    calibration: Optional[str] = typer.Option(None, help="none (default) | platt: each fold model's probabilities "
                                              "calibrated on its validation fold; its decisions stay the same."),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="Extra hold-out set: class folders or CSV path,label[,group,domain,votes]. Repeatable."),
    dedup: Optional[bool] = typer.Option(None, "--dedup/--no-dedup", help="Also evaluate de-duplicated hold-out sets."),
    runs_dir: Optional[str] = typer.Option(None, help="Where run folders go (default ./runs)."),
    cache_dir: Optional[str] = typer.Option(None, help="Patch and embedding cache (default $MITOBENCH_CACHE or the user cache)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:1."),
    dtype: Optional[str] = typer.Option(None, help="Embedding dtype: auto (card's on GPU, float32 on CPU) | float32 | bfloat16 | float16."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Dihedral test-time augmentation (training methods): 8 views per crop in train.tta_crops."),
    allow_download: Optional[bool] = typer.Option(None, "--allow-download/--offline", help="Allow Hugging Face downloads."),
    train_seed: Optional[int] = typer.Option(None, "--train-seed", min=0, help="Seed of the training alone (init, "
                                             "sampler, augmentation; the probe's inner CV), the folds staying the "
                                             "paper's: repeat a run with other values to measure seed variance "
                                             "(`mitobench report --seeds`). Default: the seed (42)."),
    fold_workers: Optional[int] = typer.Option(None, "--fold-workers", min=1, help="finetune/lora: train this many folds at "
                                               "once in worker processes sharing the CPU cores (default 1)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Resume an interrupted run folder with its own config.yaml (only --data-root, "
                                         "--cache-dir and --set train.eval_batch_size may change)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Any option as key=value (YAML value), e.g. "
                                             "--set probe.head=torch, or with --method finetune/lora --set train.lr=3e-4 "
                                             "--set train.lora_targets='.*qkv$'. Repeatable."),
) -> None:
    """Run the AMi-Br protocol: 5 slide-grouped folds, every hold-out set, fold mean +- SD and the ensemble."""
    from mitobench.config import load_config
    from mitobench.protocol import run_benchmark

    overrides = {"data_root": data_root, "model": model, "weights": weights, "method": method,
                 "train.preset": preset, "train.epochs": epochs, "probe.head": probe_head, "threshold": threshold,
                 "calibration": calibration,
                 "datasets": list(dataset) if dataset else None, "dedup": dedup, "runs_dir": runs_dir,
                 "cache_dir": cache_dir, "device": device, "dtype": dtype, "train.tta": tta, "allow_download": allow_download,
                 "fold_workers": fold_workers, "train_seed": train_seed}
    flagged = {key for key, value in overrides.items() if value is not None}
    if resume is not None:  # a resumed run keeps its recipe; only moved data/cache and result-neutral settings change
        from mitobench.protocol import RESUME_SETTINGS

        ignored = [_flag(key, overrides[key]) for key in flagged if key not in ("data_root", "cache_dir")]
        ignored += ["--config"] * (config is not None)
        adjust = {}
        for item in set_ or []:
            key, sep, value = item.partition("=")
            if sep and key.strip() in RESUME_SETTINGS:
                adjust[key.strip()] = _yaml_value(item, value)
            else:
                ignored.append(f"--set {item}")
        if ignored:
            raise MitobenchError(f"--resume continues {resume} with its own config.yaml, so these options would be "
                                 f"ignored: {', '.join(ignored)}. Drop them (only --data-root and --cache-dir may "
                                 f"point at moved data or cache, and --set may change {', '.join(RESUME_SETTINGS)}, "
                                 "which leave the results as they are), or start a new run to change settings.")
        path = run_benchmark(resume=resume, relocate={"data_root": data_root, "cache_dir": cache_dir}, adjust=adjust)
    else:
        for item in set_ or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise MitobenchError(f"--set {item!r}: write it as key=value, e.g. train.lr=3e-4")
            overrides[key.strip()] = _yaml_value(item, value)
        resolved = load_config(config, overrides)
        training = [_flag(k, v) if k in flagged else f"--set {k}"
                    for k, v in overrides.items() if k.startswith("train.") and v is not None]
        if resolved.method == "probe" and training:  # else config.yaml would claim a recipe the probe never used
            raise MitobenchError(f"{', '.join(training)}: training settings, which a probe run ignores. Add --method "
                                 "finetune (or lora) to train with them, or drop them for a linear probe.")
        path = run_benchmark(resolved)
    console.print(f"results: {path}", soft_wrap=True, markup=False)  # a path is never rich markup


@app.command()
def embed(
    data_root: Optional[str] = DataRoot,
    model: str = typer.Option("efficientnet_lite0", help="Registry key or timm/<name>."),
    weights: Optional[str] = typer.Option(None, help="Weights file or snapshot folder."),
    cache_dir: Optional[str] = typer.Option(None, help="Cache folder."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Default: 8 on CPU, 128 on GPU."),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto", help="auto (card's dtype on GPU, float32 on CPU) | float32 | bfloat16 | float16."),
    workers: Optional[int] = typer.Option(None, min=1, help="CPU: single-threaded embedding worker processes (default: one per core; 1: in this process)."),
) -> None:
    """Decode and embed every dataset once into the cache (later runs reuse it)."""
    import time

    from mitobench.config import load_config
    from mitobench.data.cache import PatchCache
    from mitobench.device import cpu_workers, pick_device, pick_dtype
    from mitobench.embed import EmbeddingCache, shutdown_workers
    from mitobench.models.registry import create_backbone
    from mitobench.protocol import default_cache_dir, load_sets

    cfg = load_config(None, {"data_root": data_root, "cache_dir": cache_dir, "model": model})
    sets, absent = load_sets(cfg)
    backbone = create_backbone(model, weights)
    if not backbone.pretrained:
        raise MitobenchError(f"{model}: no pretrained weights were found, so the model is random init. `mitobench embed` "
                             "fills the cache for later runs, but random-init features are never cached (each build "
                             "draws other weights). Pass --weights PATH (file or Hugging Face snapshot folder).")
    dev = pick_device(device)
    dtype = pick_dtype(dtype, dev, backbone.card.dtype)
    patches = PatchCache(default_cache_dir(cfg))
    cache = EmbeddingCache(default_cache_dir(cfg))
    try:
        for name, frame in sets.items():
            t0 = time.perf_counter()
            arr, key = patches.load(frame, name, verify=True)  # embedding reads every pixel: check them first
            feats = cache.get(backbone, arr, key, batch_size=batch_size, device=dev, dtype=dtype, name=name,
                              workers=cpu_workers(workers))
            console.print(f"{name}: {feats.shape[0]} x {feats.shape[1]} ({time.perf_counter() - t0:.1f}s)", markup=False)
    finally:
        shutdown_workers()


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A complete run folder (from `mitobench run`)."),
    source: Path = typer.Argument(..., help="Patches: Atypical/Normal class folders, any folder of images, or a CSV with "
                                             "a path column. With --points: a whole-slide image (SVS, tiled TIFF, ...), or a folder of them "
                                             "(the points CSV's slide column names each point's)."),
    points: Optional[Path] = typer.Option(None, help="The figures to classify on the slide SOURCE: a CSV with columns x, y "
                                                     "(level-0 pixels; optional id, label) or a GeoJSON of points "
                                                     "(QuPath's export)."),
    slide_mpp: Optional[float] = typer.Option(None, help="The slide's microns per pixel, needed when its file records "
                                                         "none; overrides (with a warning) what a file records, for "
                                                         "every slide of a folder."),
    target_mpp: Optional[float] = typer.Option(None, help="Microns per pixel to crop at (default 0.25: the training "
                                                          "patches' 40x)."),
    save_patches: bool = typer.Option(False, help="With --points: also save each crop as a PNG beside the CSV."),
    out: Optional[str] = typer.Option(None, help="Output CSV (default RUN_DIR/predictions/<name>-<time>.csv), or a folder "
                                                 "(ending in /) to write it in; never overwritten."),
    batch_size: int = typer.Option(64, min=1),
    device: str = typer.Option("auto"),
) -> None:
    """Apply a run's 5 fold models and their ensemble to new 128-px patches centred on mitotic figures, or to the
    figures at given points of a whole-slide image (--points; a GeoJSON for QuPath is written beside the CSV)."""
    from mitobench.evaluation.metrics import binary_metrics
    from mitobench.predict import predict as run_predict
    from mitobench.predict import predict_slide

    if points is None and (slide_mpp is not None or target_mpp is not None or save_patches):
        raise MitobenchError("--slide-mpp, --target-mpp and --save-patches apply to a slide: give its figures "
                             "with --points.")
    try:
        if points is None:
            path, table = run_predict(run_dir, source, out, batch_size, device)
        else:
            path, table = predict_slide(run_dir, source, points, out, batch_size, device, slide_mpp, target_mpp,
                                        save_patches)
    except KeyboardInterrupt:
        err.print("interrupted: no predictions were written (what was begun is removed); run the command again.",
                  highlight=False)
        raise
    n_atypical = int((table["predicted"] == "Atypical").sum())
    what = "figures" if points is not None else "patches"
    console.print(f"{len(table)} {what}: {n_atypical} predicted atypical (threshold {table['threshold'].iloc[0]:.3f})")
    if points is not None and table["edge_padded"].any():
        console.print(f"{int(table['edge_padded'].sum())} crop(s) reached past the slide's edge (white there; "
                      "column edge_padded)")
    labelled = table[table["label"].notna()]
    if labelled["label"].nunique() == 2:  # both classes among the labelled ones
        m = binary_metrics(labelled["label"].astype(int), labelled["p_ensemble"], float(table["threshold"].iloc[0]))
        over = "" if len(labelled) == len(table) else f" (over the {len(labelled)} labelled of {len(table)})"
        console.print(f"ensemble{over}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    console.print(f"predictions: {path}", soft_wrap=True, markup=False)
    if points is not None:
        from mitobench.predict import slide_outputs

        from mitobench.predict import slide_summary

        outputs = slide_outputs(path, source.is_dir(), save_patches)
        if "summary" in outputs:
            _print_slide_summary(slide_summary(table), outputs["summary"])
        for what, name in (("geojson", "QuPath GeoJSON"), ("summary", "per-slide summary"), ("patches", "crops")):
            if what in outputs:
                console.print(f"{name}: {outputs[what]}{'/' if outputs[what].is_dir() else ''}", soft_wrap=True,
                              markup=False)


def _print_slide_summary(summary, path: Path, limit: int = 40) -> None:
    """The per-slide counts of a cohort (the first ``limit`` slides; all of them are in ``path``)."""
    from rich.table import Table

    table = Table("slide", "figures", "predicted atypical", "fraction", "expected atypical (sum of p)",
                  title="per slide" + (f" (first {limit} of {len(summary)}; all in {path.name})"
                                       if len(summary) > limit else ""))
    for row in summary.head(limit).itertuples(index=False):
        table.add_row(str(row.slide), str(row.figures), str(row.predicted_atypical), f"{row.atypical_fraction:.3f}",
                      f"{row.expected_atypical:.1f}")
    console.print(table)


def _run_recipe(run_dir: Path) -> str:
    """The few words of the run's report title on how it trained (probe head; preset, precision, size, epochs)."""
    try:
        lines = (run_dir / "report.txt").read_text().strip().splitlines()
    except OSError:
        return ""
    first = next((line.strip() for line in lines if line.strip() and not line.startswith("WARNING:")), "")
    start, end = first.find(" ("), first.rfind(")")
    return f" ({first[start + 2:end]})" if 0 <= start < end else ""


def _random_init_note(run_dir: Path) -> str:
    from mitobench.evaluation.report import RANDOM_INIT_TAG
    from mitobench.runs import RunDir

    return f"  {RANDOM_INIT_TAG}" if RunDir(run_dir).random_init() else ""


def _failed_folds_note(run_dir: Path) -> str:
    """Said beside a run whose figures come from fewer fold models than it planned (folds that failed, e.g. NaN)."""
    from mitobench.runs import RunDir

    failed = RunDir(run_dir).failed_folds()
    return (f"  WARNING: fold(s) {', '.join(failed)} FAILED: its fold mean, SD and ensemble leave "
            "them out" if failed else "")


@app.command()
def report(run_dirs: list[Path] = typer.Argument(..., help="One or more complete run folders."),
           seeds: bool = typer.Option(False, "--seeds", help="The runs are seed repeats of one recipe (--train-seed): "
                                      "also print the seed variance apart from the fold SD and the bootstrap CI."),
           out: Optional[Path] = typer.Option(None, "--out", help="With --seeds: write the seed summary to this new "
                                              "CSV (never overwritten).")) -> None:
    """Compare runs side by side: fold mean +- SD and ensemble BA / AUROC per hold-out set."""
    import pandas as pd
    from rich.table import Table

    from mitobench.runs import check_result_rows, fold_record, require_complete_run

    if out is not None and not seeds:
        raise MitobenchError("--out writes the seed summary: add --seeds (and give seed repeats of one run).")
    if out is not None and (out.suffix.lower() != ".csv" or out.exists()):
        raise MitobenchError(f"--out {out}: give a new .csv path" + (" (that file exists; nothing is overwritten)."
                                                                     if out.exists() else "."))
    if seeds:  # before any table: runs that are not repeats of one recipe are refused at once
        from mitobench.evaluation.repeats import check_complete_folds, check_repeats, device_used
        from mitobench.runs import load_run_config

        configs = []
        for run_dir in run_dirs:
            require_complete_run(run_dir, needs=("metrics.csv", "config.yaml"))
            configs.append((str(run_dir), load_run_config(run_dir)))
            check_complete_folds(run_dir, configs[-1][1])
        check_repeats(configs, [device_used(run_dir, config) for run_dir, (_, config) in zip(run_dirs, configs)])
    rows, frames = [], []
    names = [run_dir.name for run_dir in run_dirs]
    legend = []
    for number, run_dir in enumerate(run_dirs, 1):
        path = run_dir / "metrics.csv"
        require_complete_run(run_dir, needs=("metrics.csv",))
        try:
            m = pd.read_csv(path, dtype={"fold": str})
            how = f"{m['model'].iloc[0]} / {m['method'].iloc[0]}" if len(m) else "?"
            if "ci_unit" in m and (m["ci_unit"] == "slide").any():  # else per figure: say when CIs differ in kind
                how += f"; ensemble CI over slides on {', '.join(sorted(m.loc[m['ci_unit'] == 'slide', 'dataset'].unique()))}"
            check_result_rows(m, path, fold_record(run_dir), per_image=False)
            m = m[m["metric"].isin(["balanced_accuracy", "auroc"])][["dataset", "metric", "fold", "value", "ci_low", "ci_high"]]
            frames.append(m)
        except (ValueError, KeyError, pd.errors.ParserError) as exc:
            raise MitobenchError(f"{path}: not a mitobench metrics file ({exc}); the run folder is damaged.") from exc
        if m.empty:
            raise MitobenchError(f"{path}: no balanced accuracy or AUROC rows; the run folder is damaged.")
        label = str(run_dir) if names.count(run_dir.name) > 1 else run_dir.name  # same-named runs stay apart
        legend.append(f"#{number}  {label}: {how}{_run_recipe(run_dir)}{_random_init_note(run_dir)}"
                      f"{_failed_folds_note(run_dir)}")
        for (dataset, metric), part in m.groupby(["dataset", "metric"], sort=False):
            get = dict(zip(part["fold"], part["value"]))
            ens = part[part["fold"] == "ensemble"]
            rows.append({"run": f"#{number}", "dataset": dataset, "metric": metric,
                         "folds": f"{get.get('mean', float('nan')):.4f} +- {get.get('sd', float('nan')):.4f}",
                         "ensemble": (f"{ens['value'].iloc[0]:.4f} [{ens['ci_low'].iloc[0]:.4f}, {ens['ci_high'].iloc[0]:.4f}]"
                                      if len(ens) else "-")})
    table = Table(title="mitobench runs (positive class = atypical)")
    for col in ("run", "dataset", "metric", "fold mean +- SD", "ensemble [95% CI]"):
        table.add_column(col, no_wrap=col != "dataset")
    for r in rows:
        table.add_row(r["run"], r["dataset"], r["metric"], r["folds"], r["ensemble"])
    from mitobench.evaluation.agreement import agreement_comparison

    by_agreement = agreement_comparison(run_dirs)  # every file read and checked before anything is shown
    for line in legend:  # full names, never cut: two runs' names often differ only at their end
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    console.print(table)
    if by_agreement is not None:
        console.print(by_agreement)
    if seeds:
        from mitobench.evaluation.repeats import seed_summary, seed_table
        from mitobench.io import atomic_write_csv

        summary = seed_summary(frames)
        console.print(seed_table(summary, run_dirs))
        if out is not None:
            try:
                atomic_write_csv(out, summary, exclusive=True)
            except FileExistsError as exc:  # made since the check above
                raise MitobenchError(f"--out {out}: that file exists; nothing is overwritten.") from exc
            console.print(f"seed summary written to {out}", markup=False, highlight=False)


@app.command()
def plot(run_dirs: list[Path] = typer.Argument(..., help="One or more complete run folders."),
         out: Optional[Path] = typer.Option(None, "--out", help="New folder for the figures (default: RUN/plots for one "
                                            "run, ./plots-<date>-<time> for several).")) -> None:
    """ROC, precision-recall and calibration curves per set (PNG) and their numbers (curves.csv)."""
    from datetime import datetime

    from mitobench.evaluation.plots import plot_runs

    if out is None:
        base = run_dirs[0] / "plots" if len(run_dirs) == 1 else Path(f"plots-{datetime.now():%Y%m%d-%H%M%S}")
        out = next((p for p in (base, *(base.with_name(f"{base.name}-{k}") for k in range(1, 1000))) if not p.exists()),
                   None)
        if out is None:
            raise MitobenchError(f"{base} and 999 numbered copies exist: give a new folder with --out.")
    table = plot_runs(run_dirs, out)
    shown = table[table["fold"] == "ensemble"] if (table["fold"] == "ensemble").any() else table
    for row in shown.itertuples():
        console.print(f"#{row.run} {row.dataset} {row.fold}: AUROC {row.auroc:.4f}, AP {row.average_precision:.4f}, "
                      f"ECE {row.ece:.4f}, Brier {row.brier:.4f}", markup=False, highlight=False)
    for number, run_dir in enumerate(run_dirs, 1):
        if note := _random_init_note(run_dir):
            console.print(f"#{number} {run_dir}:{note}", soft_wrap=True, markup=False, highlight=False)
    console.print(f"figures and curves.csv written to {out}", markup=False, highlight=False)


@data_app.command("fetch")
def data_fetch(data_root: Optional[str] = DataRoot,
               force: bool = typer.Option(False, help="Download again even if present.")) -> None:
    """Download AMi-Br, AtNorM-Br and AtNorM-MD (public, MIT) into the data root; resumes broken downloads."""
    from mitobench.data.fetch import fetch
    from mitobench.data.records import resolve_data_root

    path = fetch(resolve_data_root(data_root), force=force)
    console.print(f"data ready in {path}", soft_wrap=True, markup=False)


@data_app.command("check")
def data_check(data_root: Optional[str] = DataRoot,
               dataset: Optional[list[Path]] = typer.Option(None, "--dataset", help="Also check your own set (class "
                                                            "folders or a CSV path,label[,group,domain,votes]), as `run "
                                                            "--dataset` evaluates it: leakage from AMi-Br train, "
                                                            "duplicates, conflicts. Repeatable.")) -> None:
    """Counts per set, class and domain; unreadable files; duplicates; slide overlap train/test; leakage."""
    from mitobench.data.check import check_data, render_check
    from mitobench.data.records import HOLDOUT_SETS, resolve_data_root
    from mitobench.protocol import load_user_sets

    extra = load_user_sets(dataset or [], taken={"AMi-Br", "AMi-Br-train", *HOLDOUT_SETS})
    result = check_data(resolve_data_root(data_root), extra=extra)
    render_check(result)
    if not result.ok:
        raise typer.Exit(1)


@models_app.command("list")
def models_list() -> None:
    """Every model card, with whether its weights are found locally."""
    from mitobench.models.doctor import list_models, models_table

    console.print(models_table(list_models()))


@models_app.command("show")
def models_show(key: str) -> None:
    """One model card in full: architecture, recipe, HF repo, weight files, LoRA target regex, local weights."""
    from mitobench.models.doctor import card_details

    for k, v in card_details(key).items():
        console.print(f"{k}: {v}", markup=False, highlight=False)


@models_app.command("check")
def models_check(key: str, weights: Optional[str] = typer.Option(None, help="Weights file or snapshot folder."),
                 image: Optional[str] = typer.Option(None, help="A patch to run through the recipe (default: the "
                                                      "first AMi-Br Normal patch of the data root)."),
                 data_root: Optional[str] = DataRoot) -> None:
    """Build offline, load weights strictly, run one real patch; print dim, dtype, device, images/s."""
    from mitobench.models.doctor import check_model

    result = check_model(key, weights, image, data_root=data_root)
    for k, v in result.items():
        console.print(f"{k}: {v}", markup=False)
    if "error" in result:  # a card with published weights that ran on random init: its weights were not found
        raise typer.Exit(1)


_signalled: list[int] = []


def _stop_on_signals(main_pid: int) -> None:
    """Take SIGTERM (a scheduler's or `kill`'s stop) like Ctrl-C, so a run folder is marked interrupted,
    and exit 128 + the signal's number as shells expect."""

    def handler(signum, frame) -> None:
        if os.getpid() != main_pid:  # a forked worker: die as usual, its parent handles the rest
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        _signalled.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, handler)


_PACKAGE = Path(__file__).resolve().parent
_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """mitobench's own warnings as one ``warning:`` line, as its errors are (no source file, no code line); other
    packages' as Python shows them."""
    try:
        ours = Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        ours = False
    if ours:
        err.print(f"[yellow]warning:[/] {escape(str(message))}", soft_wrap=True, highlight=False)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.showwarning = _show_warning
    _stop_on_signals(os.getpid())
    try:
        app()
    except MitobenchError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}")  # paths and values in messages are not markup
        sys.exit(exc.exit_code)
    except SystemExit:
        if _signalled:  # click turned the interrupt into "Aborted!", exit 1; say which signal stopped us
            sys.exit(128 + _signalled[0])
        raise


if __name__ == "__main__":
    main()
