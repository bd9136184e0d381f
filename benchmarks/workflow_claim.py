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

FLAGS = flags.FLAGS
flags.DEFINE_list("hardware", ["h100"], "Hardware presets (cost_model.HARDWARE).")
flags.DEFINE_string("model", "llama-3.1-8b", "Model preset.")
flags.DEFINE_list("workloads", ["agentic"], "Workload presets: agentic, paper, coding.")
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
flags.DEFINE_bool("summarize_only", False, "Only rebuild tables, plots and summaries.")

KEEP = ("completed", "failed", "failed_workflows", "workflow_throughput", "p50_workflow_latency_ms",
        "p95_workflow_latency_ms", "p99_workflow_latency_ms", "steady_p50_workflow_latency_ms",
        "steady_p95_workflow_latency_ms", "steady_p99_workflow_latency_ms", "steady_workflows",
        "steady_failed_workflows", "median_ttft_ms", "p95_ttft_ms", "median_tpot_ms",
        "p95_tpot_ms", "prefill_tokens_computed", "prompt_tokens", "cached_prompt_tokens",
        "pages_evicted", "preemptions", "engine_steps", "retention_hits", "retention_reclaimed",
        "duration")
BASELINES = ("multi_lora", "instances_1gpu", "instances_eq", "instances_ngpu")


def workflows(workload: str, n: int, rate: float, seed: int, num: int, max_context: int):
  from icarus_jax.bench.workload import (AgentWorkloadConfig, WorkloadConfig, coding_agent_config,
                                   generate_agent_workflows, generate_workflows)
  if workload == "agentic":
    return generate_agent_workflows(AgentWorkloadConfig(num_workflows=num, num_models=n,
                                                        request_rate=rate, seed=seed))
  if workload == "coding":
    return generate_agent_workflows(coding_agent_config(max_context, num_workflows=num,
                                                        num_models=n, request_rate=rate, seed=seed))
  if workload == "paper":  # the old workload (docs/results/workflow.md's projection sizes)
    return generate_workflows(WorkloadConfig(
        num_workflows=num, num_models=n, request_rate=rate, num_turns=8, system_len=1024,
        context_len=512, header_len=64, output_len=128, observation_len=256, seed=seed))
  raise ValueError(f"unknown workload {workload!r}")


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
                 mixed_steps=system == "icarus_mixed", **kw)
    kind = "icarus_lora" if mode == "icarus" else "lora"
    for nm in names:
      eng.add_adapter(Adapter({}, AdapterConfig(name=nm, kind=kind)))
    return eng, names, 1
  gpus = {"instances_1gpu": 1, "instances_eq": min_gpus(cfg, hw, n), "instances_ngpu": n}[system]
  layout = instance_layout(cfg, hw, n, gpus)
  return MultiInstance(cfg, hw, names, layout, **kw), names, gpus


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
               seed=int(sd))
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
          rec.update({k: m.get(k) for k in KEEP}, gpus=gpus)
      rec["wall_s"] = round(time.time() - t0, 2)
      f.write(json.dumps(rec) + "\n")
      f.flush()


def _key(r) -> tuple:
  return (r["hardware"], r["model"], r["workload"], r["system"], r["n_models"],
          float(r["rate"]), int(r["seed"]))


# ------------------------------------------------------------------------------ summary
def _ok(r) -> bool:
  return "infeasible" not in r and r.get("steady_failed_workflows", 1) == 0


def sustainable(rows: list[dict], slo_factor: float) -> dict:
  """Rows of one (system, N, seed) over rates -> unloaded P95, max sustainable rate (largest
  rate with every steady workflow done and steady P95 <= slo_factor x unloaded), max throughput."""
  rows = sorted(rows, key=lambda r: r["rate"])
  ok = [r for r in rows if _ok(r)]
  if not ok:
    reason = next((r["infeasible"] for r in rows if "infeasible" in r), "every point failed")
    return {"feasible": False, "reason": reason}
  unloaded = ok[0]["steady_p95_workflow_latency_ms"]
  slo = slo_factor * unloaded
  best = None
  for r in rows:
    if _ok(r) and r["steady_p95_workflow_latency_ms"] <= slo:
      best = r
    else:
      break
  return {"feasible": True, "unloaded_p95_ms": unloaded, "slo_ms": slo,
          "max_sustainable_rate": best["rate"] if best else 0.0,
          "max_throughput": max(r["workflow_throughput"] for r in ok)}


def summarize(points: list[dict]) -> tuple[list[dict], list[dict]]:
  """Per-(system, N, seed) capacities and the ICaRus-vs-baseline summary records."""
  groups: dict = {}
  for r in points:
    groups.setdefault((r["hardware"], r["model"], r["workload"], r["system"], r["n_models"],
                       r["seed"]), []).append(r)
  caps = []
  for (hw, model, wl, system, n, seed), rows in sorted(groups.items()):
    caps.append(dict(hardware=hw, model=model, workload=wl, system=system, n_models=n,
                     seed=seed, **sustainable(rows, FLAGS.slo_factor)))
  idx = {(c["hardware"], c["workload"], c["system"], c["n_models"], c["seed"]): c for c in caps}
  pts = {_key(r): r for r in points}
  summary = []
  for (hw, model, wl, n) in sorted({(c["hardware"], c["model"], c["workload"], c["n_models"])
                                    for c in caps}):
    for base in BASELINES:
      per_seed = []
      for seed in sorted({c["seed"] for c in caps}):
        ic, bc = idx.get((hw, wl, "icarus", n, seed)), idx.get((hw, wl, base, n, seed))
        if ic is None or bc is None:
          continue
        if not bc["feasible"] or not ic["feasible"]:
          per_seed.append({"seed": seed, "baseline_infeasible": bc.get("reason"),
                           "icarus_max_sustainable_rate": ic.get("max_sustainable_rate")})
          continue
        knee = bc["max_sustainable_rate"]
        ri = pts.get((hw, model, wl, "icarus", n, knee, seed))
        rb = pts.get((hw, model, wl, base, n, knee, seed))
        rec = {"seed": seed, "baseline_knee_rate": knee,
               "max_sustainable_rate_ratio": (ic["max_sustainable_rate"] / knee if knee
                                              else math.inf),
               "max_throughput_ratio": ic["max_throughput"] / bc["max_throughput"]}
        # the paper's regime: the baseline past its knee, at the rate ICaRus still sustains
        iknee = ic["max_sustainable_rate"]
        ri2 = pts.get((hw, model, wl, "icarus", n, iknee, seed))
        rb2 = pts.get((hw, model, wl, base, n, iknee, seed))
        if ri2 and rb2 and "infeasible" not in rb2 and rb2.get("steady_p95_workflow_latency_ms"):
          rec["p95_ratio_at_icarus_knee"] = (rb2["steady_p95_workflow_latency_ms"]
                                             / ri2["steady_p95_workflow_latency_ms"])
        if ri and rb and _ok(ri) and _ok(rb):
          rec["p95_ratio_at_baseline_knee"] = (rb["steady_p95_workflow_latency_ms"]
                                               / ri["steady_p95_workflow_latency_ms"])
          rec["prefill_token_ratio"] = (rb["prefill_tokens_computed"]
                                        / max(1, ri["prefill_tokens_computed"]))
        per_seed.append(rec)
      if not per_seed:
        continue
      out = {"hardware": hw, "model": model, "workload": wl, "baseline": base, "n_models": n,
             "seeds": [p["seed"] for p in per_seed], "PROJECTION": True}
      for k in ("p95_ratio_at_baseline_knee", "p95_ratio_at_icarus_knee", "max_sustainable_rate_ratio",
                "max_throughput_ratio", "prefill_token_ratio"):
        vals = [p[k] for p in per_seed if k in p and math.isfinite(p[k])]
        out[k] = float(np.mean(vals)) if vals else None
        out[k + "_std"] = float(np.std(vals)) if len(vals) > 1 else None
      bad = [p["baseline_infeasible"] for p in per_seed if "baseline_infeasible" in p]
      if bad:
        out["baseline_infeasible"] = bad[0]
      summary.append(out)
  return caps, summary


def plot(points: list[dict], path_stem: Path) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  files = []
  styles = {"icarus": ("C0", "-"), "multi_lora": ("C1", "--"), "instances_1gpu": ("C3", ":"),
            "instances_eq": ("C2", "-."), "instances_ngpu": ("C4", (0, (1, 3))),
            "icarus_unaware": ("C7", "-"), "icarus_mixed": ("C8", "-")}
  for hw, wl in sorted({(r["hardware"], r["workload"]) for r in points}):
    ns = sorted({r["n_models"] for r in points if r["hardware"] == hw and r["workload"] == wl})
    fig, axes = plt.subplots(2, len(ns), figsize=(4.2 * len(ns), 7), squeeze=False)
    for j, n in enumerate(ns):
      for system, (c, ls) in styles.items():
        rows = [r for r in points if (r["hardware"], r["workload"], r["system"], r["n_models"])
                == (hw, wl, system, n) and "infeasible" not in r]
        if not rows:
          continue
        rates = sorted({r["rate"] for r in rows})
        p95 = [np.mean([r["steady_p95_workflow_latency_ms"] / 1e3 for r in rows
                        if r["rate"] == x]) for x in rates]
        thr = [np.mean([r["workflow_throughput"] for r in rows if r["rate"] == x]) for x in rates]
        axes[0, j].plot(rates, p95, color=c, linestyle=ls, marker="o", ms=3, label=system)
        axes[1, j].plot(rates, thr, color=c, linestyle=ls, marker="o", ms=3, label=system)
      axes[0, j].set_yscale("log")
      axes[0, j].set_title(f"N = {n}")
      axes[0, j].set_ylabel("steady P95 workflow latency (s)")
      axes[1, j].set_ylabel("workflows / s completed")
      axes[1, j].set_xlabel("arrival rate (workflows / s)")
      axes[0, j].legend(fontsize=7)
    fig.suptitle(f"PROJECTION (roofline): {points[0]['model']} on {hw}, {wl} workload")
    fig.tight_layout()
    out = path_stem.with_name(f"{path_stem.name}_{hw}_{wl}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    files.append(str(out))
  return files


def write_outputs() -> None:
  points = [json.loads(l) for l in Path(FLAGS.points).read_text().splitlines()]
  caps, summary = summarize(points)
  out = Path(FLAGS.out)
  pngs = plot(points, out.with_suffix(""))
  doc = {"LABEL": "PROJECTION (roofline cost model on a virtual clock), not a measurement",
         "command": "python -m benchmarks.workflow_claim " + " ".join(sys.argv[1:]),
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (simulation host)",
         "slo": f"steady P95 <= {FLAGS.slo_factor} x unloaded P95 (lowest rate)",
         "points": len(points), "capacities": caps, "summary": summary, "plots": pngs}
  out.write_text(json.dumps(doc, indent=1))
  keys = ("hardware", "model", "workload", "baseline", "n_models", "p95_ratio_at_baseline_knee",
          "max_sustainable_rate_ratio", "max_throughput_ratio", "prefill_token_ratio", "seeds")
  summary_name = ("workflow_summary.json" if out.stem == "workflow_claim"
                  else f"{out.stem}_summary.json")
  (out.parent / summary_name).write_text(json.dumps(
      [{**{k: s.get(k) for k in keys}, "PROJECTION": True,
        **({"baseline_infeasible": s["baseline_infeasible"]} if "baseline_infeasible" in s
           else {})} for s in summary], indent=1))
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
