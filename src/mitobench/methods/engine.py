"""One training engine for end-to-end fine-tuning and LoRA.

The decoded patch cache is held in memory as a uint8 tensor; batches are augmented on the training
device (``augment.BatchAugment``). A method module (``finetune``, ``lora``) only says which
parameters train and how the checkpoint is saved. Selection (best epoch, early stopping) uses the
validation fold only. Every epoch writes a resumable checkpoint into the fold's scratch folder.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import nn

from mitobench.config import RunConfig
from mitobench.errors import FoldFailedError, MitobenchError
from mitobench.methods.augment import PRESETS, BatchAugment, dihedral
from mitobench.methods.compile import compile_model
from mitobench.methods.cpu_memory import keep_freed_memory
from mitobench.methods.freeze import freeze_stages
from mitobench.methods.mixup import mixup
from mitobench.methods.precision import autocast, cpu_has_native_bf16, prepare_model, resolve_precision
from mitobench.progress import progress_bar, say

log = logging.getLogger(__name__)


NONFINITE_CHECK_EVERY = 16  # steps between reads of the on-device non-finite-loss flag when training on CUDA


def is_out_of_memory(exc: BaseException) -> bool:
    """A GPU's ``OutOfMemoryError`` (``torch.OutOfMemoryError`` from torch 2.5, ``torch.cuda`` before) or the CPU
    allocator's plain ``RuntimeError``: both get the message that names the knob."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    text = str(exc)
    return (oom is not None and isinstance(exc, oom)) or any(
        sign in text for sign in ("can't allocate memory", "MPS backend out of memory", "CUBLAS_STATUS_ALLOC_FAILED"))


def nonfinite_check_every(device: torch.device) -> int:
    """Steps between reads of the non-finite-loss flag: every step on the CPU (a read costs nothing there)."""
    return 1 if device.type == "cpu" else NONFINITE_CHECK_EVERY


class Classifier(nn.Module):
    """Backbone embedding -> dropout -> one logit (atypical)."""

    def __init__(self, backbone, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.embed_dim, 1)
        self.frozen_norms: list[nn.Module] = []  # BatchNorms of frozen stages keep their statistics

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for norm in self.frozen_norms:
            norm.train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x))).squeeze(1)


def match_input_size(backbone, size: int) -> None:
    """Let a fixed-size ViT take ``size`` px input (position embeddings resampled, as timm does)."""
    model = backbone.model
    if size != backbone.card.input_size and hasattr(model, "set_input_size") and not getattr(model, "dynamic_img_size", False):
        model.set_input_size(img_size=(size, size))


def centre_crop(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """The central ``fraction`` of each side of uint8 ``(B, H, W, 3)`` patches (the mitotic figure is centred)."""
    if fraction >= 1:
        return images
    h, w = images.shape[1:3]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[:, top:top + ch, left:left + cw]


def _method_module(name: str):
    from mitobench.methods import finetune, lora

    return {"finetune": finetune, "lora": lora}[name]


def make_optimizer(cls: type[torch.optim.Optimizer], groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """``cls`` in its fused form (one kernel updates every parameter) where this torch has it for the parameters'
    device: the same update rule, ~3x faster steps on the CPU. Older torch releases fuse on CUDA only."""
    try:
        return cls(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return cls(groups, lr=lr)


def layer_scales(backbone: nn.Module, layer_decay: float) -> dict[str, float]:
    """``train.layer_decay``: each backbone parameter's lr factor, ``layer_decay ** (depth from the top)`` over timm's
    fine-grained layer groups (``group_matcher``, as timm's own ``param_groups_layer_decay``): the stem and patch
    embedding lowest, the final norm (and an EfficientNet's ``conv_head``) at 1, like the classification head."""
    from timm.models import group_parameters

    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        raise MitobenchError(f"train.layer_decay needs a timm backbone with a group_matcher to order its layers; "
                             f"{type(backbone).__name__} has none. Leave train.layer_decay unset.")
    layer_of = group_parameters(backbone, matcher(coarse=False), reverse=True)
    top = max(layer_of.values())
    return {name: layer_decay ** (top - layer) for name, layer in layer_of.items()}


def param_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """No decay on norms, biases and what the timm model lists in ``no_weight_decay()`` (a ViT's position embedding
    and class token, a Swin's relative position tables); optional layer-wise lr decay (``layer_scales``; the head
    gets the full lr)."""
    backbone = model.backbone.model
    scales = layer_scales(backbone, layer_decay) if layer_decay else {}
    skip = set(backbone.no_weight_decay()) if callable(getattr(backbone, "no_weight_decay", None)) else set()
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inner = name.removeprefix("backbone.model.")
        scale = scales.get(inner, 1.0)
        no_decay = p.ndim <= 1 or name.endswith(".bias") or inner in skip or inner.split(".")[-1] in skip
        key = (scale, no_decay)
        groups.setdefault(key, {"params": [], "lr": lr * scale, "lr_scale": scale,
                                "weight_decay": 0.0 if no_decay else weight_decay})["params"].append(p)
    return list(groups.values())


def stream_seed(seed: int, stream: str) -> int:
    """An independent seed for one random stream of a fold (sampler, augmentation), derived from the fold's seed:
    generators seeded alike would draw the same numbers, tying which image is drawn to how it is augmented."""
    return int(np.random.SeedSequence([seed, *stream.encode()]).generate_state(1, np.uint64)[0] >> 1)


def improves(rule: str, ba: float, auc: float, best_ba: float, best_auc: float) -> bool:
    """Does this epoch replace the kept one under the ``train.select`` rule?"""
    if rule == "last":
        return True
    if rule == "auroc":
        return auc > best_auc or (auc == best_auc and ba > best_ba)
    return ba > best_ba or (ba == best_ba and auc > best_auc)


def load_fold_checkpoint(path: Path) -> dict:
    """A fold's ``last.pt`` / ``best.pt`` (written atomically, so damage means the disk or a hand): unreadable is
    one error saying how to train the fold again, never a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - EOFError, RuntimeError, UnpicklingError on a damaged file
        raise MitobenchError(f"{path} cannot be read ({type(exc).__name__}): this fold's checkpoint is damaged. "
                             f"Delete the folder {path.parent} and resume the run to train the fold again.") from exc


def trained_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the parameters that train and every buffer (BatchNorm statistics, an EMA's count).
    Frozen weights are rebuilt from the backbone's own weights on resume, so a LoRA fold's resume checkpoints are
    megabytes, not the gigabytes of a ViT-H written every epoch."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    return {k: v.detach() for k, v in module.state_dict().items() if k not in frozen}


def load_trained_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a ``trained_state`` into the rebuilt model; one that does not fit it (another model, method or recipe)
    is one error saying how to train the fold again."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        missing, unexpected = [str(exc).splitlines()[0]], []
    if unexpected or set(missing) - frozen:
        wrong = sorted(set(missing) - frozen)[:3] + sorted(unexpected)[:3]
        raise MitobenchError(f"{path} does not fit this fold's model (e.g. {', '.join(wrong)}): it was written by "
                             f"another model or recipe. Delete the folder {path.parent} and resume the run to train "
                             "the fold again.")


def staged_best(scratch: Path, epoch: int) -> Path:
    """Where an improving epoch's weights wait until ``last.pt`` records that epoch as the best; then they become
    ``best.pt``. A kill in between leaves ``best.pt`` and ``last.pt`` agreeing (``settle_best``)."""
    return scratch / f"best.pt.epoch{epoch}"


def settle_best(scratch: Path, best_epoch: int | None) -> None:
    """Publish the staged weights of ``best_epoch`` as ``best.pt``; drop any other staged file (an epoch that
    ``last.pt`` never recorded, to be trained again)."""
    for staged in scratch.glob("best.pt.epoch*"):
        if best_epoch is not None and staged == staged_best(scratch, best_epoch):
            staged.replace(scratch / "best.pt")
        else:
            staged.unlink()


class TrainMethod:
    """``--method finetune`` or ``--method lora`` with any registry backbone."""

    def __init__(self, config: RunConfig):
        from mitobench.models.registry import get_card

        self.config = config
        self.card = get_card(config.model)
        self.module = _method_module(config.method)
        if config.train.img_size is None:  # the backbone's own input size (the saved config.yaml records it)
            config.train.img_size = self.card.input_size
        if config.method == "lora" and not (config.train.lora_targets or self.card.lora_target):
            raise MitobenchError(f"model {config.model!r} has no LoRA target regex; pass train.lora_targets or use finetune.")
        self.pretrained, self.weights_id = True, None

    def preflight(self) -> None:
        """The recipe's model-dependent settings, checked on the bare architecture before any run folder exists:
        LoRA targets that match no layer, layer decay or frozen stages on a model without timm stages, gradient
        checkpointing on a model without it. Built on the meta device: no memory, no weights, a second for a ViT-g.
        What cannot be built on meta is left to the first fold, which checks the same on the real model."""
        from mitobench.models.cards import RANDOM_INIT
        from mitobench.models.registry import Backbone, build_architecture

        train = self.config.train
        try:
            with torch.device("meta"):
                backbone = Backbone(build_architecture(self.card, train.drop_path), self.card, RANDOM_INIT, "")
                match_input_size(backbone, train.img_size)
                if train.grad_checkpointing:
                    self._checkpoint_gradients(backbone)
                model = self.module.prepare(Classifier(backbone, dropout=train.dropout), self.config)
                freeze_stages(model, train.freeze_stages, train.freeze_norm_stats)
                param_groups(model, train.lr, train.weight_decay, train.layer_decay)
        except MitobenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - an architecture that needs real tensors to build
            log.debug("preflight of %s skipped: %s", self.config.model, exc)

    def _checkpoint_gradients(self, backbone) -> None:
        """Turn on timm's gradient checkpointing; a model without it (no method, or one that asserts, as VGG's)
        is one clear error."""
        enable = getattr(backbone.model, "set_grad_checkpointing", None)
        try:
            if enable is None:
                raise NotImplementedError
            enable(True)
        except (AssertionError, NotImplementedError) as exc:
            raise MitobenchError(f"model {self.config.model!r} does not support gradient checkpointing "
                                 "(train.grad_checkpointing). To save memory, lower train.batch_size and raise "
                                 "train.grad_accum to keep the effective batch.") from exc

    def prepare(self, ctx) -> None:
        from mitobench.device import pick_device

        self.device = pick_device(self.config.device)
        if self.config.train.precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            say("warning: train.precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): oneDNN emulates it, "
                "slower than float32. Use --set train.precision=fp32 here.")
        if self.config.train.num_threads:
            torch.set_num_threads(self.config.train.num_threads)
        if self.device.type == "cpu":
            keep_freed_memory()  # large activations are reused step after step, not page-faulted anew (cpu_memory.py)
        # held in RAM (AMi-Br is ~180 MB decoded), not read through the memory map at every step
        self.images = {name: torch.from_numpy(np.array(p)) for name, p in ctx.patches.items()}

    # -- model -------------------------------------------------------------------------------------
    def _build(self) -> Classifier:
        from mitobench.models.registry import create_backbone

        backbone = create_backbone(self.config.model, self.config.weights, allow_download=self.config.allow_download,
                                   drop_path=self.config.train.drop_path)
        self.pretrained, self.weights_id = backbone.pretrained, backbone.weights_id
        match_input_size(backbone, self.config.train.img_size)
        model = Classifier(backbone, dropout=self.config.train.dropout)
        if self.config.train.grad_checkpointing:
            self._checkpoint_gradients(backbone)
        model = self.module.prepare(model, self.config)
        freeze_stages(model, self.config.train.freeze_stages, self.config.train.freeze_norm_stats)
        if self.config.train.channels_last:
            model = model.to(memory_format=torch.channels_last)  # 2-6x faster CNN training on CPU (oneDNN)
        return prepare_model(model, self.config.train.precision, self.device).to(self.device)

    # -- evaluation --------------------------------------------------------------------------------
    def predict(self, model: Classifier, images: torch.Tensor, tta: bool, batch_size: int | None = None) -> np.ndarray:
        """Probabilities of ``images`` (uint8 patches), averaged over the TTA views; an out-of-memory error names the
        batch-size knob."""
        batch_size = batch_size or self.config.train.eval_batch_size
        try:
            return self._predict(model, images, tta, batch_size)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            raise MitobenchError(
                f"out of memory on {self.device} predicting {len(images)} images at batch size {batch_size} "
                f"({self.config.model}, {self.config.train.img_size} px). Lower it (e.g. N={max(1, batch_size // 4)}): "
                "in `mitobench run`, continue with `mitobench run --resume RUN_DIR --set train.eval_batch_size=N` "
                "(finished folds are kept); in `mitobench predict`, pass --batch-size N.") from exc

    @torch.inference_mode()
    def _predict(self, model: Classifier, images: torch.Tensor, tta: bool, batch_size: int) -> np.ndarray:
        model.eval()
        size = self.config.train.img_size
        views = range(8) if tta else range(1)
        crops = self.config.train.tta_crops if tta else [1.0]
        out = []
        prepare_model(model, self.config.train.precision, self.device)
        for start in range(0, len(images), batch_size):
            raw = images[start:start + batch_size].to(self.device)
            probs = 0
            for crop in crops:
                # the geometry the model trained on (augment.py resizes the whole patch), not the card's crop
                x = model.backbone.preprocess(centre_crop(raw, crop), size, card_crop=False)
                if self.config.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(self.config.train.precision, self.device):
                    for k in views:
                        probs = probs + torch.sigmoid(model(dihedral(x, k)).float())
            out.append((probs / (len(views) * len(crops))).cpu().numpy())
        return np.concatenate(out)

    # -- training ----------------------------------------------------------------------------------
    def fit_predict(self, fold: int, train_idx: np.ndarray, val_idx: np.ndarray, ctx, scratch: Path):
        from mitobench.protocol import FoldResult

        cfg = self.config.train
        seed = self.config.fold_seed(fold)
        torch.manual_seed(seed)
        train = ctx.sets["AMi-Br-train"]
        labels = train["label"].to_numpy()
        y_tr, y_val = labels[train_idx], labels[val_idx]
        images = self.images["AMi-Br-train"]
        x_tr, x_val = images[train_idx], images[val_idx]
        targets = torch.as_tensor(y_tr, dtype=torch.float32)
        if cfg.soft_labels:
            votes = train["p_atypical_votes"].to_numpy()[train_idx]
            targets = torch.as_tensor(np.where(np.isnan(votes), y_tr, votes), dtype=torch.float32)

        try:
            model = self._build()
            if self.device.type == "cuda":  # the uint8 cache lives on the GPU: no host copy or sync per batch
                x_tr, targets = x_tr.to(self.device), targets.to(self.device)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            raise MitobenchError(self._placing_oom_message()) from exc
        if cfg.compile:
            compile_model(model, cfg.compile_mode)
        n_pos, n_neg = int(y_tr.sum()), int(len(y_tr) - y_tr.sum())
        from mitobench.methods import losses  # looked up per fold, so a loss can be swapped in

        loss_fn = losses.make_loss(cfg.loss, n_neg / max(n_pos, 1), cfg.focal_gamma, cfg.label_smoothing)
        groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
        batches_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)  # optimiser steps: the last window may be short
        total_steps = steps_per_epoch * cfg.epochs
        warmup = int(cfg.warmup_epochs * steps_per_epoch)
        if cfg.optimizer == "adamw":
            opt = make_optimizer(torch.optim.AdamW, groups, cfg.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) *
                                                      0.5 * (1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total_steps - warmup)))))
            plateau = None
        elif cfg.optimizer == "adam":
            opt = make_optimizer(torch.optim.Adam, groups, cfg.lr)
            sched = None
            # the plateau waits 3 epochs, counted in evaluations: more than 3 epochs without improvement halve the lr
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, min_lr=1e-7,
                                                                 patience=max(0, math.ceil(4 / cfg.eval_every) - 1))
        else:
            raise MitobenchError(f"unknown optimizer {cfg.optimizer!r}: use adamw or adam")
        augment = BatchAugment(PRESETS[cfg.augment] if isinstance(cfg.augment, str) else cfg.augment, cfg.img_size,
                               stream_seed(seed, "augment"))
        gen = torch.Generator().manual_seed(stream_seed(seed, "sampler"))  # the sampler's and mixup's draws
        # use_buffers: BatchNorm running statistics are averaged like the weights (as timm's ModelEma does)
        # instead of being copied from the raw model.
        try:
            ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
                                                      use_buffers=True) if cfg.ema else None
        except RuntimeError as exc:  # a second copy of the model
            if not is_out_of_memory(exc):
                raise
            raise MitobenchError(self._placing_oom_message() + " Or leave train.ema unset: it keeps a second copy "
                                 "of the model.") from exc

        state = {"epoch": 0, "best": -1.0, "best_auc": -1.0, "best_epoch": 0, "since": 0, "history": []}
        val_by_epoch: list[np.ndarray] = []  # every evaluated epoch's validation probabilities (selection analyses)
        ckpt = scratch / "last.pt"
        best_path = scratch / "best.pt"
        if ckpt.is_file():  # resume inside the fold
            saved = load_fold_checkpoint(ckpt)
            if saved.get("backbone_weights", self.weights_id) != self.weights_id:  # frozen weights are rebuilt
                raise MitobenchError(
                    f"{ckpt} was trained on backbone weights {saved['backbone_weights']!r}, but {self.config.model} "
                    f"now builds with {self.weights_id!r} (weights found, moved or changed since the fold started): "
                    f"its adapters and head would continue on other frozen weights. Delete the folder {scratch} and "
                    "resume the run to train the fold again, or restore the weights the run started with.")
            load_trained_state(model, saved["model"], ckpt)
            opt.load_state_dict(saved["opt"])
            if sched is not None:
                sched.load_state_dict(saved["sched"])
            if plateau is not None:
                plateau.load_state_dict(saved["plateau"])
            if ema is not None and "ema" in saved:
                load_trained_state(ema, saved["ema"], ckpt)
            augment.set_state(saved["aug_rng"])
            gen.set_state(saved["gen_rng"])
            torch.set_rng_state(saved["torch_rng"])
            if self.device.type == "cuda" and "cuda_rng" in saved:  # dropout and drop-path draw on the GPU there
                torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
            state = json.loads(saved["state"])
            val_by_epoch = list(saved["val_by_epoch"].numpy()) if "val_by_epoch" in saved else []
            say(f"fold {fold}: resumed after epoch {state['epoch']}")
        settle_best(scratch, state["best_epoch"] if ckpt.is_file() else None)

        weights = torch.as_tensor(1.0 / np.bincount(y_tr, minlength=2)[y_tr], dtype=torch.double)
        precision = resolve_precision(cfg.precision, self.device)  # once, not at every step
        t_train, n_seen = 0.0, 0
        # On CUDA, reading the loss (is it finite?) would wait for the GPU at every step, so the check is kept on
        # the device and read every NONFINITE_CHECK_EVERY steps and at the end of each epoch.
        check_every = nonfinite_check_every(self.device)
        while state["epoch"] < cfg.epochs and state["since"] < cfg.patience:
            model.train()
            t0 = time.perf_counter()
            if cfg.sampler == "weighted":
                order = torch.multinomial(weights, len(y_tr), replacement=True, generator=gen)
            else:
                order = torch.randperm(len(y_tr), generator=gen)
            order = order.to(x_tr.device)
            nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
            n_steps = math.ceil(len(order) / cfg.batch_size)
            with progress_bar(f"fold {fold} epoch {state['epoch'] + 1}/{cfg.epochs}", len(order)) as advance:
                for step, start in enumerate(range(0, len(order), cfg.batch_size)):
                    idx = order[start:start + cfg.batch_size]
                    advance(len(idx))
                    window_start = step - step % cfg.grad_accum  # micro-batches summed into one optimiser step
                    window = min(cfg.grad_accum, n_steps - window_start)  # fewer at the end of the epoch
                    try:  # augmentation, forward, backward and optimiser step: an OOM anywhere names the knobs
                        x = augment(x_tr[idx].to(self.device))
                        x = (x - model.backbone._mean) / model.backbone._std
                        y = targets[idx].to(self.device)
                        if cfg.mixup:
                            x, y, _ = mixup(x, y, cfg.mixup, gen)
                        if cfg.channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        with autocast(precision, self.device):
                            loss = loss_fn(model(x).float(), y) / window
                        nonfinite |= ~torch.isfinite(loss)
                        if ((step + 1) % check_every == 0 or step + 1 == n_steps) and nonfinite:
                            # on CUDA the flag is read every few steps: the first bad step may be a few steps back
                            raise FoldFailedError(f"fold {fold}: the loss became non-finite (NaN or inf) in epoch "
                                                  f"{state['epoch'] + 1}; this fold was stopped, the other folds go on. "
                                                  "Lower the learning rate (train.lr) or train in float32 "
                                                  "(train.precision=fp32).")
                        loss.backward()
                        if step + 1 == window_start + window:  # an epoch's gradients never carry into the next
                            opt.step()  # where Adam allocates its state: an OOM here names the same knobs
                            opt.zero_grad(set_to_none=True)
                            if sched is not None:
                                sched.step()
                            if ema is not None:
                                ema.update_parameters(model)
                    except RuntimeError as exc:
                        if not is_out_of_memory(exc):
                            raise
                        raise MitobenchError(self._oom_message(exc)) from exc
                    n_seen += len(idx)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the last step's backward and optimiser step are still queued
            t_train += time.perf_counter() - t0
            state["epoch"] += 1
            eval_model = ema.module if ema is not None else model
            if state["epoch"] % cfg.eval_every == 0 or state["epoch"] == cfg.epochs:
                p_val = self.predict(eval_model, x_val, tta=False)
                if not np.isfinite(p_val).all():
                    raise FoldFailedError(f"fold {fold}: the model predicted non-finite probabilities (NaN or inf) on "
                                          f"the validation fold at epoch {state['epoch']}; this fold was stopped, the "
                                          "other folds go on. Lower the learning rate (train.lr) or train in float32 "
                                          "(train.precision=fp32).")
                since_last_eval = state["epoch"] - (state["history"][-1]["epoch"] if state["history"] else 0)
                ba = float(balanced_accuracy_score(y_val, p_val >= 0.5))
                auc = float(roc_auc_score(y_val, p_val))
                val_by_epoch.append(p_val.astype(np.float32))
                state["history"].append({"epoch": state["epoch"], "val_ba": ba, "val_auroc": auc,
                                         "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0})
                say(f"fold {fold} epoch {state['epoch']}/{cfg.epochs}: validation BA {ba:.4f}, AUROC {auc:.4f} "
                    f"({state['history'][-1]['seconds']:.0f} s)")
                if plateau is not None:
                    plateau.step(ba)
                eligible = state["epoch"] >= min(cfg.min_epochs, cfg.epochs)  # the last epoch always is
                if improves(cfg.select, ba, auc, state["best"], state["best_auc"]) and eligible:
                    state.update(best=ba, best_auc=auc, best_epoch=state["epoch"], since=0)
                    self._atomic_torch_save(trained_state(eval_model), staged_best(scratch, state["epoch"]))
                elif eligible:
                    state["since"] += since_last_eval  # patience is in epochs, also when evaluating every k
            self._atomic_torch_save({"model": trained_state(model), "backbone_weights": self.weights_id,
                                     "opt": opt.state_dict(),
                                     "sched": sched.state_dict() if sched is not None else {},
                                     "plateau": plateau.state_dict() if plateau is not None else {},
                                     **({"ema": trained_state(ema)} if ema is not None else {}),
                                     "aug_rng": augment.state(), "gen_rng": gen.get_state(),
                                     "torch_rng": torch.get_rng_state(), "state": json.dumps(state),
                                     **({"cuda_rng": torch.cuda.get_rng_state(self.device)}
                                        if self.device.type == "cuda" else {}),
                                     **({"val_by_epoch": torch.from_numpy(np.stack(val_by_epoch))} if val_by_epoch else {})},
                                    ckpt)
            settle_best(scratch, state["best_epoch"])

        final = ema.module if ema is not None else model
        if not best_path.is_file():  # the last epoch is always evaluated and eligible: a damaged fold folder
            raise MitobenchError(f"{best_path} is missing although fold {fold} finished; delete {scratch} and resume "
                                 "to train the fold again.")
        load_trained_state(final, load_fold_checkpoint(best_path), best_path)
        self.module.save(final, scratch)
        probs = {"validation": self.predict(final, x_val, cfg.tta)}
        if val_by_epoch:  # rows follow info["history"]; no TTA
            probs["validation_by_epoch"] = np.stack(val_by_epoch)
        for name in ctx.holdouts:
            probs[name] = self.predict(final, self.images[name], cfg.tta)
        info = {"best_epoch": state["best_epoch"], "best_val_ba": state["best"], "epochs_run": state["epoch"],
                "history": state["history"], "train_images_per_s": n_seen / t_train if t_train else None,
                "pretrained": self.pretrained, "backbone_weights": self.weights_id}
        return FoldResult(probs, info)

    def _placing_oom_message(self) -> str:
        return (f"out of memory on {self.device} placing {self.config.model} ({self.config.method}) and the training "
                f"patches there, before any step: the model itself does not fit (train.precision="
                f"{self.config.train.precision}). Use a device with more memory, --method lora with train.precision=bf16 "
                "(its frozen weights are stored in bf16, half the memory), or --device cpu.")

    def _oom_message(self, exc: Exception) -> str:
        cfg = self.config.train
        return (f"out of memory on {self.device} at batch size {cfg.batch_size} ({self.config.model}, {cfg.img_size} px). "
                f"Lower train.batch_size (e.g. {max(1, cfg.batch_size // 2)}) and raise train.grad_accum "
                f"(e.g. {cfg.grad_accum * 2}) to keep the effective batch, or set train.grad_checkpointing: true, in a new "
                "run: every fold of a run trains with one recipe, so `--resume` keeps these settings.")

    @staticmethod
    def _atomic_torch_save(obj, path: Path) -> None:
        from mitobench.io import atomic_write

        atomic_write(path, lambda p: torch.save(obj, p))
