#!/usr/bin/env bash
# The whole GPU check, one shot (< 10 min on an H100/H200). Each part prints one JSON line; the
# last line of the log is one JSON object with every result:
#   1. environment (jax sees a GPU; installs jax[cuda13] only if it does not),
#   2. kernel vs reference: tests/test_kernels.py, GPU-style cases on the real Triton lowering,
#   3. decode attention bandwidth as a fraction of the chip's HBM bandwidth: benchmarks/kernels.py,
#   4. fused ICaRus decode step vs the conventional step: benchmarks/device_steps.py,
#   5. one workflow point (ICaRus vs multi-LoRA, N = 4): benchmarks/workflow_cpu.py on this device.
# Usage, from the repo root:  OUT=/some/dir bash benchmarks/gpu_check.sh
# Results: $OUT/*.json and $OUT/gpu_check.log (copy them into docs/results/).
set -uo pipefail
OUT=${OUT:-/tmp/icarus_gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "jax has no GPU backend here; installing jax[cuda13]"
  $PY -m pip install -q -U "jax[cuda13]>=0.10.2,<0.11" absl-py pytest tqdm || exit 1
fi
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
echo "== 2. kernel vs reference: GPU-style kernels compiled (Triton), TPU-style in the interpreter"
JAX_PLATFORMS=cuda,cpu ICARUS_KERNELS_ON_DEVICE=1 timeout 150 \
  $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "not tpu and not real_lowerings"
rc_tests=$?
echo "== 3. decode attention bandwidth"
timeout 150 $PY -m benchmarks.kernels --preset=gpu --iters=10 --out "$OUT/kernels_gpu.json"
rc_bench=$?
echo "== 4. fused ICaRus step vs conventional step"
timeout 120 $PY -m benchmarks.device_steps --out "$OUT/device_steps.json"; rc_steps=$?
echo "== 5. one workflow point"
timeout 150 $PY -m benchmarks.workflow_cpu --systems=icarus,multi_lora --n_models=4 --rates=1.0 \
  --workflows=16 --points="$OUT/workflow.points.jsonl" --out="$OUT/workflow.json" \
  --compilation_cache="$OUT/jax_cache"; rc_wf=$?
OUT="$OUT" $PY benchmarks/device_check_summary.py gpu "$rc_tests" "$rc_bench" "$rc_steps" "$rc_wf"
