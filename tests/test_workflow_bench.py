"""Workflow benchmark pieces: workload generator, metrics, both modes end to end, projection."""

import math

import jax
import numpy as np
import pytest

from icarus_jax import init_adapter
from icarus_jax.model.adapters import Adapter, AdapterConfig
from icarus_jax.bench.harness import run_workflows
from icarus_jax.model.config import ModelConfig
from icarus_jax.serving.cost_model import HARDWARE, RooflineSimulator
from icarus_jax.serving.engine import Engine
from icarus_jax.bench.metrics import RequestRecord, compute_metrics, workflow_metrics
from icarus_jax.bench.workload import WorkloadConfig, generate_workflows


def test_generator_is_deterministic_and_shaped():
  cfg = WorkloadConfig(num_workflows=6, num_models=3, request_rate=2.0, num_turns=5, seed=7)
  a, b = generate_workflows(cfg), generate_workflows(cfg)
  assert a == b
  c = generate_workflows(WorkloadConfig(num_workflows=6, num_models=3, request_rate=2.0,
                                        num_turns=5, seed=8))
  assert c != a
  assert all(x.arrival <= y.arrival for x, y in zip(a, a[1:]))
  assert a[0].arrival == 0.0 and a[-1].arrival > 0
  # round robin: consecutive turns use different models; all share the system prompt
  assert [t.model for t in a[1].turns] == [1, 2, 0, 1, 2]
  assert all(w.prefix[:cfg.system_len] == a[0].prefix[:cfg.system_len] for w in a)
  # the next turn's prompt extends the previous one with its output and observation
  w = a[0]
  p1 = w.prompt_for(1, [[50] * cfg.output_len])
  assert p1[:len(w.prompt_for(0, []))] == w.prompt_for(0, [])
  assert len(p1) == cfg.system_len + cfg.context_len + 2 * cfg.header_len + cfg.output_len + cfg.observation_len
  inf = generate_workflows(WorkloadConfig(num_workflows=4, request_rate=math.inf))
  assert all(w.arrival == 0.0 for w in inf)


def test_poisson_rate_and_zipf_skew():
  wfs = generate_workflows(WorkloadConfig(num_workflows=2000, request_rate=4.0, seed=1))
  gaps = np.diff([w.arrival for w in wfs])
  assert abs(gaps.mean() - 0.25) < 0.02
  z = generate_workflows(WorkloadConfig(num_workflows=300, num_models=8, assignment="zipf", seed=1))
  counts = np.bincount([t.model for w in z for t in w.turns], minlength=8)
  assert counts[0] > 3 * counts[7]


def test_metrics_on_hand_made_trace():
  recs = [RequestRecord(10, 5, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.1, 0.1]),
          RequestRecord(20, 3, ttft=0.2, latency=0.6, itl=[0.2, 0.2]),
          RequestRecord(30, 1, ttft=0.3, latency=0.3, itl=[]),
          RequestRecord(40, 0, ttft=0.0, latency=0.0, itl=[], success=False)]
  m = compute_metrics(recs, duration_s=2.0)
  assert m["completed"] == 3 and m["failed"] == 1
  assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 9
  assert m["request_throughput"] == pytest.approx(1.5)
  assert m["output_throughput"] == pytest.approx(4.5)
  assert m["total_token_throughput"] == pytest.approx(34.5)
  assert m["mean_ttft_ms"] == pytest.approx(200.0)
  assert m["median_ttft_ms"] == pytest.approx(200.0)
  assert m["p99_ttft_ms"] == pytest.approx(298.0)   # linear interpolation between 200 and 300
  # TPOT: (0.5-0.1)/4 = 0.1 and (0.6-0.2)/2 = 0.2; the 1-token request has none
  assert m["mean_tpot_ms"] == pytest.approx(150.0)
  assert m["p95_tpot_ms"] == pytest.approx(195.0)
  assert m["mean_itl_ms"] == pytest.approx(1000 * (0.4 + 0.4) / 6)
  assert m["p95_e2el_ms"] == pytest.approx(590.0)
  w = workflow_metrics([1.0, 2.0, 3.0, 4.0], duration_s=8.0)
  assert w["workflow_throughput"] == 0.5
  assert w["p50_workflow_latency_ms"] == pytest.approx(2500.0)
  assert w["p95_workflow_latency_ms"] == pytest.approx(3850.0)


@pytest.fixture(scope="module")
def fleets(tiny):
  cfg, params = tiny
  return {mode: [init_adapter(cfg, jax.random.key(60 + i), name=f"m{i}",
                              kind="icarus_lora" if mode == "icarus" else "lora",
                              base_params=params, rank=4, b_std=0.05) for i in range(4)]
          for mode in ("icarus", "isolated")}


@pytest.mark.parametrize("n_models", [1, 4])
def test_both_modes_complete_and_icarus_prefills_less(tiny, fleets, n_models):
  cfg, params = tiny
  wl = WorkloadConfig(num_workflows=4, num_models=n_models, request_rate=math.inf, num_turns=4,
                      system_len=24, context_len=16, header_len=4, output_len=4,
                      observation_len=6, seed=3)
  res = {}
  for mode in ("icarus", "isolated"):
    eng = Engine(cfg, params, mode=mode, num_pages=48, page_size=8, max_batch=4, prefill_chunk=16)
    for a in fleets[mode][:n_models]:
      eng.add_adapter(a)
    res[mode] = run_workflows(eng, generate_workflows(wl), [a.name for a in fleets[mode][:n_models]])
  for mode, m in res.items():
    assert m["completed"] == 16 and m["failed"] == 0, mode
    assert m["completed_workflows"] == 4 and m["failed_workflows"] == 0
    assert m["total_output_tokens"] == 16 * 4
    assert m["p95_workflow_latency_ms"] > 0 and m["workflow_throughput"] > 0
  if n_models > 1:
    assert res["icarus"]["prefill_tokens_computed"] < res["isolated"]["prefill_tokens_computed"]
    assert res["icarus"]["prefix_hit_rate"] > res["isolated"]["prefix_hit_rate"]


def test_projection_uses_the_same_scheduler_with_a_virtual_clock():
  cfg = ModelConfig.from_preset("llama-3.1-8b")
  wl = WorkloadConfig(num_workflows=6, num_models=4, request_rate=0.5, num_turns=4,
                      system_len=512, context_len=256, header_len=32, output_len=32,
                      observation_len=64)
  out = {}
  for mode in ("icarus", "isolated"):
    sim = RooflineSimulator(cfg, HARDWARE["h100"])
    eng = Engine(cfg, None, mode=mode, num_pages=4000, page_size=16, max_batch=32,
                 prefill_chunk=1024, simulator=sim, max_seq_len=8192)
    for i in range(4):
      eng.add_adapter(Adapter({}, AdapterConfig(name=f"m{i}", kind="icarus_lora" if mode == "icarus" else "lora")))
    out[mode] = run_workflows(eng, generate_workflows(wl), [f"m{i}" for i in range(4)])
    assert out[mode]["completed"] == 24
    assert out[mode]["duration"] == pytest.approx(sim.clock(), rel=1e-9)
  # a decode step of an 8B bf16 model on an H100 is weight-bound: ~16 GB / (3.35 TB/s * 0.8)
  sim = RooflineSimulator(cfg, HARDWARE["h100"])
  t = sim.step_time([(1000, 1, 1)], decode=True, icarus=True)
  assert 0.006 < t - HARDWARE["h100"].step_overhead_s < 0.008
  assert out["icarus"]["prefill_tokens_computed"] < out["isolated"]["prefill_tokens_computed"]


def test_executed_shape_prices_the_bucket_and_a_slow_gather_adds_its_time():
  """The CPU validation's cost model: the bucketed program (padded rows and pages, dense
  attention) and the page gather at its own bandwidth, added to the roofline; the projections'
  model prices the real rows with the K/V read streamed with the weights."""
  import dataclasses

  from icarus_jax.serving import step_batch
  cfg = ModelConfig.from_preset("llama-3.1-8b")
  rows = [step_batch.StepRow(list(range(300)), 299, 1, list(range(1 + 19 * i, 20 + 19 * i)), 0)
          for i in range(3)]  # 3 decode rows at context 300 (19 pages of 16)
  step = step_batch.build(rows, decode=True, max_batch=8, prefill_chunk=64, max_pages=64)
  assert step.shape == (4, 1, 32)
  hw = HARDWARE["h100"]
  real = RooflineSimulator(cfg, hw)
  assert real.price(step, 16, True) == real.step_time([(300, 1, 0)] * 3, True, True)
  padded = RooflineSimulator(cfg, hw, executed_shape=True)
  assert padded.price(step, 16, True) == real.step_time([(512, 1, 0)] * 4, True, True)
  # K/V bytes: 4 rows x 512 tokens x 128 KiB (32 layers x 8 kv heads x 128 x 2 x 2 bytes)
  kv_read = 4 * 512 * 2 * 32 * 8 * 128 * 2
  assert padded.step_bytes([(512, 1, 0)] * 4, True)["kv_read"] == kv_read
  slow = RooflineSimulator(cfg, dataclasses.replace(hw, kv_read_bandwidth=1e9),
                           executed_shape=True)
  streamed = (padded.step_bytes([(512, 1, 0)] * 4, True)["total"] - kv_read) / (
      hw.hbm_bandwidth * hw.mem_efficiency)  # weight-bound: the roofline's max is the bytes
  assert slow.price(step, 16, True) == pytest.approx(
      streamed + kv_read / (1e9 * hw.mem_efficiency) + hw.step_overhead_s, rel=1e-9)


def test_kv_budget_from_hardware_arithmetic():
  """Llama-3.1-8B in bf16 on one H100 at 90%: 72 GB usable - 16.06 GB of weights (8.03 B
  parameters, counted by hand below) - activations - 16 rank-16 adapter slots = the KV pool."""
  import pytest
  from icarus_jax.model.config import ModelConfig
  from icarus_jax.serving.cost_model import HARDWARE, kv_budget
  cfg = ModelConfig.from_preset("llama-3.1-8b")
  b = kv_budget(cfg, HARDWARE["h100"])
  per_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336
  params = 32 * per_layer + 2 * 128256 * 4096
  assert b.weights == params * 2 and abs(params - 8.03e9) < 0.01e9
  assert b.usable == 0.9 * 80e9
  assert 0 < b.activations < 2e9 and 0 < b.adapter_pool < 2e9
  assert b.kv == b.usable - b.weights - b.activations - b.adapter_pool
  page = 2 * 32 * 8 * 128 * 2 * 16  # K and V, layers, kv heads, head_dim, bf16, 16 tokens
  assert b.kv_pages == int(b.kv // page) and 50e9 < b.kv < 56e9
  # 8 chips of TPU v5e hold it; one chip does not (16 GB < weights): a clear error
  assert kv_budget(cfg, HARDWARE["tpu-v5e"], chips=8).kv_pages > 0
  with pytest.raises(ValueError, match="add chips"):
    kv_budget(cfg, HARDWARE["tpu-v5e"])
  assert kv_budget(cfg, HARDWARE["h200"]).kv > b.kv + 50e9  # 141 GB vs 80 GB
