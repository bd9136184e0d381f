"""Agent-shaped workloads and workflow-aware serving (context retention across tool calls,
continuing turns first).

Oracles: the distributions' stated parameters (medians, clips, ranges), the same run without
retention (for what retention must change), and the naive reference (outputs unchanged).
"""

import dataclasses
import math

import jax

import numpy as np
import pytest

from icarus_jax import IcarusError, init_adapter
from icarus_jax.bench.harness import run_workflows
from icarus_jax.serving.cost_model import HARDWARE, RooflineSimulator
from icarus_jax.serving.engine import Engine
from icarus_jax.serving.reference import reference_generate
from icarus_jax.serving.sampling import SamplingParams
from icarus_jax.bench.workload import (AgentWorkloadConfig, LogNormal, coding_agent_config,
                                 generate_agent_workflows)

PS = 8


# ------------------------------------------------------------------------------ workloads
def test_agentic_preset_statistics():
  cfg = AgentWorkloadConfig(num_workflows=400, num_models=8, request_rate=2.0, seed=3)
  wfs = generate_agent_workflows(cfg)
  assert wfs == generate_agent_workflows(cfg)                      # seeded
  assert wfs != generate_agent_workflows(AgentWorkloadConfig(num_workflows=400, seed=4))
  system = wfs[0].prefix[:2048]
  assert all(w.prefix[:2048] == system for w in wfs)               # one shared system prompt
  n_sys = len(set(range(len(wfs[0].prefix))))                      # system + task
  assert 2048 + 64 <= n_sys <= 4096 + 512
  turns = [len(w.turns) for w in wfs]
  assert min(turns) == 6 and max(turns) == 12 and abs(np.mean(turns) - 9) < 0.3
  acts = np.array([t.max_tokens for w in wfs for t in w.turns])
  obs = np.array([len(t.observation) for w in wfs for t in w.turns[:-1]])
  lat = np.array([t.tool_latency for w in wfs for t in w.turns[:-1]])
  assert acts.min() >= 30 and acts.max() <= 200 and abs(np.median(acts) - 80) <= 4
  assert obs.min() >= 200 and obs.max() <= 1500 and abs(np.median(obs) - 550) <= 25
  assert lat.min() >= 0.2 and lat.max() <= 3.0
  assert abs(np.median(lat) - math.sqrt(0.2 * 3.0)) < 0.06           # log-uniform median
  assert all(w.turns[-1].observation == () and w.turns[-1].tool_latency == 0 for w in wfs)
  gaps = np.diff([w.arrival for w in wfs])
  assert abs(gaps.mean() - 0.5) < 0.06                              # Poisson at 2 / s
  # round robin: every turn on the next model
  assert all(b.model == (a.model + 1) % 8 for w in wfs for a, b in zip(w.turns, w.turns[1:]))


def test_role_routing_revisits_models_within_a_workflow():
  wfs = generate_agent_workflows(AgentWorkloadConfig(num_workflows=20, num_models=8,
                                                     routing="roles", seed=1))
  for w in wfs:
    models = [t.model for t in w.turns]
    planner, executor, critic = (w.wid % 8), (w.wid + 1) % 8, (w.wid + 2) % 8
    assert models[0] == planner and models[1] == executor and models[2] == critic
    assert set(models) == {planner, executor, critic}              # revisited, 3 roles
    assert all(models[k] == planner for k in range(0, len(models), 4))
  with pytest.raises(IcarusError, match="routing='star'"):
    AgentWorkloadConfig(routing="star")


def test_coding_preset_matches_traces_and_scales_to_context():
  out = LogNormal(250, 1.45, 16, 4096)
  rng = np.random.RandomState(0)
  x = np.array([out.sample(rng) for _ in range(20000)])
  assert abs(np.median(x) - 250) < 12 and abs(np.percentile(x, 90) - 1600) < 120
  full = coding_agent_config(131072, num_workflows=50, seed=2)
  assert full.scale == 1.0
  wfs = generate_agent_workflows(full)
  assert 18000 <= len(wfs[0].prefix) - 2000 and len(wfs[0].prefix) <= 22000
  turns = [len(w.turns) for w in wfs]
  assert min(turns) >= 16 and max(turns) <= 30
  obs = [len(t.observation) for w in wfs for t in w.turns[:-1]]
  assert abs(np.median(obs) - 870) < 60
  small = coding_agent_config(8192, num_workflows=50, seed=2)
  assert small.scale < 0.1
  lens = [len(w.prompt_for(len(w.turns) - 1, [[0] * t.max_tokens for t in w.turns]))
          for w in generate_agent_workflows(small)]
  assert np.median(lens) < 8192                                     # typical workflow fits


def _final_len(w):
  """Tokens of a workflow's last prompt plus its output (every output at its max_tokens)."""
  return len(w.prompt_for(len(w.turns) - 1, [[0] * t.max_tokens for t in w.turns])) \
      + w.turns[-1].max_tokens


def test_coding_preset_ends_a_workflow_at_the_context_limit():
  cfg = coding_agent_config(8192, num_workflows=300, seed=5)
  assert cfg.max_context == 8192
  cut = generate_agent_workflows(cfg)
  free = generate_agent_workflows(dataclasses.replace(cfg, max_context=None))
  assert max(_final_len(w) for w in cut) <= 8192
  over = [i for i, w in enumerate(free) if _final_len(w) > 8192]
  assert 0 < len(over) < 0.1 * len(free)                  # the long tail only, 1-10%
  for i, (a, b) in enumerate(zip(cut, free)):
    if i not in over:
      assert a == b                                        # same draws where it fits
      continue
    k = len(a.turns)
    assert 1 <= k < len(b.turns) and a.turns[:k - 1] == b.turns[:k - 1]
    assert a.turns[-1].observation == () and a.turns[-1].tool_latency == 0.0
    assert a.turns[-1].header == b.turns[k - 1].header
    # the next turn of the uncut workflow would not have fit
    assert _final_len(dataclasses.replace(b, turns=b.turns[:k + 1])) > 8192
  with pytest.raises(IcarusError, match="first turn needs .* more than max_context=100"):
    generate_agent_workflows(dataclasses.replace(cfg, max_context=100))


# ------------------------------------------------------------------------------ retention
def roofline_engine(tiny, **kw):
  cfg, params = tiny
  return Engine(cfg, params, num_pages=41, page_size=PS, max_batch=4, prefill_chunk=64,
                simulator=RooflineSimulator(cfg, HARDWARE["h100"]), **kw)


def tool_gap_under_pressure(eng, retain_s):
  """Workflow A's turn 0 (120-token context, 16 pages), then, during A's tool call, 3 new
  requests of 12 pages each in a 40-page pool: the third needs pages that LRU eviction would take
  from A's cached context. Then A's turn 1. Returns A's turn-1 cached prompt tokens."""
  rng = np.random.RandomState(0)
  a_ctx = list(rng.randint(0, 256, 120))
  r0 = eng.submit(a_ctx, None, SamplingParams(max_tokens=8), session="A", retain_s=retain_s)
  list(eng.run())
  a_next = a_ctx + eng.outputs[r0].output_tokens + list(rng.randint(0, 256, 16))
  for _ in range(3):  # 3 x 12 pages (95 prompt tokens + 1 sampled) while A holds 16 of 40
    eng.submit(list(rng.randint(0, 256, 95)), None, SamplingParams(max_tokens=1))
  list(eng.run())
  eng.check_invariants()
  r1 = eng.submit(a_next, None, SamplingParams(max_tokens=4), session="A", priority=1)
  list(eng.run())
  eng.check_invariants()
  return eng.outputs[r1].num_cached_tokens, len(a_ctx) + 8


def test_retained_context_survives_a_tool_gap_under_pressure(tiny):
  eng = roofline_engine(tiny)
  cached, ctx = tool_gap_under_pressure(eng, retain_s=30.0)
  assert cached >= ctx - 1                  # the whole turn-0 context (its last token's K/V
  snap = eng.snapshot()                     # was never computed: it was sampled, not fed)
  assert snap["retention_hits"] == 1 and snap["retained_sessions"] == 0
  # without retention LRU eviction takes A's pages for the new requests
  plain = roofline_engine(tiny)
  cached0, _ = tool_gap_under_pressure(plain, retain_s=0.0)
  assert cached0 < ctx // 2
  assert plain.snapshot()["pages_evicted"] > 0


def test_retention_expires_and_yields_to_decode(tiny):
  eng = roofline_engine(tiny)
  eng.submit(list(range(100)), None, SamplingParams(max_tokens=4), session="A", retain_s=0.5)
  list(eng.run())
  assert eng.retained_sessions == ["A"]
  eng.runner.wait_until(eng.clock() + 1.0)   # the tool took longer than the TTL
  eng.submit([1, 2, 3], None, SamplingParams(max_tokens=1))
  list(eng.run())
  assert eng.retained_sessions == [] and eng.snapshot()["retention_expired"] == 1
  eng.check_invariants()
  # a retained context never blocks forever: a continuing turn of another session reclaims it
  eng2 = roofline_engine(tiny)
  eng2.submit(list(range(200)), None, SamplingParams(max_tokens=4), session="A", retain_s=60)
  list(eng2.run())
  eng2.submit([7 + t % 200 for t in range(300)], None, SamplingParams(max_tokens=8), session="B",
              priority=1)
  outs = list(eng2.run())
  assert outs[0].finish_reason == "length"
  assert eng2.snapshot()["retention_reclaimed"] == 1 and eng2.retained_sessions == []
  # nor does it idle the engine: a new workflow that needs the memory while nothing runs gets it
  eng3 = roofline_engine(tiny)
  eng3.submit(list(range(200)), None, SamplingParams(max_tokens=4), session="A", retain_s=60)
  list(eng3.run())
  outs = eng3.generate([[7 + t % 200 for t in range(300)]], None, SamplingParams(max_tokens=8))
  assert outs[0].finish_reason == "length" and eng3.retained_sessions == []
  with pytest.raises(IcarusError, match="retain_s must be a finite number"):
    eng2.submit([1], None, retain_s=-1)


def test_continuing_turns_are_admitted_before_new_workflows(tiny):
  eng = roofline_engine(tiny, record_schedule=True)
  new = [eng.submit([5 + i] * 20, None, SamplingParams(max_tokens=2)) for i in range(6)]
  cont = eng.submit([9] * 20, None, SamplingParams(max_tokens=2), session="W", priority=1)
  eng.step()
  admitted = [e[1] for e in eng.schedule_log if e[0] == "admit"]
  assert admitted[0] == cont and admitted[1:] == new[:3]      # batch of 4


def test_retention_keeps_outputs_equal_to_the_reference(tiny, tiny_adapters):
  """Device runner, 3 adapters, two workflows with retention interleaved under a small pool:
  every turn's tokens equal the naive reference's, page invariants hold every step."""
  cfg, params = tiny
  eng = Engine(cfg, params, num_pages=24, page_size=PS, max_batch=4, prefill_chunk=16)
  for a in tiny_adapters:
    eng.add_adapter(a)
  rng = np.random.RandomState(1)
  ctx = {w: list(rng.randint(0, 256, 30 + 9 * w)) for w in (0, 1)}
  names = ["agent0", "agent1", "agent2"]
  for turn in range(3):
    rids = {w: eng.submit(ctx[w], names[(w + turn) % 3], SamplingParams(max_tokens=5),
                          session=w, retain_s=10.0, priority=1 if turn else 0) for w in (0, 1)}
    while eng.has_work:
      eng.step()
      eng.check_invariants()
    for w, rid in rids.items():
      out = eng.outputs[rid]
      ad = eng.adapters[names[(w + turn) % 3]]
      assert out.output_tokens == reference_generate(cfg, params, ad, ctx[w], 5)
      ctx[w] = ctx[w] + out.output_tokens + list(rng.randint(0, 256, 6))
  assert eng.snapshot()["retention_hits"] == 4


def test_run_workflows_with_tool_latency_and_retention(tiny):
  """An agentic workload through the harness on the roofline: tool latency delays turns (the
  workflow lasts at least its tool time), and workflow-aware serving reuses every context."""
  cfg, params = tiny
  names = ["m0", "m1"]
  wl = AgentWorkloadConfig(num_workflows=6, num_models=2, request_rate=4.0, scale=0.02,
                           turns=(3, 4), seed=0)
  wfs = generate_agent_workflows(wl)
  res = {}
  for aware in (False, True):
    eng = Engine(cfg, params, num_pages=200, page_size=PS, max_batch=8, prefill_chunk=64,
                 simulator=RooflineSimulator(cfg, HARDWARE["h100"]))
    for i, n in enumerate(names):
      eng.add_adapter(init_adapter(cfg, jax.random.key(i), name=n, base_params=params, rank=2))
    res[aware] = run_workflows(eng, wfs, names, workflow_aware=aware, retain_s=5.0)
  for m in res.values():
    assert m["completed"] == sum(len(w.turns) for w in wfs) and m["failed_workflows"] == 0
  min_tool = min(sum(t.tool_latency for t in w.turns) for w in wfs)
  assert res[True]["p50_workflow_latency_ms"] >= 1000 * min_tool
  assert res[True]["retention_hits"] == sum(len(w.turns) - 1 for w in wfs)
  assert res[True]["prefill_tokens_computed"] <= res[False]["prefill_tokens_computed"]
