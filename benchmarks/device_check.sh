#!/usr/bin/env bash
# Accelerator check: the scoring, merge and D2C-iteration benchmarks on whatever
# device JAX sees first (GPU, TPU, or the CPU), unmodified engine code.
#
#   benchmarks/device_check.sh            # writes benchmarks/results/device_<platform>_*.json
#   PYTHON=.venv/bin/python SIZES="40 160" benchmarks/device_check.sh
#
# Needs no model file: bench_scale times the scoring kernel on random weights of
# SmolLM2-135M's shape, merges synthetic SmolLM2-shaped libraries and scores a D2C
# iteration with the test suite's tiny model. bench_merge (synthetic adapters, PEFT
# as the peer, on the CPU) runs when torch and peft are installed. Install JAX for
# the accelerator first (for NVIDIA GPUs: pip install -e '.[cuda]').
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SIZES=${SIZES:-40 160 1000}
# bench_scale runs each size in its own process: none may take the whole GPU memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

platform=$("$PY" -c 'import jax; print(jax.devices()[0].platform)')
"$PY" -c 'import jax; print("JAX", jax.__version__, "devices:", jax.devices())'
# shellcheck disable=SC2086  # SIZES is a list
"$PY" benchmarks/bench_scale.py --sizes $SIZES --max-sets 400 --repeat 3 \
    --out "device_${platform}_scale"
if "$PY" -c 'import torch, peft' 2>/dev/null; then
    "$PY" benchmarks/bench_merge.py --quick --out "device_${platform}_merge"
else
    echo "torch or peft missing: bench_merge skipped"
fi
echo "results: benchmarks/results/device_${platform}_*.json"
