"""Shared helpers for the benchmark scripts: machine description and appending to RESULTS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs{gpu}, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{platform.platform()}")


def rescore_arguments(doc: str, what: str) -> argparse.Namespace:
    """``RUN [--data-root DIR] [--append]``: the arguments of a script that rescores a finished run folder."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data-root", help="where the label files are, if not the run's data root")
    parser.add_argument("--append", action="store_true", help=f"append {what} to benchmarks/RESULTS.md")
    return parser.parse_args()


def append_results(heading: str, body: str) -> None:
    """Append one dated section (command, machine, figures) under ``heading`` in RESULTS.md."""
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nAppend-only; every entry names its command, date and machine.\n"
    if heading not in text:
        text += f"\n{heading}\n"
    entry = (f"\n### {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}\n\n- command: `{command}`\n"
             f"- machine: {machine()}\n\n{body.strip()}\n")
    # insert at the end of this heading's section
    start = text.index(heading) + len(heading)
    nxt = text.find("\n## ", start)
    text = text + entry if nxt == -1 else text[:nxt] + entry + text[nxt:]
    RESULTS.write_text(text)
