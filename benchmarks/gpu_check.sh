#!/usr/bin/env bash
# The whole GPU check for the Pallas kernels, one shot (< 5 min on an H100/H200):
#   1. environment (jax sees a GPU; installs jax[cuda13] only if it does not),
#   2. correctness: tests/test_kernels.py with the GPU-style cases on the real Triton lowering,
#   3. timings: benchmarks/kernels.py (decode sweep + ragged prefill) -> JSON.
# Usage, from the repo root:  OUT=/some/dir bash benchmarks/gpu_check.sh
# Results: $OUT/kernels_gpu.json, $OUT/gpu_check.log (copy both into docs/results/).
set -uo pipefail
OUT=${OUT:-/tmp/icarus_gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "jax has no GPU backend here; installing jax[cuda13]"
  $PY -m pip install -q -U "jax[cuda13]>=0.10.2" absl-py pytest || exit 1
fi
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
echo "== correctness: GPU-style kernels compiled (Triton), TPU-style in the interpreter"
JAX_PLATFORMS=cuda,cpu ICARUS_KERNELS_ON_DEVICE=1 timeout 150 \
  $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "not tpu" ; rc_tests=$?
echo "== timings"
timeout 180 $PY -m benchmarks.kernels --preset=gpu --iters=10 --out "$OUT/kernels_gpu.json"
rc_bench=$?
echo "tests rc=$rc_tests bench rc=$rc_bench"
exit $(( rc_tests || rc_bench ))
