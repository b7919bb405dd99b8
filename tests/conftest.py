"""Shared test setup: quiet output, one compute thread, caches in tmp folders, the real data when present.

Environment set here (before torch is imported) is inherited by the ``mitobench`` subprocesses the CLI
tests start:

- ``MITOBENCH_QUIET=1``: no progress bars.
- ``OMP_NUM_THREADS`` (default 1, unless already set): on a small shared CPU, oneDNN with several threads
  competing for cores is many times slower than one thread, and one thread keeps CPU results
  reproducible between processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["MITOBENCH_QUIET"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
REAL_DATA = Path(os.environ.get("MITOBENCH_DATA") or REPO.parent / "shared" / "data").resolve()
DOCS = REPO.parent / "shared" / "docs"

if str(TESTS) not in sys.path:  # ``from fixtures import ...`` in every test module
    sys.path.insert(0, str(TESTS))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Nothing a test does writes into the user's cache: MITOBENCH_CACHE points into tmp_path."""
    monkeypatch.setenv("MITOBENCH_CACHE", str(tmp_path / "mitobench-cache"))
    monkeypatch.setenv("MITOBENCH_QUIET", "1")


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The public data at ``../shared/data`` (or ``$MITOBENCH_DATA``); skips when absent."""
    if not ((REAL_DATA / "AMi-Br").is_dir() and (REAL_DATA / "amibr_train_split.csv").is_file()):
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def shared_docs() -> Path:
    if not (DOCS / "paper_folds_sklearn191.csv").is_file():
        pytest.skip(f"reference files not found in {DOCS}")
    return DOCS


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory) -> Path:
    """A complete synthetic data root (AMi-Br, AtNorM-Br, AtNorM-MD) shared read-only by many tests.

    Tests that modify a data root copy it first (``copy_root``).
    """
    from fixtures import make_data_root

    return make_data_root(tmp_path_factory.mktemp("data") / "root")


@pytest.fixture(scope="session")
def fixture_root_no_md(tmp_path_factory) -> Path:
    from fixtures import make_data_root

    return make_data_root(tmp_path_factory.mktemp("data_no_md") / "root", atnorm_md=False)


def mitobench_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600,
                  **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m mitobench.cli ARGS`` with this interpreter; returns the completed process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "mitobench.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout, **kwargs)


@pytest.fixture
def cli(tmp_path):
    """``cli(*args)`` runs the command with MITOBENCH_CACHE in tmp_path and cwd = tmp_path."""

    def run(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
        merged = {"MITOBENCH_CACHE": str(tmp_path / "mitobench-cache"), "MITOBENCH_QUIET": "1", **(env or {})}
        kwargs.setdefault("cwd", tmp_path)
        return mitobench_cli(*args, env=merged, **kwargs)

    return run
