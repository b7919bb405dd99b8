#!/usr/bin/env bash
# The main job on a fresh machine: set up, find (or download) the data, run the default benchmark.
# Data: $MITOBENCH_DATA if set; else ../shared/data when present beside the clone; else the per-user
# cache folder, filled by `mitobench data fetch` (public archive, about 200 MB) when AMi-Br is missing.
# Extra arguments go to `mitobench run` (e.g. --method finetune --preset cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${MITOBENCH_DATA:-}" ] && [ -d ../shared/data/AMi-Br ]; then
    MITOBENCH_DATA="$(cd ../shared/data && pwd)"
    export MITOBENCH_DATA
fi
if ! .venv/bin/python -c "import sys; from mitobench.data.records import resolve_data_root as r; sys.exit(0 if (r() / 'AMi-Br').is_dir() else 1)"; then
    .venv/bin/mitobench data fetch
fi
exec .venv/bin/mitobench run "$@"
