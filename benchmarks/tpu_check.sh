#!/usr/bin/env bash
# The whole TPU check, one shot (< 10 min on a TPU VM, e.g. v5e-1 or v6e-1). Not yet run on a
# TPU (none was lent to this project): documented, not claimed. Each part prints one JSON line;
# the last line of the log is one JSON object with every result:
#   1. environment (jax sees a TPU; installs jax[tpu] only if it does not),
#   2. kernel vs reference: tests/test_kernels.py with the TPU-style kernel compiled by Mosaic,
#   3. decode attention bandwidth as a fraction of the chip's HBM bandwidth: benchmarks/kernels.py,
#   4. fused ICaRus decode step vs the conventional step: benchmarks/device_steps.py,
#   5. one workflow point (ICaRus vs multi-LoRA, N = 4): benchmarks/workflow_cpu.py on this device.
# Usage, from the repo root:  OUT=/some/dir bash benchmarks/tpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/icarus_tpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/tpu_check.log") 2>&1
date -u
if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'tpu')"; then
  echo "jax has no TPU backend here; installing jax[tpu]"
  $PY -m pip install -q -U "jax[tpu]>=0.10.2,<0.11" absl-py pytest tqdm || exit 1
fi
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
echo "== 2. kernel vs reference: TPU-style kernels compiled by Mosaic"
JAX_PLATFORMS=tpu,cpu ICARUS_KERNELS_ON_DEVICE=1 timeout 200 \
  $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "tpu and not race and not real_lowerings"
rc_tests=$?
echo "== 3. decode attention bandwidth"
timeout 150 $PY -m benchmarks.kernels --preset=gpu --impl=tpu --iters=10 --out "$OUT/kernels_tpu.json"
rc_bench=$?
echo "== 4. fused ICaRus step vs conventional step"
timeout 120 $PY -m benchmarks.device_steps --out "$OUT/device_steps.json"; rc_steps=$?
echo "== 5. one workflow point"
timeout 150 $PY -m benchmarks.workflow_cpu --systems=icarus,multi_lora --n_models=4 --rates=1.0 \
  --workflows=16 --points="$OUT/workflow.points.jsonl" --out="$OUT/workflow.json" \
  --compilation_cache="$OUT/jax_cache"; rc_wf=$?
OUT="$OUT" $PY benchmarks/device_check_summary.py tpu "$rc_tests" "$rc_bench" "$rc_steps" "$rc_wf"
