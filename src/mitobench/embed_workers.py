"""CPU embedding in single-threaded worker processes.

On a small CPU, k single-threaded processes embed far faster than one process with k threads (2 cores,
EfficientNet-Lite0 at 224 px: 158 vs 95 images/s): depthwise convolutions on small batches parallelise
badly inside one model. The workers are plain ``python -c`` subprocesses that talk pickles over their
stdin/stdout: unlike ``multiprocessing``'s spawn they never re-run the caller's ``__main__`` (a user's
script without an ``if __name__ == "__main__"`` guard still works), and unlike fork they never inherit
torch's thread pools. Each worker gets the model once and is kept for the next dataset of the same
backbone; when the parent dies, a worker's stdin closes and it exits.
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from mitobench.models.registry import Backbone

CPU_WORKER_BATCH = 4  # single-threaded: the batch that stays in cache (fastest measured here)
MIN_IMAGES_PER_WORKER = 128  # below this a worker's start-up (~3 s) costs more than it saves
CHUNK = 64  # images per request: the progress bar stays live, little is queued
_STATE: dict = {}


class WorkerError(RuntimeError):
    """A worker could not start, could not take the model, or died; the caller embeds in-process instead."""


class _Worker:
    def __init__(self):
        self.log = tempfile.TemporaryFile()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", "from mitobench.embed_workers import serve; serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env)

    def send(self, obj, raw: bool = False) -> None:
        try:
            self.proc.stdin.write(obj if raw else pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"embedding worker exited: {self.stderr_tail()}") from exc

    def receive(self):
        try:
            status, value = pickle.load(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError, OSError) as exc:
            raise WorkerError(f"embedding worker exited: {self.stderr_tail()}") from exc
        if status != "ok":
            raise WorkerError(value)
        return value

    def stderr_tail(self) -> str:
        self.log.seek(0)
        text = self.log.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-3:]) or "no message"

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):  # a worker starved of CPU may take longer to exit
            self.proc.kill()
            self.proc.wait()  # SIGKILL: returns at once, and leaves no zombie behind
        self.log.close()


def _payload(backbone: "Backbone", batch_size: int, dtype, freeze: bool) -> bytes:
    """The model and what the worker needs to embed with it. The card travels without its build and
    loading callables (closures do not pickle, and the model is already built)."""
    import dataclasses

    card = dataclasses.replace(backbone.card, builder=None, weights_loader=None, weights_path=None,
                               state_dict_filter=None)
    try:
        return pickle.dumps((backbone.model.cpu(), card, backbone.weights_id, backbone.weights_source, batch_size,
                             dtype, freeze), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise WorkerError(f"the model cannot be sent to a worker process ({exc})") from exc


def extract_in_workers(backbone: "Backbone", patches: np.ndarray, batch_size: int | None, dtype, freeze: bool,
                       workers: int, advance: Callable[[int], None]) -> np.ndarray:
    """Embeddings of ``patches`` computed by ``workers`` processes, in order."""
    batch_size = batch_size or CPU_WORKER_BATCH
    key = (id(backbone), backbone.weights_id, repr(backbone.card.recipe()), workers, batch_size, str(dtype), freeze)
    if _STATE.get("key") != key:
        shutdown()
        payload = _payload(backbone, batch_size, dtype, freeze)
        _STATE.update(key=key, workers=[_Worker() for _ in range(workers)])  # all start importing torch at once
        for worker in _STATE["workers"]:
            worker.send(payload, raw=True)
        for worker in _STATE["workers"]:
            worker.receive()  # "ready": the model loaded
    chunks: queue.Queue = queue.Queue()
    for start in range(0, len(patches), CHUNK):
        chunks.put(start)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def drive(worker: _Worker) -> None:
        while not errors:
            try:
                start = chunks.get_nowait()
            except queue.Empty:
                return
            try:
                worker.send(np.ascontiguousarray(patches[start:start + CHUNK]))
                feats = worker.receive()
            except BaseException as exc:  # noqa: BLE001  (reported by the caller's thread)
                errors.append(exc)
                return
            with lock:
                results[start] = feats
                advance(len(feats))

    threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in _STATE["workers"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        shutdown()
        raise errors[0] if isinstance(errors[0], WorkerError) else WorkerError(str(errors[0]))
    return np.concatenate([results[s] for s in sorted(results)])


def shutdown() -> None:
    """Stop the workers (the probe calls this once every dataset is embedded)."""
    for worker in _STATE.pop("workers", []):
        worker.close()
    _STATE.clear()


def serve() -> None:
    """A worker's loop: read the model, then embed every chunk sent until stdin closes."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to the log, never into the result stream
    source = sys.stdin.buffer

    def reply(status: str, value) -> None:
        pickle.dump((status, value), out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    import torch

    from mitobench.embed import _embed_batches
    from mitobench.models.registry import Backbone

    torch.set_num_threads(1)
    try:
        model, card, weights_id, source_name, batch_size, dtype, freeze = pickle.load(source)
        backbone = Backbone(model, card, weights_id, source_name).eval()
    except Exception as exc:  # noqa: BLE001
        reply("error", f"could not load the model: {exc!r}")
        return
    reply("ok", "ready")
    network = None
    while True:
        try:
            chunk = pickle.load(source)
        except EOFError:
            return
        try:
            with torch.inference_mode():
                feats, network = _embed_batches(backbone, chunk, batch_size, torch.device("cpu"), dtype, freeze,
                                                lambda n: None, network)
            reply("ok", feats)
        except Exception as exc:  # noqa: BLE001
            reply("error", f"embedding failed: {exc!r}")
