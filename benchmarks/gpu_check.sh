#!/usr/bin/env bash
# The prepared GPU check (issues 3 and 4): run on a CUDA machine from the repository root.
#   bash benchmarks/gpu_check.sh            # uses python3 with torch/timm/peft installed, mitobench from src/
# Prints the GPU, the embedding benchmark (gpu_embed.py), the training benchmark (gpu_train.py), then
# runs the training-engine tests with CUDA visible (the engine picks the GPU: autocast, CUDA RNG paths).
# Both benchmarks append their figures to benchmarks/RESULTS.md.
set -u
export PYTHONPATH="$PWD/src${EXTRA_SITE:+:$EXTRA_SITE}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, timm, peft; print('torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__)"
timeout 240 $PY benchmarks/gpu_embed.py --append --variants virchow2,hoptimus0 || echo "gpu_embed.py failed: $?"
timeout 300 $PY benchmarks/gpu_train.py --variants virchow2 || echo "gpu_train.py failed: $?"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_engine.py || echo "engine tests on CUDA failed: $?"
