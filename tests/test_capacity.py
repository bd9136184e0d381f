"""Capacity from a rate sweep and the ICaRus-vs-baseline ratios (``bench.capacity``), on
hand-made points whose answers are worked out by hand."""

import math

from icarus_jax.bench.capacity import summarize, sustainable


def pt(system, rate, p95_s, thr, prefill=1000, failed=0, n=8, seed=0):
  return dict(hardware="hw", model="m", workload="w", system=system, n_models=n, rate=rate,
              seed=seed, steady_p95_workflow_latency_ms=p95_s * 1e3, workflow_throughput=thr,
              steady_failed_workflows=failed, prefill_tokens_computed=prefill)


def test_sustainable_rate_stops_at_the_first_slo_miss_and_failures_count_as_misses():
  rows = [pt("x", 1.0, 19.9, 0.9), pt("x", 0.1, 10.0, 0.1), pt("x", 0.5, 15.0, 0.5),
          pt("x", 1.5, 25.0, 1.2), pt("x", 2.0, 15.0, 1.1)]          # 2.0 is past a miss
  c = sustainable(rows, 2.0)
  assert c["unloaded_p95_ms"] == 10e3 and c["slo_ms"] == 20e3
  assert c["max_sustainable_rate"] == 1.0
  assert c["max_throughput"] == 1.2                                 # over every completed point
  rows[0]["steady_failed_workflows"] = 1                            # 1.0 now fails a workflow
  assert sustainable(rows, 2.0)["max_sustainable_rate"] == 0.5
  assert sustainable([dict(rows[1], infeasible="does not fit")], 2.0) == {
      "feasible": False, "reason": "does not fit"}


def test_ratios_at_the_baseline_knee_and_at_icarus_knee():
  pts = [pt("icarus", 0.1, 10, 0.1, 100), pt("icarus", 0.5, 11, 0.5, 100),
         pt("icarus", 1.0, 12, 1.0, 100), pt("icarus", 2.0, 50, 1.5, 100),
         pt("multi_lora", 0.1, 12, 0.1, 500), pt("multi_lora", 0.5, 20, 0.45, 500),
         pt("multi_lora", 1.0, 96, 0.6, 800), pt("multi_lora", 2.0, 300, 0.7, 900),
         pt("instances_1gpu", 0.1, 0, 0, failed=3), pt("instances_1gpu", 0.5, 0, 0, failed=9)]
  caps, summary = summarize(pts, 2.0, projection=False)
  by = {s["baseline"]: s for s in summary}
  ml = by["multi_lora"]
  # multi_lora: unloaded 12 s, SLO 24 s -> knee 0.5; ICaRus: unloaded 10, SLO 20 -> knee 1.0
  assert ml["max_sustainable_rate_ratio"] == 1.0 / 0.5
  assert math.isclose(ml["p95_ratio_at_baseline_knee"], 20 / 11)
  assert math.isclose(ml["p95_ratio_at_icarus_knee"], 96 / 12)
  assert math.isclose(ml["max_throughput_ratio"], 1.5 / 0.7)
  assert ml["prefill_token_ratio"] == 5.0 and ml["MEASURED"] and "PROJECTION" not in ml
  # a baseline stronger than ICaRus (knee 2.0 > 1.0): its prefill work is compared at 1.0,
  # a rate both sustain, not at 2.0 where ICaRus is past its knee (there: 2700 / 100)
  strong = [dict(p, system="instances_ngpu", prefill_tokens_computed=p["prefill_tokens_computed"]
                 * 3, steady_p95_workflow_latency_ms=10e3) for p in pts if p["system"] == "multi_lora"]
  ng = {s["baseline"]: s for s in summarize(pts + strong, 2.0)[1]}["instances_ngpu"]
  assert ng["max_sustainable_rate_ratio"] == 0.5 and ng["prefill_token_ratio"] == 2400 / 100
  inst = by["instances_1gpu"]
  assert inst["baseline_infeasible"] == "every point failed"
  assert inst["max_throughput_ratio"] is None
  assert {c["system"]: c.get("max_sustainable_rate") for c in caps} == {
      "icarus": 1.0, "multi_lora": 0.5, "instances_1gpu": None}


def test_summary_file_keeps_the_other_kind_of_records(tmp_path):
  import json

  from icarus_jax.bench.capacity import merge_summary_file
  path = tmp_path / "workflow_summary.json"
  proj = [dict(hardware="h100", model="m", workload="w", baseline="multi_lora", n_models=8,
               seeds=[0], max_throughput_ratio=2.0)]
  meas = [dict(proj[0], hardware="cpu", max_throughput_ratio=1.5)]
  merge_summary_file(path, proj, measured=False)
  merge_summary_file(path, meas, measured=True)
  merge_summary_file(path, [dict(proj[0], max_throughput_ratio=3.0)], measured=False)
  recs = json.loads(path.read_text())
  assert [(r["hardware"], r["max_throughput_ratio"], "MEASURED" in r) for r in recs] == [
      ("cpu", 1.5, True), ("h100", 3.0, False)]
  assert set(recs[0]) >= {"p95_ratio_at_baseline_knee", "prefill_token_ratio", "seeds"}
