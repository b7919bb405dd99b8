#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with mitobench and its test tools.
# torch/torchvision are pinned to the releases this project is tested with (2.14.1 / 0.29.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
