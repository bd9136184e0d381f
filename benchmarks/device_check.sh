#!/usr/bin/env bash
# The whole device check, one shot (< 10 min on an H100/H200, or a TPU VM such as v5e-1/v6e-1;
# the TPU variant has not run yet: no TPU was lent to this project, so it is documented, not
# claimed). Each part prints one JSON line; the last line of the log is one JSON object with
# every result:
#   1. environment (jax sees the device; installs jax[cuda13] / jax[tpu] only if it does not),
#   2. kernel vs reference: tests/test_kernels.py with the device's own kernel lowering
#      (GPU: Triton, TPU-style cases in the interpreter; TPU: Mosaic),
#   3. decode attention bandwidth (benchmarks.kernels), 4. the fused ICaRus step vs the
#      conventional one (benchmarks.device_steps), 5. one workflow point (benchmarks.workflow_cpu).
# Usage, from the repo root:  OUT=/some/dir bash benchmarks/device_check.sh gpu|tpu
# Results: $OUT/*.json and $OUT/<platform>_check.log (copy them into docs/results/).
set -uo pipefail
PLATFORM=${1:?usage: device_check.sh gpu|tpu}
case "$PLATFORM" in
  gpu) JAX_PLATFORM=cuda; EXTRA="jax[cuda13]"; IMPL=""; TEST_SEL="not tpu and not real_lowerings"
       TITLE="GPU-style kernels compiled (Triton), TPU-style in the interpreter";;
  tpu) JAX_PLATFORM=tpu; EXTRA="jax[tpu]"; IMPL="--impl=tpu"
       TEST_SEL="tpu and not race and not real_lowerings"; TITLE="TPU-style kernels compiled by Mosaic";;
  *) echo "platform must be gpu or tpu, got $PLATFORM"; exit 2;;
esac
OUT=${OUT:-/tmp/icarus_${PLATFORM}_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/${PLATFORM}_check.log") 2>&1
date -u
[ "$PLATFORM" = gpu ] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; }
if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != '$PLATFORM')"; then
  echo "jax has no ${PLATFORM^^} backend here; installing $EXTRA"
  $PY -m pip install -q -U "$EXTRA>=0.10.2,<0.11" absl-py pytest tqdm || exit 1
fi
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
echo "== 2. kernel vs reference: $TITLE"
JAX_PLATFORMS=$JAX_PLATFORM,cpu ICARUS_KERNELS_ON_DEVICE=1 timeout 200 \
  $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "$TEST_SEL"
rc_tests=$?
echo "== 3. decode attention bandwidth"
timeout 150 $PY -m benchmarks.kernels --preset=gpu $IMPL --iters=10 --out "$OUT/kernels_$PLATFORM.json"
rc_bench=$?
echo "== 4. fused ICaRus step vs conventional step"
timeout 120 $PY -m benchmarks.device_steps --out "$OUT/device_steps.json"; rc_steps=$?
echo "== 5. one workflow point"
timeout 150 $PY -m benchmarks.workflow_cpu --systems=icarus,multi_lora --n_models=4 --rates=1.0 \
  --workflows=16 --points="$OUT/workflow.points.jsonl" --out="$OUT/workflow.json" \
  --compilation_cache="$OUT/jax_cache"; rc_wf=$?
OUT="$OUT" $PY benchmarks/device_check_summary.py "$PLATFORM" "$rc_tests" "$rc_bench" "$rc_steps" "$rc_wf"
