"""Linear probes on cached embeddings, with a scikit-learn estimator API.

``LogisticProbe``: standardised features, logistic regression with balanced class weights, C chosen by
an inner slide-grouped CV on the training folds only (never the validation fold, never a hold-out).
``TorchProbe``: the paper's head for parity (one linear layer, BCE, Adam 5e-5, weighted sampler,
batch 8, early stopping on the validation fold's balanced accuracy).
"""

from __future__ import annotations

import logging
import time

from typing import TYPE_CHECKING

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mitobench.config import RunConfig
from mitobench.device import cpu_workers
from mitobench.splits import inner_group_splits

if TYPE_CHECKING:  # pragma: no cover  (torch loads only for the torch head or an embedding cache miss)
    import torch

log = logging.getLogger(__name__)


class LogisticProbe(ClassifierMixin, BaseEstimator):
    def __init__(self, Cs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), inner_splits: int = 3,
                 max_iter: int = 2000, random_state: int = 42):
        self.Cs = Cs
        self.inner_splits = inner_splits
        self.max_iter = max_iter
        self.random_state = random_state

    def _model(self, C: float) -> LogisticRegression:
        return LogisticRegression(C=C, class_weight="balanced", max_iter=self.max_iter)

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> "LogisticProbe":
        # one BLAS thread: these small problems run several times faster without thread contention
        with threadpool_limits(1):
            return self._fit(X, y, groups)

    def _fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> "LogisticProbe":
        self.classes_ = np.array([0, 1])
        if groups is not None and len(self.Cs) > 1:
            scores = np.zeros(len(self.Cs))
            for tr, va in inner_group_splits(y, groups, self.inner_splits, self.random_state):
                # standardised on the inner training rows only, so the inner validation rows are truly unseen
                inner = StandardScaler().fit(X[tr])
                Z_tr, Z_va = inner.transform(X[tr]), inner.transform(X[va])
                model = self._model(self.Cs[0]).set_params(warm_start=True)  # warm-started regularisation path
                for i in np.argsort(self.Cs):
                    model.set_params(C=self.Cs[i]).fit(Z_tr, y[tr])
                    scores[i] += balanced_accuracy_score(y[va], model.predict(Z_va))
            self.inner_scores_ = scores / self.inner_splits
            self.C_ = float(self.Cs[int(np.argmax(self.inner_scores_))])
        else:
            self.C_ = float(self.Cs[0])
        self.scaler_ = StandardScaler().fit(X)
        self.model_ = self._model(self.C_).fit(self.scaler_.transform(X), y)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(self.scaler_.transform(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(int)


class TorchProbe(ClassifierMixin, BaseEstimator):
    """The reference code's linear head, on float32 features (the paper used raw fp16 features): BCE, Adam,
    batch 8 from a class-weighted sampler, ReduceLROnPlateau on validation BA (factor 0.5, patience 3), early
    stopping on validation BA."""

    def __init__(self, lr: float = 5e-5, weight_decay: float = 1e-5, batch_size: int = 8, max_epochs: int = 100,
                 patience: int = 15, standardise: bool = False, random_state: int = 42):
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.standardise = standardise
        self.random_state = random_state

    def _z(self, X: np.ndarray) -> "torch.Tensor":
        import torch

        X = self.scaler_.transform(X) if self.standardise else X
        return torch.as_tensor(X, dtype=torch.float32)

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None):
        import torch

        gen = torch.Generator().manual_seed(self.random_state)
        torch.manual_seed(self.random_state)
        self.scaler_ = StandardScaler().fit(X) if self.standardise else None
        self.classes_ = np.array([0, 1])
        Xt, yt = self._z(X), torch.as_tensor(y, dtype=torch.float32)
        head = torch.nn.Linear(X.shape[1], 1)
        opt = torch.optim.Adam(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        # the reference scripts' scheduler: halve the lr once more than 3 epochs in a row bring no better validation BA
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3, min_lr=1e-7)
        self.lr_history_ = []
        counts = np.bincount(y, minlength=2)
        weights = torch.as_tensor(1.0 / counts[y], dtype=torch.double)
        best, best_state, since = -1.0, None, 0
        for _ in range(self.max_epochs):
            order = torch.multinomial(weights, len(y), replacement=True, generator=gen)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(head(Xt[idx]).squeeze(1), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if X_val is None:
                best_state = {k: v.clone() for k, v in head.state_dict().items()}
                continue
            with torch.no_grad():
                score = balanced_accuracy_score(y_val, (head(self._z(X_val)).squeeze(1) > 0).numpy())
            self.lr_history_.append(opt.param_groups[0]["lr"])
            plateau.step(score)
            if score > best:
                best, best_state, since = score, {k: v.clone() for k, v in head.state_dict().items()}, 0
            else:
                since += 1
                if since >= self.patience:
                    break
        head.load_state_dict(best_state)
        self.head_ = head.eval()
        self.best_val_ba_ = best
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            p = torch.sigmoid(self.head_(self._z(X)).squeeze(1)).numpy()
        return np.stack([1 - p, p], axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(int)


class ProbeMethod:
    """Embeds every set once (cached on disk), then fits one probe per fold."""

    name = "probe"

    def __init__(self, config: RunConfig):
        from mitobench.models.cards import get_card

        self.config = config
        self.card = get_card(config.model)  # unknown key -> clear error before any work
        self.embeddings: dict[str, np.ndarray] = {}
        self.pretrained, self.weights_id = True, None
        self._fitted: dict[int, tuple] = {}  # folds fitted ahead by the worker pool
        self._pool_tried = False

    def prepare(self, ctx) -> None:
        from mitobench.device import device_type, dtype_name
        from mitobench.embed import EmbeddingCache
        from mitobench.models.cards import RANDOM_INIT, backbone_identity

        t0 = time.perf_counter()
        device = device_type(self.config.device)
        dtype = dtype_name(self.config.dtype, device, self.card.dtype)
        cache = EmbeddingCache(ctx.cache_dir)
        # warm path: every set already embedded with these exact weights -> no model build, no torch import
        weights_id = backbone_identity(self.config.model, self.config.weights)
        if weights_id is not None:
            for name, patches in ctx.patches.items():
                found = cache.lookup(self.card, weights_id, ctx.patch_keys[name], len(patches), dtype)
                if found is not None:
                    self.embeddings[name] = found
        self.pretrained = weights_id != RANDOM_INIT
        self.weights_id = weights_id  # recorded per fold: predict needs the same frozen backbone
        missing = [name for name in ctx.patches if name not in self.embeddings]
        if missing:
            from mitobench.device import pick_device, pick_dtype
            from mitobench.embed import shutdown_workers
            from mitobench.models.registry import create_backbone

            device = pick_device(self.config.device)
            dtype = pick_dtype(self.config.dtype, device, self.card.dtype)
            backbone = create_backbone(self.config.model, self.config.weights, allow_download=self.config.allow_download)
            self.pretrained, self.weights_id = backbone.pretrained, backbone.weights_id
            if not backbone.pretrained:  # random-init features are never cached: embed every set with this network
                missing = list(ctx.patches)
            from mitobench.data.cache import PatchCache

            patch_cache = PatchCache(ctx.cache_dir, self.config.patch_size)
            try:
                for name in missing:
                    # embedding reads every pixel, and its result is cached under the PNGs' content key: check the
                    # cached patches' digest first, so a corrupted patch array is rebuilt, not embedded for good
                    ctx.patches[name], _ = patch_cache.load(ctx.sets[name], name, verify=True)
                    self.embeddings[name] = cache.get(backbone, ctx.patches[name], ctx.patch_keys[name],
                                                      batch_size=self.config.batch_size, device=device, dtype=dtype,
                                                      name=name, workers=cpu_workers(self.config.embed_workers))
            finally:
                shutdown_workers()
        elif not self.pretrained:
            log.warning("%s: RANDOM INIT, no pretrained weights loaded", self.config.model)
        ctx.timings["embed_s"] = time.perf_counter() - t0
        ctx.timings["n_images"] = int(sum(len(p) for p in ctx.patches.values()))
        ctx.timings["probe_fit_s"] = 0.0

    def _estimator(self):
        p = self.config.probe
        if p.head == "logistic":
            return LogisticProbe(tuple(p.Cs), p.inner_splits, p.max_iter, self.config.training_seed)
        if p.head == "torch":
            return TorchProbe(p.lr, p.weight_decay, p.batch_size, p.max_epochs, p.patience, random_state=self.config.training_seed)
        from mitobench.errors import MitobenchError

        raise MitobenchError(f"unknown probe head {p.head!r}: use logistic or torch")

    def _fit_fold(self, train_idx: np.ndarray, val_idx: np.ndarray, ctx) -> tuple[dict[str, np.ndarray], dict, dict]:
        """Fit one fold's probe: its probabilities on the validation fold and every hold-out set, its info
        and its affine weights."""
        t0 = time.perf_counter()
        X = self.embeddings["AMi-Br-train"]
        train = ctx.sets["AMi-Br-train"]
        y, groups = train["label"].to_numpy(), train["group"].to_numpy()
        est = self._estimator()
        if isinstance(est, TorchProbe):
            est.fit(X[train_idx], y[train_idx], X[val_idx], y[val_idx])
        else:
            est.fit(X[train_idx], y[train_idx], groups[train_idx])
        probs = {"validation": est.predict_proba(X[val_idx])[:, 1]}
        for name in ctx.holdouts:
            probs[name] = est.predict_proba(self.embeddings[name])[:, 1]
        info = {"head": self.config.probe.head, "C": getattr(est, "C_", None),
                "best_val_ba": getattr(est, "best_val_ba_", None), "backbone_weights": self.weights_id,
                "fit_seconds": time.perf_counter() - t0}  # its own fit, also when a worker fitted it alongside others
        return probs, info, linear_weights(est)

    def _fit_remaining_in_parallel(self, first: int, ctx) -> None:
        """Fit folds ``first``..n in forked worker processes (they inherit the embeddings, nothing is copied).

        Only the logistic head on Linux: its fits are single-threaded and deterministic, so each fold's
        result is the serial one. A worker that fails leaves its fold to the serial path.
        """
        import multiprocessing as mp

        folds = [f for f in range(first, int(ctx.folds.max()) + 1) if f not in self._fitted]
        workers = min(cpu_workers(self.config.probe.workers), len(folds))
        if (workers < 2 or self.config.probe.head != "logistic"
                or "fork" not in mp.get_all_start_methods()):
            return
        global _FORKED
        _FORKED = (self, ctx)
        try:
            pool = mp.get_context("fork").Pool(workers, initializer=_default_stop_signals)
            try:
                results = pool.map_async(_fit_fold_in_worker, folds).get(timeout=PARALLEL_FIT_TIMEOUT_S)
            except BaseException:
                pool.terminate()  # stuck or interrupted: the workers die at once (default SIGTERM)
                raise
            pool.close()  # done: the idle workers exit on their own, no signal sent
            pool.join()
            for fold, result in zip(folds, results):
                self._fitted[fold] = result
        except mp.TimeoutError:
            log.warning("parallel probe fitting took over %.0f s (a stuck worker process?); fitting the folds one "
                        "by one", PARALLEL_FIT_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001  (the serial path below still fits every fold)
            log.warning("parallel probe fitting failed (%s); fitting the folds one by one", exc)
        finally:
            _FORKED = None

    def fit_predict(self, fold, train_idx, val_idx, ctx, scratch):
        from mitobench.protocol import FoldResult

        t0 = time.perf_counter()
        if not self._pool_tried:
            self._pool_tried = True
            self._fit_remaining_in_parallel(fold, ctx)
        ahead = self._fitted.pop(fold, None)
        if ahead is None or not np.array_equal(val_idx, np.flatnonzero(ctx.folds == fold)):
            ahead = self._fit_fold(train_idx, val_idx, ctx)
        else:
            ahead[1]["fitted_in_parallel"] = True
        probs, info, weights = ahead
        ctx.timings["probe_fit_s"] = ctx.timings.get("probe_fit_s", 0.0) + time.perf_counter() - t0
        save_weights(weights, scratch / "probe.safetensors")
        return FoldResult(probs, info)


_FORKED: tuple | None = None  # (ProbeMethod, Context) for forked workers, set only while a pool runs
# a pool that has not finished by then is given up for the serial path: far above a real fit (seconds to about a
# minute per fold for a 3,072-d embedding), it turns a worker that never returns into a delay, not a hung run
PARALLEL_FIT_TIMEOUT_S = 900.0


def _default_stop_signals() -> None:
    """In a forked worker, SIGTERM and SIGINT kill at once. The CLI's Python-level handler (inherited by fork)
    may never run in a worker blocked on the pool's queue lock, so ``Pool.terminate`` would wait for it forever."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fit_fold_in_worker(fold: int):
    method, ctx = _FORKED
    return method._fit_fold(np.flatnonzero(ctx.folds != fold), np.flatnonzero(ctx.folds == fold), ctx)


def linear_weights(est) -> dict[str, np.ndarray]:
    """The fitted probe as one affine map on raw embeddings: logit = x @ w + b."""
    if isinstance(est, LogisticProbe):
        w = est.model_.coef_[0] / est.scaler_.scale_
        b = est.model_.intercept_[0] - float(np.dot(est.scaler_.mean_, w))
    else:
        w = est.head_.weight.detach().numpy()[0].astype(np.float64)
        b = float(est.head_.bias.detach().numpy()[0])
        if est.scaler_ is not None:
            w = w / est.scaler_.scale_
            b = b - float(np.dot(est.scaler_.mean_, w))
    return {"weight": np.asarray(w, np.float64), "bias": np.asarray([b], np.float64)}


def save_weights(weights: dict[str, np.ndarray], path) -> None:
    from safetensors.numpy import save_file

    from mitobench.io import atomic_write

    atomic_write(path, lambda p: save_file(weights, str(p)))


def load_linear(path) -> tuple[np.ndarray, float]:
    from safetensors.numpy import load_file

    weights = load_file(str(path))
    return weights["weight"], float(weights["bias"][0])
