r"""The serving claim: ICaRus vs multi-LoRA vs N model instances on agent-shaped workflows
(roofline PROJECTION on a virtual clock; the scheduler and cache code are the engine's own).

  python -m benchmarks.workflow_claim                       # default sweep, resumes
  python -m benchmarks.workflow_claim --summarize_only      # tables, plots, summary JSON

Systems (every one in the same harness, ``bench.run_workflows``, workflow-aware: sessions with
context retention across tool calls, continuing turns first):
  icarus          one engine, one shared KV cache, N ICaRus-LoRA adapters
  multi_lora      baseline (i): one engine, N conventional LoRA adapters (K/V per adapter,
                  per-adapter prefix cache, cross-adapter batching: vLLM/SGLang with N slots)
  instances_1gpu  baseline (ii): N full models, one instance each, sharing ONE GPU's memory
  instances_eq    baseline (ii) at ceil(N x weights / memory) GPUs
  instances_ngpu  N full models on N GPUs (one each): the baseline with N times the hardware
Layouts that do not fit are recorded as infeasible with the reason. Ablations of ICaRus:
``icarus_unaware`` (no retention, FIFO admission) and ``icarus_mixed`` (mixed steps).

Every point is one JSON line in ``--points`` (resume: points already there are skipped), then
``docs/results/workflow_claim.{json,md}``, ``workflow_claim_<hw>_<workload>.png`` and
``docs/results/workflow_summary.json`` are written from all points.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from icarus_jax.bench.capacity import POINT_METRICS, merge_summary_file, plot_sweeps, summarize

FLAGS = flags.FLAGS
flags.DEFINE_list("hardware", ["h100"], "Hardware presets (cost_model.HARDWARE).")
flags.DEFINE_string("model", "llama-3.1-8b", "Model preset.")
flags.DEFINE_list("workloads", ["agentic"], "Workload presets: agentic, coding, paper; "
                  "agentic_roles / coding_roles route by role (planner / executor / critic, "
                  "models revisited within a workflow) instead of round-robin.")
flags.DEFINE_list("systems", ["icarus", "multi_lora", "instances_1gpu", "instances_eq",
                              "instances_ngpu"], "Systems to run.")
flags.DEFINE_list("n_models", ["2", "4", "8"], "Numbers of models N.")
flags.DEFINE_list("rates", ["0.1", "0.25", "0.4", "0.55", "0.7", "0.85", "1.0", "1.4"],
                  "Workflow arrival rates (workflows / s).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Workload seeds.")
flags.DEFINE_integer("workflows", 500, "Workflows per point.")
flags.DEFINE_float("retain_s", 3.0, "Context retention TTL (s) of workflow-aware serving.")
flags.DEFINE_float("slo_factor", 2.0, "SLO: steady P95 <= slo_factor x the unloaded P95.")
flags.DEFINE_string("points", "docs/results/workflow_claim.points.jsonl", "Resumable points.")
flags.DEFINE_string("out", "docs/results/workflow_claim.json", "Summary JSON (md, png beside).")
flags.DEFINE_float("kv_gb", 0.0, "Single-engine systems: KV budget in GB instead of the "
                   "hardware-derived one (cost_model.kv_budget); e.g. 20 reproduces the old "
                   "docs/results/workflow.md projection.")
flags.DEFINE_bool("mixed_steps", True, "Every system runs mixed steps (decode rows ride along "
                  "prefill chunks, vLLM-V1 style); False reproduces the session-4 sweep. The "
                  "summary uses only the points of this setting.")
flags.DEFINE_bool("summarize_only", False, "Only rebuild tables, plots and summaries.")
flags.DEFINE_string("summary_file", "", "Records in the issue's format go here (their PROJECTION "
                    "half is replaced); default: workflow_summary.json beside --out for "
                    "workflow_claim.json, else <out stem>_summary.json.")



WORKLOADS = ("agentic", "agentic_roles", "coding", "coding_roles", "paper")


def workflows(workload: str, n: int, rate: float, seed: int, num: int, max_context: int):
  from icarus_jax.bench.workload import (AgentWorkloadConfig, WorkloadConfig, coding_agent_config,
                                   generate_agent_workflows, generate_workflows)
  routing = "roles" if workload.endswith("_roles") else "round_robin"
  kw = dict(num_workflows=num, num_models=n, request_rate=rate, seed=seed, routing=routing)
  if workload in ("agentic", "agentic_roles"):
    return generate_agent_workflows(AgentWorkloadConfig(**kw))
  if workload in ("coding", "coding_roles"):
    return generate_agent_workflows(coding_agent_config(max_context, **kw))
  if workload == "paper":  # the old workload (docs/results/workflow.md's projection sizes)
    return generate_workflows(WorkloadConfig(
        num_workflows=num, num_models=n, request_rate=rate, num_turns=8, system_len=1024,
        context_len=512, header_len=64, output_len=128, observation_len=256, seed=seed))
  raise ValueError(f"unknown workload {workload!r}; accepted: {WORKLOADS}")


def build_system(system: str, cfg, hw, n: int):
  """Returns ``(engine-like, model names, gpus)`` or raises IcarusError if it does not fit."""
  from icarus_jax.model.adapters import Adapter, AdapterConfig
  from icarus_jax.serving.cost_model import RooflineSimulator, kv_budget
  from icarus_jax.serving.engine import Engine
  from icarus_jax.bench.multi_instance import MultiInstance, instance_layout, min_gpus
  names = [f"model{i}" for i in range(n)]
  kw = dict(page_size=16, max_batch=64, prefill_chunk=2048, max_seq_len=32768)
  if system in ("icarus", "icarus_unaware", "icarus_mixed", "multi_lora"):
    mode = "isolated" if system == "multi_lora" else "icarus"
    slots = max(8, n)
    sim = RooflineSimulator(cfg, hw)
    pages = (int(FLAGS.kv_gb * 1e9 // (sim.kv_bytes_per_token * 16)) + 1 if FLAGS.kv_gb > 0
             else kv_budget(cfg, hw, adapter_slots=slots).kv_pages + 1)
    eng = Engine(cfg, None, mode=mode, num_pages=pages, max_adapters=slots, simulator=sim,
                 mixed_steps=FLAGS.mixed_steps or system == "icarus_mixed", **kw)
    kind = "icarus_lora" if mode == "icarus" else "lora"
    for nm in names:
      eng.add_adapter(Adapter({}, AdapterConfig(name=nm, kind=kind)))
    return eng, names, 1
  gpus = {"instances_1gpu": 1, "instances_eq": min_gpus(cfg, hw, n), "instances_ngpu": n}[system]
  layout = instance_layout(cfg, hw, n, gpus)
  return MultiInstance(cfg, hw, names, layout, mixed_steps=FLAGS.mixed_steps, **kw), names, gpus


def run_points(log=print) -> None:
  from tqdm.auto import tqdm

  from icarus_jax.bench.harness import run_workflows
  from icarus_jax.model.config import ModelConfig
  from icarus_jax.serving.cost_model import HARDWARE
  from icarus_jax.errors import IcarusError
  cfg = ModelConfig.from_preset(FLAGS.model)
  path = Path(FLAGS.points)
  path.parent.mkdir(parents=True, exist_ok=True)
  done = set()
  if path.exists():
    for line in path.read_text().splitlines():
      r = json.loads(line)
      done.add(_key(r))
  todo = [dict(hardware=h, model=cfg.name, workload=w, system=s, n_models=int(n), rate=float(r),
               seed=int(sd), mixed_steps=FLAGS.mixed_steps)
          for h in FLAGS.hardware for w in FLAGS.workloads for n in FLAGS.n_models
          for sd in FLAGS.seeds for s in FLAGS.systems for r in FLAGS.rates]
  todo = [p for p in todo if _key(p) not in done]
  infeasible: dict = {}
  with path.open("a") as f:
    for p in tqdm(todo, desc="workflow claim"):
      hw = HARDWARE[p["hardware"]]
      ik = (p["hardware"], p["system"], p["n_models"])
      t0 = time.time()
      rec = dict(p, workflows=FLAGS.workflows, retain_s=FLAGS.retain_s, kv_gb=FLAGS.kv_gb)
      if ik in infeasible:
        rec.update(infeasible=infeasible[ik])
      else:
        try:
          eng, names, gpus = build_system(p["system"], cfg, hw, p["n_models"])
        except IcarusError as e:
          infeasible[ik] = str(e)
          rec.update(infeasible=str(e))
        else:
          wfs = workflows(p["workload"], p["n_models"], p["rate"], p["seed"], FLAGS.workflows,
                          32768)
          m = run_workflows(eng, wfs, names, workflow_aware=p["system"] != "icarus_unaware",
                            retain_s=FLAGS.retain_s)
          rec.update({k: m.get(k) for k in POINT_METRICS}, gpus=gpus)
      rec["wall_s"] = round(time.time() - t0, 2)
      f.write(json.dumps(rec) + "\n")
      f.flush()


def _key(r) -> tuple:
  return (r["hardware"], r["model"], r["workload"], r["system"], r["n_models"],
          float(r["rate"]), int(r["seed"]), bool(r.get("mixed_steps", False)))


def write_outputs() -> None:
  points = [json.loads(l) for l in Path(FLAGS.points).read_text().splitlines()]
  points = [r for r in points if bool(r.get("mixed_steps", False)) == FLAGS.mixed_steps]
  caps, summary = summarize(points, FLAGS.slo_factor)
  out = Path(FLAGS.out)
  pngs = plot_sweeps(points, out.with_suffix(""), "PROJECTION (roofline)")
  doc = {"LABEL": "PROJECTION (roofline cost model on a virtual clock), not a measurement",
         "command": "python -m benchmarks.workflow_claim " + " ".join(sys.argv[1:]),
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (simulation host)",
         "slo": f"steady P95 <= {FLAGS.slo_factor} x unloaded P95 (lowest rate)",
         "points": len(points), "mixed_steps": FLAGS.mixed_steps, "capacities": caps, "summary": summary, "plots": pngs}
  out.write_text(json.dumps(doc, indent=1))
  summary_name = ("workflow_summary.json" if out.stem == "workflow_claim"
                  else f"{out.stem}_summary.json")
  merge_summary_file(Path(FLAGS.summary_file) if FLAGS.summary_file else out.parent / summary_name,
                     summary, measured=False)
  lines = ["| hardware | workload | N | system | seeds | unloaded P95 (s) | max sustainable rate "
           "(wf/s) | max throughput (wf/s) |", "| --- | --- | ---: | --- | --- | ---: | ---: | ---: |"]
  grouped: dict = {}
  for c in caps:
    grouped.setdefault((c["hardware"], c["workload"], c["n_models"], c["system"]), []).append(c)
  for (hw, wl, n, system), cs in sorted(grouped.items()):
    if not cs[0]["feasible"]:
      lines.append(f"| {hw} | {wl} | {n} | {system} | {len(cs)} | infeasible: {cs[0]['reason'][:90]} | | |")
      continue
    f = lambda k, s=1.0: (f"{np.mean([c[k] for c in cs]) / s:.2f} +/- "  # noqa: E731
                          f"{np.std([c[k] for c in cs]) / s:.2f}")
    lines.append(f"| {hw} | {wl} | {n} | {system} | {len(cs)} | {f('unloaded_p95_ms', 1e3)} | "
                 f"{f('max_sustainable_rate')} | {f('max_throughput')} |")
  lines += ["", "| hardware | workload | N | ICaRus vs | P95 ratio at baseline knee | P95 ratio at "
            "ICaRus knee | max sustainable rate ratio | max throughput ratio | prefill token ratio |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
  fmt = lambda v: "-" if v is None else (f"{v:.2f}x" if math.isfinite(v) else "inf")  # noqa: E731
  for s in summary:
    if "baseline_infeasible" in s and s["max_throughput_ratio"] is None:
      lines.append(f"| {s['hardware']} | {s['workload']} | {s['n_models']} | {s['baseline']} | "
                   f"baseline infeasible | | | | |")
      continue
    lines.append(f"| {s['hardware']} | {s['workload']} | {s['n_models']} | {s['baseline']} | "
                 f"{fmt(s['p95_ratio_at_baseline_knee'])} | {fmt(s['p95_ratio_at_icarus_knee'])} | "
                 f"{fmt(s['max_sustainable_rate_ratio'])} | "
                 f"{fmt(s['max_throughput_ratio'])} | {fmt(s['prefill_token_ratio'])} |")
  out.with_suffix(".md").write_text("PROJECTION (roofline cost model), generated by `"
                                    + doc["command"] + f"` on {doc['date']}.\n\n"
                                    + "\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv):
  del argv
  if not FLAGS.summarize_only:
    run_points()
  write_outputs()


if __name__ == "__main__":
  app.run(main)
