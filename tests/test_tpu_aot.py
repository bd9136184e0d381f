"""The kernels and the whole serving and training steps compiled by libtpu for real TPU
topologies (ahead of time, compile-only devices, no TPU here), and lowered for CUDA.

Oracle: the TPU compiler itself (Mosaic's layout verifier, libtpu's HBM limit and buffer
assignment) and the optimized HLO it returns: a program passes only if libtpu compiles it, it
fits the chip, and no instruction copies, transposes or moves (collectives) a buffer shaped like
the KV pool or one device's shard of it. XLA:CPU and Pallas interpret mode cannot see any of
these (they accepted the previous kernel that libtpu rejects at every shape, and a layout that
libtpu copies in every layer). Compile times are seconds per case; the 8B cases are shapes only.
Skipped, with the reason, only where libtpu is not installed (CI installs it:
``requirements-aot.txt``).
"""


import jax.numpy as jnp
import pytest

from icarus_jax.bench import aot
from icarus_jax.model.config import ModelConfig
from icarus_jax.serving import cost_model

_MISSING = aot.libtpu_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

LLAMA8B = ModelConfig.from_preset("llama-3.1-8b")
# Real head layouts, shapes only. Compile time does not grow with layers (the layer scan).
KERNELS = [
    aot.KernelCase("llama-3.1-8b decode", 32, 8, 128, T=2),                  # fused ICaRus step
    aot.KernelCase("llama-3.1-8b fan-out", 32, 8, 128, T=8, splits=4),      # 7 adapters + encoder
    aot.KernelCase("llama-3.1-8b prefill", 32, 8, 128, T=33, q_block=16, window=4096),
    aot.KernelCase("qwen2.5-7b decode ps32", 28, 4, 128, T=1, page_size=32),
    aot.KernelCase("smollm2 prefill", 9, 3, 64, T=33, q_block=16),
    aot.KernelCase("llama-3.1-8b decode f32", 32, 8, 128, T=2, dtype="float32"),
]
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


@pytest.mark.parametrize("chip", ["v5e:2x2", "v6e:2x4"])
@pytest.mark.parametrize("k", KERNELS, ids=lambda k: k.label)
def test_tpu_kernel_compiles_with_libtpu(k, chip):
  r = aot.compile_kernel_tpu(k, chip)
  assert r.ok, r.error
  assert r.code_bytes > 0


@pytest.mark.parametrize("k", KERNELS[:3], ids=lambda k: k.label)
def test_gpu_kernel_lowers_to_triton(k):
  r = aot.export_kernel_cuda(k)
  assert r.ok, r.error
  assert r.extra["triton_calls"] >= 1


def _budget_pages(topology: str, model: int) -> int:
  """The KV pool ``cost_model.kv_budget`` gives one model-parallel group (``model`` chips hold
  one copy of the weights and one pool; the data axis replicates both)."""
  hw = cost_model.HARDWARE["tpu-" + aot.chip(topology)]
  return cost_model.kv_budget(LLAMA8B, hw, chips=model, adapter_slots=8, lora_rank=16).kv_pages


# Every mode x backend x bucket on v6e; ICaRus (the shipped mode) on v5e as well (the isolated
# baseline's step differs only by where the adapter applies, not by the pool's layout): CI time.
@pytest.mark.parametrize("bucket", ["decode", "prefill"])
@pytest.mark.parametrize("backend", ["reference", "pallas"])
@pytest.mark.parametrize("topology,mode", [("v5e:2x4", "icarus"), ("v6e:2x4", "icarus"),
                                           ("v6e:2x4", "isolated")])
def test_llama8b_serving_step_compiles_fits_and_keeps_the_pool_in_place(topology, mode, backend,
                                                                       bucket):
  """Llama-3.1-8B, bf16, data 2 x model 4, 8 adapter slots of rank 16, the pool kv_budget gives:
  libtpu compiles the runner's own sharded step, it fits HBM, its temporaries are under 10% of
  the pool, and no instruction copies or moves a pool-shaped buffer."""
  pages = _budget_pages(topology, 4)
  B, T, N = (64, 1, 512) if bucket == "decode" else (4, 512, 64)
  c = aot.StepCase(LLAMA8B, topology=topology, data=2, model=4, mode=mode, backend=backend,
                   B=B, T=T, N=N, num_pages=pages)
  r = aot.compile_serving_step(c)
  assert r.ok, r.error
  assert r.peak_bytes <= aot.HBM_LIMIT[aot.chip(topology)], (r.peak_bytes, pages)
  assert r.temp_bytes < 0.10 * r.extra["pool_bytes_per_device"], (r.temp_bytes,
                                                                    r.extra["pool_bytes_per_device"])
  assert not r.pool_copies, r.pool_copies[:3]
  assert not r.pool_collectives, r.pool_collectives[:3]


def _small_8b_heads(layers=2):
  """Llama-3.1-8B's head layout and widths with 2 layers and a small vocabulary: the pool's
  per-device tiling (what decides layout copies) is the 8B one; compiles in about a second."""
  return LLAMA8B.replace(name="llama-8b-heads-2l", num_layers=layers, vocab_size=4096)


@pytest.mark.parametrize("backend", ["reference", "pallas"])
@pytest.mark.parametrize("mesh", [m for m in MESHES if m != (2, 4)],
                         ids=lambda m: f"data{m[0]}xmodel{m[1]}")
@pytest.mark.parametrize("topology", ["v6e:2x4"])
def test_pool_in_place_on_every_mesh(topology, mesh, backend):
  """The TPU twin of tests/test_kv_in_place.py: for every (data, model) split of 8 chips, decode
  and prefill buckets, the compiled step has no pool-shaped copy, transpose or collective, and
  its temporaries do not grow when the pool grows 8x (each device's 0.5 -> 4 GiB). Data 2 x
  model 4 is the full Llama-3.1-8B test above (same checks, temporaries under 10% of the real
  pool, both chips, both backends): not compiled twice. The other splits run on v6e only (the
  per-chip tiling is covered by the 8B test on both chips): CI's time is finite."""
  cfg = _small_8b_heads()
  # Per-device pools of 0.5 and 4 GiB: larger than VMEM (128 MiB), so libtpu cannot stage the
  # whole pool on chip (it prefetches a pool that small into VMEM, a copy that real pools never
  # see), and both fit the chip.
  page_bytes = 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 2 // mesh[1]
  for B, T, N, sizes in ((16, 1, 64, (2**29, 2**32)), (8, 64, 16, (2**32,))):
    temps = []
    for pages in (n // page_bytes for n in sizes):
      c = aot.StepCase(cfg, topology=topology, data=mesh[0], model=mesh[1], backend=backend,
                       B=B, T=T, N=N, num_pages=pages)
      r = aot.compile_serving_step(c)
      assert r.ok, r.error
      assert not r.pool_copies, (c.name, r.pool_copies[:3])
      assert not r.pool_collectives, (c.name, r.pool_collectives[:3])
      temps.append(r.temp_bytes)
    if len(temps) == 2:  # decode: flat from a 0.5 to a 4 GiB pool (prefill: the copy check)
      small_pool = r.extra["pool_bytes_per_device"] / 8
      assert abs(temps[1] - temps[0]) < 0.01 * small_pool, (c.name, temps)


def test_sharded_attention_owns_its_rows():
  """Under data x model the attention runs per device on its own rows and heads: the compiled
  decode step moves no pool-shaped buffer and gathers no page table or query over ``data``
  (each device's attention input is its row shard)."""
  cfg = _small_8b_heads()
  c = aot.StepCase(cfg, topology="v5e:2x4", data=2, model=4, backend="pallas", B=16, T=1, N=64,
                   num_pages=2_000)
  lowered, mesh, _ = aot.lower_serving_step(c)
  text = lowered.as_text()
  # The shard_map body sees 8 of the 16 rows ([8, ...] page table and query shards).
  assert "tensor<8x64xi32>" in text, "page table not split over data inside shard_map"


def test_icarus_lora_training_step_compiles_and_fits():
  r = aot.compile_train_step(LLAMA8B, "v5e:2x4", 2, 4, batch=8, seq=512)
  assert r.ok, r.error
  assert r.peak_bytes <= aot.HBM_LIMIT["v5e"], r.peak_bytes


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_serving_step_lowers_for_cuda(backend):
  """The unsharded step (one GPU) through ``jax.export(platforms=["cuda"])``: the Pallas backend
  lowers every attention call to Triton."""
  cfg = _small_8b_heads()
  r = aot.export_serving_step_cuda(aot.StepCase(cfg, backend=backend, B=8, T=1, N=64,
                                                num_pages=256))
  assert r.ok, r.error
  assert (r.extra["triton_calls"] >= 1) == (backend == "pallas")


def _write_kv_head_window(pool, k, v, table, positions, valid):
  """The previous K/V write: one scatter whose window is a slot's whole ``[2K, hd]`` block."""
  ps = pool.shape[2]
  pidx = jnp.take_along_axis(table, jnp.clip(positions // ps, 0, table.shape[1] - 1), axis=1)
  pidx = jnp.where(valid, pidx, pool.shape[0])
  B, T, K, hd = k.shape
  kv = jnp.stack([k, v], axis=3).reshape(B, T, 2 * K, hd).astype(pool.dtype)
  return pool.at[pidx, :, positions % ps].set(kv, mode="drop")


def test_the_checks_catch_a_layout_that_copies_the_pool(monkeypatch):
  """The checker against a known-bad program: with the K/V write's scatter window over the head
  axis, libtpu lays the pool out head-second-minor for the scatter and copies it to the
  attention's layout in every step; the test above must see that copy."""
  from icarus_jax.serving import engine_steps
  monkeypatch.setattr(engine_steps, "write_kv", _write_kv_head_window)
  c = aot.StepCase(_small_8b_heads(), topology="v5e:2x4", data=2, model=4, B=16, T=1, N=64,
                   num_pages=2**32 // (2 * 2 * 16 * 8 * 128 * 2 // 4))
  r = aot.compile_serving_step(c)
  assert r.ok, r.error
  assert r.pool_copies, "a pool-shaped copy went unseen"
  assert r.temp_bytes > 0.5 * r.extra["pool_bytes_per_device"]
