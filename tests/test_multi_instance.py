"""The conventional multi-model baseline: N instances, their memory split, time-sharing of one
GPU, no batching across models.

Oracles: hand arithmetic of the memory split from the hardware preset and the model's sizes;
the single-instance step times of the cost model (for time-sharing); the instances' own
schedule logs (for batching).
"""

import dataclasses

import pytest

from icarus_jax import IcarusError
from icarus_jax.bench.harness import run_workflows
from icarus_jax.model.config import ModelConfig
from icarus_jax.serving.cost_model import HARDWARE, kv_budget
from icarus_jax.bench.multi_instance import (MultiInstance, SharedDeviceInstances,
                                          instance_layout, min_gpus)
from icarus_jax.serving.sampling import SamplingParams
from icarus_jax.bench.workload import WorkloadConfig, generate_workflows

LLAMA = ModelConfig.from_preset("llama-3.1-8b")
H100 = HARDWARE["h100"]


def test_memory_split_arithmetic_for_llama_8b_on_h100():
  # By hand: 8.03e9 parameters in bf16 (embeddings untied) = 16.06 GB; a KV token is
  # 2 (K, V) x 32 layers x 8 kv heads x 128 x 2 bytes = 131,072 bytes; usable 0.9 x 80 GB = 72 GB.
  w = (32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) + 2 * 4096 * 128256) * 2
  per_tok = (2 * 4096 + 4096 + 2 * 1024 + 2 * 14336) * 2
  act = 8192 * per_tok + 1024 * 128256 * 4
  one = instance_layout(LLAMA, H100, 1)
  assert one.weights_bytes == w and one.activation_bytes == act
  assert one.kv_bytes == pytest.approx(72e9 - w - act)
  assert one.kv_bytes == kv_budget(LLAMA, H100, adapter_slots=0).kv
  two = instance_layout(LLAMA, H100, 2)
  assert two.per_gpu == (2,) and two.kv_bytes == pytest.approx((72e9 - 2 * (w + act)) / 2)
  assert two.kv_pages == int(two.kv_bytes // (131072 * 16))
  four = instance_layout(LLAMA, H100, 4)
  assert four.kv_bytes == pytest.approx((72e9 - 4 * (w + act)) / 4)   # ~0.7 GB: ~5.4k tokens
  with pytest.raises(IcarusError, match="8 instances of llama-3.1-8b do not fit one"):
    instance_layout(LLAMA, H100, 8)
  assert min_gpus(LLAMA, H100, 8) == 2                                  # ceil(8 x 16.06 / 80)
  spread = instance_layout(LLAMA, H100, 8, gpus=2)
  assert spread.per_gpu == (4, 4) and spread.kv_pages == four.kv_pages
  assert [spread.gpu_of(m) for m in range(8)] == [0, 1] * 4


def small_system(n, gpus, **kw):
  cfg = ModelConfig.from_preset("llama-3.1-8b")
  layout = dataclasses.replace(instance_layout(cfg, H100, n, gpus), kv_pages=4000)
  names = [f"m{i}" for i in range(n)]
  return MultiInstance(cfg, H100, names, layout, page_size=16, max_batch=16,
                       prefill_chunk=2048, max_seq_len=16384, record_schedule=True, **kw), names


def test_instances_on_one_gpu_time_share_it_and_gpus_run_in_parallel():
  """The same two requests for two models: on one GPU their steps serialize (the later one
  finishes about twice as late as alone); on two GPUs they run in parallel (both finish as if
  alone)."""
  prompt, sp = list(range(1000)), SamplingParams(max_tokens=50)
  finish = {}
  for gpus in (1, 2):
    mi, names = small_system(2, gpus)
    for n in names:
      mi.submit(prompt, n, sp)
    outs = []
    while mi.has_work:
      outs += mi.step()
    assert all(o.finish_reason == "length" and len(o.output_tokens) == 50 for o in outs)
    finish[gpus] = sorted(o.finish_time for o in outs)
  alone = finish[2][0]
  assert finish[2][1] == pytest.approx(alone)
  assert finish[1][1] == pytest.approx(2 * alone, rel=0.05)
  assert finish[1][0] > alone                        # interleaved steps: both are slowed


def test_no_request_is_batched_across_models_and_each_model_has_its_own_cache():
  mi, names = small_system(3, 1)
  system = list(range(600))
  for i in range(6):  # the same shared prefix to every model, twice
    mi.submit(system + [1000 + i], names[i % 3], SamplingParams(max_tokens=3))
  while mi.has_work:
    mi.step()
  for name, eng in mi.instances.items():
    own = {o.request_id for o in eng.outputs.values()}
    local = set(eng.outputs)
    steps = [e for e in eng.schedule_log if e[0] == "step"]
    assert steps and all(rid in local for e in steps for rid, _, _ in e[2])
    assert len(own) == 2
    # each model computes the shared prefix itself once, the second request reuses it
    assert eng.stats.cached_prompt_tokens == 592  # 37 full pages of the 601-token prompt
  assert mi.stats.prefill_tokens_computed == 3 * (601 + 9)
  with pytest.raises(IcarusError, match="not one of"):
    mi.submit([1], "m9")


def test_multi_instance_runs_the_workflow_harness():
  mi, names = small_system(2, 1)
  wfs = generate_workflows(WorkloadConfig(num_workflows=4, num_models=2, request_rate=2.0,
                                          num_turns=3, system_len=256, context_len=64,
                                          output_len=16, observation_len=32, seed=0))
  m = run_workflows(mi, wfs, names)
  assert m["completed"] == 12 and m["failed_workflows"] == 0
  assert m["p50_workflow_latency_ms"] > 0
  assert mi.snapshot()["instances"] == 2


def test_shared_device_instances_serve_each_model_alone_one_step_at_a_time(tiny):
  """The measured baseline (ii): two real full models with different weights. Oracle: each
  model's own engine run alone on the same prompts (greedy). Every ``step`` runs exactly one
  instance's step, so nothing is batched across models."""
  import jax
  import numpy as np

  from icarus_jax.serving.engine import Engine
  cfg, params = tiny
  other = jax.tree.map(lambda x: x * 1.25, params)          # a second, different model
  kw = dict(mode="isolated", num_pages=64, page_size=8, max_batch=4, prefill_chunk=16,
            max_seq_len=128)
  rng = np.random.RandomState(0)
  prompts = [list(rng.randint(1, cfg.vocab_size, n)) for n in (5, 17, 9, 30)]
  sp = SamplingParams(max_tokens=6)
  solo = {m: [o.output_tokens for o in Engine(cfg, w, **kw).generate(prompts, sampling=sp)]
          for m, w in (("a", params), ("b", other))}
  assert solo["a"] != solo["b"]                              # the models really differ
  sd = SharedDeviceInstances({"a": Engine(cfg, params, **kw), "b": Engine(cfg, other, **kw)})
  rids = {(m, i): sd.submit(p, m, sp) for i, p in enumerate(prompts) for m in ("a", "b")}
  got, calls = {}, 0
  while sd.has_work:
    before = {m: e.stats.steps for m, e in sd.instances.items()}
    for out in sd.step():
      got[out.request_id] = (out.adapter, out.output_tokens)
    calls += 1
    ran = [m for m, e in sd.instances.items() if e.stats.steps != before[m]]
    assert len(ran) == 1, f"one step ran {ran}"
  for (m, i), rid in rids.items():
    assert got[rid] == (m, solo[m][i])
  assert sd.stats.steps == calls
  with pytest.raises(IcarusError, match="not one of"):
    sd.submit(prompts[0], "c", sp)
  with pytest.raises(IcarusError, match="mode='isolated'"):
    SharedDeviceInstances({"a": Engine(cfg, params, **{**kw, "mode": "icarus"})})
