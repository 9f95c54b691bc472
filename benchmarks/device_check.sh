#!/usr/bin/env bash
# One prepared GPU/TPU check for the kernels (≈ 10 min on an H100/H200): the compiled-kernel
# tests, then the fused refit/apply and whole-step timings. Results go to $OUT (or ./out).
#   bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
python -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/device.txt"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_fused_dispatch.py \
    tests/test_ops.py -k "compiled or lowers" 2>&1 | tail -5 | tee "$out/tests.txt"
timeout 300 python benchmarks/fused_kernels.py --geometries PRO,EQ --json "$out/fused.json" \
    2>&1 | tee "$out/fused.txt"
timeout 240 python benchmarks/kernels.py --step 256,512 --step-geometry PRO,EQ \
    --step-kernels False,True --reps 5 2>&1 | tee "$out/step.txt"
