"""Multi-agent workflow benchmark: ICaRus (one shared cache) vs the conventional multi-model
baseline (own K/V per model), same engine, same KV memory budget.

    python -m launch.bench_workflow --out=docs/results/workflow.json
    python -m launch.bench_workflow --skip_real --projection   # paper-scale PROJECTION only

The real run measures the embedded small model on this machine (wall clock). The projection
runs the same scheduler and prefix-cache code with the model step replaced by a roofline cost
model of LLaMA-3.1-8B on an H100 (virtual clock): it is a projection, not a measurement, and
every output says so.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["1", "2", "4", "8"], "Numbers of models (adapters) N.")
flags.DEFINE_list("rates", ["0.5", "1", "2", "4"], "Workflow arrival rates (workflows/s) for the real run.")
flags.DEFINE_list("modes", ["icarus", "isolated"], "Engine modes.")
flags.DEFINE_integer("num_workflows", 16, "Workflows per point (real run).")
flags.DEFINE_integer("num_turns", 8, "Turns per workflow.")
flags.DEFINE_integer("system_len", 64, "Shared system prompt tokens.")
flags.DEFINE_integer("context_len", 48, "Per-workflow task context tokens.")
flags.DEFINE_integer("header_len", 8, "Per-turn header tokens.")
flags.DEFINE_integer("output_len", 16, "Tokens generated per turn.")
flags.DEFINE_integer("observation_len", 24, "Tool observation tokens per turn.")
flags.DEFINE_enum("assignment", "round_robin", ["round_robin", "zipf"], "Model per turn.")
flags.DEFINE_float("burstiness", 1.0, "Gamma shape of inter-arrival gaps (1 = Poisson).")
flags.DEFINE_integer("kv_pages", 192, "KV pool pages (same budget for both modes).")
flags.DEFINE_integer("page_size", 16, "Tokens per page.")
flags.DEFINE_integer("max_batch", 8, "Max running requests.")
flags.DEFINE_integer("prefill_chunk", 64, "Max new tokens per row per prefill call.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_bool("skip_real", False, "Skip the real (CPU) measurement.")
flags.DEFINE_bool("projection", True, "Also run the paper-scale roofline projection.")
flags.DEFINE_string("proj_model", "llama-3.1-8b", "Projection model preset.")
flags.DEFINE_string("proj_hw", "h100", "Projection hardware (h100, h200, a100, tpu-v5e, tpu-v6e).")
flags.DEFINE_list("proj_rates", ["0.1", "0.2", "0.3", "0.4", "0.6", "0.8", "1.0"],
                  "Projection arrival rates (workflows/s).")
flags.DEFINE_integer("proj_workflows", 200, "Workflows per projection point.")
flags.DEFINE_float("proj_kv_gb", 20.0, "Projection KV budget (GB), both modes; 0: derived from "
                   "the hardware (memory x 0.9 - weights - activations - adapter slots, "
                   "cost_model.kv_budget).")
flags.DEFINE_string("out", "docs/results/workflow.json", "JSON output (PNG and .md beside it).")


def workload(n_models, rate, *, num_workflows, sizes, seed):
  from icarus_jax.bench.workload import WorkloadConfig
  return WorkloadConfig(num_workflows=num_workflows, num_models=n_models, request_rate=rate,
                        burstiness=FLAGS.burstiness, assignment=FLAGS.assignment, seed=seed, **sizes)


def real_sizes():
  return dict(num_turns=FLAGS.num_turns, system_len=FLAGS.system_len, context_len=FLAGS.context_len,
              header_len=FLAGS.header_len, output_len=FLAGS.output_len,
              observation_len=FLAGS.observation_len)


def run_real(models, rates, modes, *, num_workflows, progress=True, log=print):
  """Measured sweep on this machine. Returns a list of result dicts."""
  import jax

  from icarus_jax.checkpoints.assets import load_any_base
  from icarus_jax.bench.harness import load_serving_adapters, run_workflows
  from icarus_jax.serving.engine import Engine
  from icarus_jax.bench.workload import generate_workflows

  cfg, base = load_any_base(None)
  sizes = real_sizes()
  max_len = workload(1, 1.0, num_workflows=1, sizes=sizes, seed=0).max_prompt_len() + FLAGS.output_len
  nmax = max(models)
  out = []
  for mode in modes:
    ads, sources = load_serving_adapters(cfg, base, mode, nmax)
    mk = lambda: Engine(cfg, base, mode=mode, num_pages=FLAGS.kv_pages, page_size=FLAGS.page_size,
                        max_batch=FLAGS.max_batch, prefill_chunk=FLAGS.prefill_chunk,
                        max_adapters=max(8, nmax), max_rank=16,
                        max_seq_len=2 ** math.ceil(math.log2(max_len)))
    # Warm-up (not measured): compile the step shapes this workload uses.
    eng = mk()
    for a in ads:
      eng.add_adapter(a)
    names = [a.name for a in ads]
    t0 = time.time()
    run_workflows(eng, generate_workflows(workload(nmax, float("inf"), num_workflows=num_workflows,
                                                   sizes=sizes, seed=FLAGS.seed + 99)), names)
    log(f"[{mode}] warm-up (compile) {time.time() - t0:.1f}s")
    for n in models:
      for rate in rates:
        eng = mk()
        for a in ads[:n]:
          eng.add_adapter(a)
        wfs = generate_workflows(workload(n, rate, num_workflows=num_workflows, sizes=sizes,
                                          seed=FLAGS.seed))
        m = run_workflows(eng, wfs, names[:n], progress=progress, desc=f"{mode} N={n} rate={rate}")
        m.update({"mode": mode, "num_models": n, "request_rate": rate, "adapters": sources[:n],
                  "compiled_shapes_during_run": len(eng.shapes_seen)})
        out.append(m)
        log(f"[{mode}] N={n} rate={rate}: P95 workflow {m['p95_workflow_latency_ms'] / 1e3:.2f}s, "
            f"{m['workflow_throughput']:.3f} wf/s, hit {m['prefix_hit_rate']:.2f}, "
            f"prefill {m['prefill_tokens_computed']}, preempt {m['preemptions']}")
  return out, {"model": cfg.name, "jax": jax.__version__, "kv_budget_pages": FLAGS.kv_pages,
               "page_size": FLAGS.page_size, "max_batch": FLAGS.max_batch, **sizes}


def run_projection(models, rates, *, num_workflows, log=print):
  """Roofline projection at paper scale (virtual clock)."""
  from icarus_jax.model.adapters import Adapter, AdapterConfig
  from icarus_jax.bench.harness import run_workflows
  from icarus_jax.model.config import ModelConfig
  from icarus_jax.serving.cost_model import HARDWARE, RooflineSimulator, kv_budget
  from icarus_jax.serving.engine import Engine
  from icarus_jax.bench.workload import generate_workflows

  cfg = ModelConfig.from_preset(FLAGS.proj_model)
  hw = HARDWARE[FLAGS.proj_hw]
  sizes = dict(num_turns=8, system_len=1024, context_len=512, header_len=64, output_len=128,
               observation_len=256)
  out = []
  for mode in ("icarus", "isolated"):
    for n in models:
      for rate in rates:
        sim = RooflineSimulator(cfg, hw)
        if FLAGS.proj_kv_gb > 0:
          pages = int(FLAGS.proj_kv_gb * 1e9 // (sim.kv_bytes_per_token * 16)) + 1
        else:
          pages = kv_budget(cfg, hw, adapter_slots=max(8, n)).kv_pages + 1
        eng = Engine(cfg, None, mode=mode, num_pages=pages, page_size=16, max_batch=64,
                     prefill_chunk=2048, max_adapters=max(8, n), simulator=sim, max_seq_len=16384)
        kind = "icarus_lora" if mode == "icarus" else "lora"
        names = [f"model{i}" for i in range(n)]
        for nm in names:
          eng.add_adapter(Adapter({}, AdapterConfig(name=nm, kind=kind)))
        wl = workload(n, rate, num_workflows=num_workflows, sizes=sizes, seed=FLAGS.seed)
        m = run_workflows(eng, generate_workflows(wl), names)
        m.update({"mode": mode, "num_models": n, "request_rate": rate, "PROJECTION": True})
        out.append(m)
    log(f"[projection {mode}] done")
  return out, {"model": cfg.name, "hardware": hw.name, "kv_budget_gb": FLAGS.proj_kv_gb,
               "max_batch": 64, "page_size": 16, "workflows_per_point": num_workflows, **sizes,
               "cost_model": "roofline: max(bytes/HBM BW x 0.8, FLOPs/peak x 0.6) + 4 ms per step"}


def ratio_table(results: list[dict], label: str) -> str:
  rows = ["| N | rate (wf/s) | ICaRus P95 wf latency (s) | baseline P95 (s) | P95 ratio | "
          "ICaRus thr (wf/s) | baseline thr | thr ratio | ICaRus prefill tok | baseline prefill tok | "
          "hit rate I / B | preempt I / B |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  idx = {(r["mode"], r["num_models"], r["request_rate"]): r for r in results}
  for (mode, n, rate), a in sorted(idx.items(), key=lambda kv: (kv[0][1], kv[0][2])):
    if mode != "icarus" or ("isolated", n, rate) not in idx:
      continue
    b = idx[("isolated", n, rate)]
    pa, pb = a["p95_workflow_latency_ms"] / 1e3, b["p95_workflow_latency_ms"] / 1e3
    ta, tb = a["workflow_throughput"], b["workflow_throughput"]
    rows.append(f"| {n} | {rate:g} | {pa:.2f} | {pb:.2f} | {pb / max(pa, 1e-9):.2f}x | {ta:.3f} | "
                f"{tb:.3f} | {ta / max(tb, 1e-9):.2f}x | {a['prefill_tokens_computed']} | "
                f"{b['prefill_tokens_computed']} | {a['prefix_hit_rate']:.2f} / {b['prefix_hit_rate']:.2f} | "
                f"{a['preemptions']} / {b['preemptions']} |")
  return f"**{label}**\n\n" + "\n".join(rows) + "\n"


def main(argv):
  del argv
  from icarus_jax.bench.harness import plot_sweep
  t0 = time.time()
  out_path = Path(FLAGS.out)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  models = [int(x) for x in FLAGS.models]
  doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "seed": FLAGS.seed,
         "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
         "command": "python -m launch.bench_workflow " + " ".join(
             f"--{f.name}={','.join(map(str, f.value)) if isinstance(f.value, list) else f.value}"
             for f in FLAGS.get_key_flags_for_module(__import__(__name__)) if f.present)}
  md = [f"Generated by `{doc['command']}` on {doc['date']} ({doc['machine']}).\n"]
  if not FLAGS.skip_real:
    res, setup = run_real(models, [float(r) for r in FLAGS.rates], FLAGS.modes,
                          num_workflows=FLAGS.num_workflows)
    doc["real"] = {"setup": setup, "results": res}
    plot_sweep(res, out_path.with_suffix(".png"), "Measured on CPU: ICaRus (solid) vs isolated (dashed)")
    md.append(ratio_table(res, "Measured (this CPU, embedded small model)"))
  if FLAGS.projection:
    res, setup = run_projection(models, [float(r) for r in FLAGS.proj_rates],
                                num_workflows=FLAGS.proj_workflows)
    doc["projection"] = {"LABEL": "PROJECTION (roofline cost model, virtual clock), not a measurement",
                         "setup": setup, "results": res}
    proj_png = (out_path.with_suffix(".png") if FLAGS.skip_real
                else out_path.with_name(out_path.stem + "_projection.png"))
    plot_sweep(res, proj_png,
               f"PROJECTION: {setup['model']} on {setup['hardware']} (roofline), ICaRus solid, baseline dashed")
    md.append(ratio_table(res, f"PROJECTION: {setup['model']} on {setup['hardware']} (roofline cost model, not measured)"))
  doc["wall_s"] = round(time.time() - t0, 1)
  out_path.write_text(json.dumps(doc, indent=2) + "\n")
  out_path.with_suffix(".tables.md").write_text("\n".join(md))
  print("\n".join(md))
  print(f"wrote {out_path} ({doc['wall_s']} s)")


if __name__ == "__main__":
  app.run(main)
