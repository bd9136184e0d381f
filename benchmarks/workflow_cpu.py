r"""The serving claim MEASURED on this CPU: ICaRus vs multi-LoRA vs N real model instances,
the real engine on the wall clock, N = 2, 4, 8.

  python -m benchmarks.workflow_cpu                  # resumable: points already measured are kept
  python -m benchmarks.workflow_cpu --summarize_only

The model is ``benchmarks.cpu_model`` (~34M parameters, float32: compute, not dispatch,
dominates a step; the size ``cost_model_cpu`` validated the roofline on). Systems, every one in
the harness of the projection (``bench.run_workflows``, workflow-aware; mixed steps only with
``--mixed_steps``, see the flag):

  icarus          one engine, one shared KV cache, N ICaRus-LoRA adapters
  multi_lora      baseline (i): one engine, N conventional LoRA adapters (k/v included)
  instances_1gpu  baseline (ii): N full models (each its own weights, perturbed copies of the
                  base) time-sharing this CPU (``SharedDeviceInstances``), each its own KV slice

Memory: the device has ``--memory_factor`` x the model's weights (default 5: 80 GB / 16 GB, an
H100 with LLaMA-3.1-8B). KV budgets come from it exactly as on a GPU (``kv_budget`` and
``instance_layout`` with 4-byte parameters), so N instances that do not fit are infeasible here
for the same reason as there.

Workload: the ``agentic`` preset with token lengths x ``--scale`` (contexts of a few hundred to
~2k tokens) and tool latencies x ``--tool_scale`` (the CPU's steps are slower than an H100's,
so the full 0.2-3 s tool gaps would leave it idle); retention TTL scaled alike. Every program
is compiled before a point (``Engine.warm_up``); each record says how many compiled during the
measured run (``compiles_during_run``, 0 when the warm-up covered every shape).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
from absl import app, flags

from icarus_jax.bench.capacity import POINT_METRICS, merge_summary_file, plot_sweeps, summarize

FLAGS = flags.FLAGS
flags.DEFINE_list("systems", ["icarus", "multi_lora", "instances_1gpu"], "Systems to run.")
flags.DEFINE_list("n_models", ["2", "4", "8"], "Numbers of models N.")
flags.DEFINE_list("rates", ["0.25", "0.35", "0.5", "1.0"], "Workflow arrival rates (workflows / s).")
flags.DEFINE_list("seeds", ["0"], "Workload seeds.")
flags.DEFINE_integer("workflows", 20, "Workflows per point.")
flags.DEFINE_float("scale", 0.08, "Token lengths of the agentic preset x this.")
flags.DEFINE_float("tool_scale", 0.25, "Tool latencies (and the retention TTL) x this.")
flags.DEFINE_float("memory_factor", 5.0, "Device memory = this x the model's weights.")
flags.DEFINE_integer("d_model", 512, "Model width (benchmarks.cpu_model).")
flags.DEFINE_integer("layers", 8, "Model layers.")
flags.DEFINE_integer("max_batch", 8, "Max running requests per engine.")
flags.DEFINE_integer("prefill_chunk", 128, "Max new tokens per row per prefill call.")
flags.DEFINE_bool("mixed_steps", False, "Decode rows ride along prefill chunks. Off by default "
                  "here: XLA:CPU runs the bucketed dense program, so a decode row riding in a "
                  "prefill step costs a whole padded chunk (see docs/results/workflow.md).")
flags.DEFINE_float("slo_factor", 2.0, "SLO: steady P95 <= slo_factor x the unloaded P95.")
flags.DEFINE_string("points", "docs/results/workflow_cpu_claim.points.jsonl", "Resumable points.")
flags.DEFINE_string("out", "docs/results/workflow_cpu_claim.json", "Summary JSON (md, png beside).")
flags.DEFINE_string("compilation_cache", "runs/jax_cache", "JAX persistent compilation cache "
                    "('' for none): a second run loads the step programs instead of compiling.")
flags.DEFINE_bool("summarize_only", False, "Only rebuild tables, plots and summaries.")

PAGE = 16
MAX_SEQ = 2048


def device(cfg):
  """This CPU as a device of ``memory_factor`` x the weights (only its memory is used here)."""
  from icarus_jax.serving.cost_model import Hardware, RooflineSimulator
  w = RooflineSimulator(cfg, Hardware("cpu", 1.0, 1.0), bytes_per_param=4).weight_bytes
  return Hardware(f"this CPU, {FLAGS.memory_factor:g} x weights = "
                  f"{FLAGS.memory_factor * w / 1e6:.0f} MB", math.nan, math.nan,
                  memory_bytes=FLAGS.memory_factor * w)


def workload(n: int, rate: float, seed: int):
  from icarus_jax.bench.workload import AgentWorkloadConfig, generate_agent_workflows
  base = AgentWorkloadConfig()
  cfg = AgentWorkloadConfig(num_workflows=FLAGS.workflows, num_models=n, request_rate=rate,
                            seed=seed, scale=FLAGS.scale,
                            tool_latency=tuple(t * FLAGS.tool_scale for t in base.tool_latency))
  if cfg.max_prompt_len() + base.action.high * FLAGS.scale > MAX_SEQ:
    raise ValueError(f"--scale={FLAGS.scale} makes prompts up to {cfg.max_prompt_len()} tokens; "
                     f"the engine takes {MAX_SEQ}")
  return generate_agent_workflows(cfg), cfg


def build(system: str, cfg, base, n: int):
  """``(engine-like, names, engines to warm up)``; raises IcarusError if it does not fit."""
  from icarus_jax import init_adapter
  from icarus_jax.bench.multi_instance import SharedDeviceInstances, instance_layout
  from icarus_jax.serving.cost_model import kv_budget
  from icarus_jax.serving.engine import Engine
  hw = device(cfg)
  names = [f"model{i}" for i in range(n)]
  kw = dict(page_size=PAGE, max_batch=FLAGS.max_batch, prefill_chunk=FLAGS.prefill_chunk,
            max_seq_len=MAX_SEQ, mixed_steps=FLAGS.mixed_steps, max_adapters=max(8, n))
  act_tokens = FLAGS.max_batch * FLAGS.prefill_chunk
  if system in ("icarus", "multi_lora"):
    budget = kv_budget(cfg, hw, bytes_per_param=4, max_tokens_per_step=act_tokens,
                       adapter_slots=kw["max_adapters"], lora_rank=8, page_size=PAGE)
    mode, kind = ("icarus", "icarus_lora") if system == "icarus" else ("isolated", "lora")
    eng = Engine(cfg, base, mode=mode, num_pages=budget.kv_pages + 1, **kw)
    for i, nm in enumerate(names):
      eng.add_adapter(init_adapter(cfg, jax.random.key(100 + i), name=nm, kind=kind,
                                   base_params=base, rank=8, b_std=0.02))
    return eng, names, [eng], budget.kv_pages
  if system != "instances_1gpu":
    raise ValueError(f"unknown system {system!r}")
  layout = instance_layout(cfg, hw, n, 1, page_size=PAGE, max_tokens_per_step=act_tokens,
                           bytes_per_param=4)
  engines = {nm: Engine(cfg, jax.tree.map(lambda x, i=i: x * (1.0 + 0.01 * (i + 1)), base),
                        mode="isolated", num_pages=layout.kv_pages + 1, **kw)
             for i, nm in enumerate(names)}
  return SharedDeviceInstances(engines), names, list(engines.values()), layout.kv_pages


def _key(r) -> tuple:
  return (r["system"], r["n_models"], float(r["rate"]), int(r["seed"]), bool(r["mixed_steps"]))


def run_points(cfg, base) -> None:
  from tqdm.auto import tqdm

  from icarus_jax.bench.harness import run_workflows
  from icarus_jax.errors import IcarusError
  path = Path(FLAGS.points)
  path.parent.mkdir(parents=True, exist_ok=True)
  done = {_key(json.loads(l)) for l in path.read_text().splitlines()} if path.exists() else set()
  todo = [dict(system=s, n_models=int(n), rate=float(r), seed=int(sd),
               mixed_steps=FLAGS.mixed_steps)
          for n in FLAGS.n_models for sd in FLAGS.seeds for s in FLAGS.systems
          for r in FLAGS.rates]
  todo = [p for p in todo if _key(p) not in done]
  warmed: set = set()
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(base))
  with path.open("a") as f:
    for p in tqdm(todo, desc="workflow cpu"):
      t0 = time.time()
      wfs, wcfg = workload(p["n_models"], p["rate"], p["seed"])
      rec = dict(hardware="cpu", model=f"cpu-{n_params / 1e6:.0f}M", workload="agentic_cpu", **p,
                 workflows=FLAGS.workflows, scale=FLAGS.scale, tool_scale=FLAGS.tool_scale,
                 memory_factor=FLAGS.memory_factor)
      try:
        eng, names, engines, pages = build(p["system"], cfg, base, p["n_models"])
      except (IcarusError, ValueError) as e:  # the layout does not fit the device's memory
        rec.update(infeasible=str(e))
      else:
        for e in engines:  # compile once per program family; later points reuse the programs
          fam = (e.mode, e.alloc.num_pages)
          if fam not in warmed:
            e.warm_up(max_context=min(MAX_SEQ, wcfg.max_prompt_len() + 64),
                      min_context=min(len(wf.prefix) for wf in wfs))
            warmed.add(fam)
        compiled = engines[0].runner.compiled_steps()
        m = run_workflows(eng, wfs, names, workflow_aware=True, retain_s=3.0 * FLAGS.tool_scale)
        rec.update({k: m.get(k) for k in POINT_METRICS}, kv_pages=pages,
                   compiles_during_run=engines[0].runner.compiled_steps() - compiled)
      rec["wall_s"] = round(time.time() - t0, 2)
      f.write(json.dumps(rec) + "\n")
      f.flush()


def write_outputs(cfg) -> None:
  points = [json.loads(l) for l in Path(FLAGS.points).read_text().splitlines()]
  points = [r for r in points if r["mixed_steps"] == FLAGS.mixed_steps]
  caps, summary = summarize(points, FLAGS.slo_factor, projection=False)
  out = Path(FLAGS.out)
  pngs = plot_sweeps(points, out.with_suffix(""), "MEASURED (real engine, wall clock)")
  doc = {"LABEL": "MEASURED on this CPU: the real engine on the wall clock",
         "command": "python -m benchmarks.workflow_cpu " + " ".join(sys.argv[1:]),
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                     "jax": jax.__version__},
         "device": dataclasses.asdict(device(cfg)),
         "slo": f"steady P95 <= {FLAGS.slo_factor} x unloaded P95 (lowest rate)",
         "points": len(points), "capacities": caps, "summary": summary, "plots": pngs}
  out.write_text(json.dumps(doc, indent=1, default=str))
  merge_summary_file(out.parent / "workflow_summary.json", summary, measured=True)
  lines = ["| N | system | unloaded P95 (s) | max sustainable rate (wf/s) | max throughput (wf/s) |",
           "| ---: | --- | ---: | ---: | ---: |"]
  for c in caps:
    if not c["feasible"]:
      lines.append(f"| {c['n_models']} | {c['system']} | infeasible: {c['reason'][:100]} | | |")
      continue
    lines.append(f"| {c['n_models']} | {c['system']} | {c['unloaded_p95_ms'] / 1e3:.2f} | "
                 f"{c['max_sustainable_rate']:g} | {c['max_throughput']:.3f} |")
  fmt = lambda v: "-" if v is None else (f"{v:.2f}x" if math.isfinite(v) else "inf")  # noqa: E731
  lines += ["", "| N | ICaRus vs | P95 ratio at baseline knee | P95 ratio at ICaRus knee | max "
            "sustainable rate ratio | max throughput ratio | prefill token ratio |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
  for s in summary:
    if s.get("baseline_infeasible") and s["max_throughput_ratio"] is None:
      lines.append(f"| {s['n_models']} | {s['baseline']} | baseline infeasible | | | | |")
      continue
    lines.append(f"| {s['n_models']} | {s['baseline']} | {fmt(s['p95_ratio_at_baseline_knee'])} | "
                 f"{fmt(s['p95_ratio_at_icarus_knee'])} | {fmt(s['max_sustainable_rate_ratio'])} | "
                 f"{fmt(s['max_throughput_ratio'])} | {fmt(s['prefill_token_ratio'])} |")
  rows = ["", "| N | system | rate | steady P95 (s) | throughput (wf/s) | prefill tokens | "
          "evicted pages | preemptions | median TPOT (ms) | compiles during run |",
          "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in sorted(points, key=lambda r: (r["n_models"], r["system"], r["rate"])):
    if "infeasible" in r:
      continue
    rows.append(f"| {r['n_models']} | {r['system']} | {r['rate']:g} | "
                f"{r['steady_p95_workflow_latency_ms'] / 1e3:.2f} | {r['workflow_throughput']:.3f} "
                f"| {r['prefill_tokens_computed']} | {r['pages_evicted']} | {r['preemptions']} | "
                f"{r['median_tpot_ms']:.1f} | {r['compiles_during_run']} |")
  out.with_suffix(".md").write_text("MEASURED on this CPU, generated by `" + doc["command"]
                                    + f"` on {doc['date']}.\n\n" + "\n".join(lines + rows) + "\n")
  print("\n".join(lines + rows))


def main(argv):
  del argv
  from benchmarks.cpu_model import cpu_model
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cfg, base = cpu_model(FLAGS.d_model, FLAGS.layers)
  if not FLAGS.summarize_only:
    run_points(cfg, base)
  write_outputs(cfg)


if __name__ == "__main__":
  app.run(main)
