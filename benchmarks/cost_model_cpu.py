r"""Validates the roofline cost model against the real engine on this CPU.

  python -m benchmarks.cost_model_cpu --out docs/results/cost_model_cpu.json

1. A model large enough that compute, not dispatch, dominates a step (``--d_model`` 512, 8
   layers: ~34M parameters, float32). The engine's own jitted ICaRus step is timed through its
   ``DeviceRunner`` for 16 decode and prefill shapes (median of ``--reps`` after a compile).
2. Two cost models are fitted on the even-numbered shapes (grid search minimising the mean
   absolute relative error of ``RooflineSimulator``) and judged on the odd-numbered ones:

   * ``rows`` (what the projections use): the real rows, two constants (bandwidth, FLOP/s),
     attention's K/V read streamed with the weights;
   * ``executed``: the bucketed program the CPU actually runs (``executed_shape=True``: padded
     rows, queries and pages, dense masked attention) and a third constant, the bandwidth of
     the reference backend's page gather (``Hardware.kv_read_bandwidth``), added to the step.

   The per-step overhead is half the smallest measured step in both. ``executed_host`` adds the
   engine's host work per device step (scheduling, packing, sampling: ``step()`` time outside
   ``runner.execute``), measured on a calibration run of the same workload after the warm-up.
3. The same seeded workflow workload runs through ``bench.run_workflows`` on the real engine
   (wall clock) and on the roofline runner with each fitted model (virtual clock, the same
   scheduler code). Reports predicted vs measured step time (held out) and workflow latency.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs/results/cost_model_cpu.json", "JSON output (md beside it)")
flags.DEFINE_integer("d_model", 512, "model width")
flags.DEFINE_integer("layers", 8, "layers")
flags.DEFINE_integer("reps", 5, "timed repetitions per shape")
flags.DEFINE_integer("workflows", 6, "workflows in the end-to-end comparison")
flags.DEFINE_integer("seed", 0, "seed")


def model():
  from benchmarks.cpu_model import cpu_model
  return cpu_model(FLAGS.d_model, FLAGS.layers, FLAGS.seed)


def time_steps(eng, shapes):
  """Median wall time of the engine's step for each (batch, new tokens, context) shape."""
  from icarus_jax.serving import step_batch
  out = []
  for B, T, ctx in shapes:
    pages = -(-(ctx + T) // eng.page_size)
    rows = [step_batch.StepRow(list(range(ctx + T)), ctx, T, list(range(1 + i * pages,
                                                                         1 + (i + 1) * pages)), 0)
            for i in range(B)]
    st = step_batch.build(rows, decode=T == 1, max_batch=eng.max_batch,
                          prefill_chunk=eng.prefill_chunk, max_pages=eng.max_pages_per_seq)
    jax.block_until_ready(eng.runner.execute(st))  # compile
    ts = []
    for _ in range(FLAGS.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(eng.runner.execute(st))
      ts.append(time.perf_counter() - t0)
    out.append({"batch": B, "new_tokens": T, "context": ctx, "decode": T == 1,
                "bucket": list(st.shape), "measured_s": statistics.median(ts), "step": st})
  return out


def fit(cfg, timed, page_size, executed):
  """Grid search of the constants; returns (mean abs rel error on ``timed``, Hardware)."""
  from icarus_jax.serving.cost_model import Hardware, RooflineSimulator
  overhead = min(t["measured_s"] for t in timed) * 0.5
  gathers = np.geomspace(1e8, 1e11, 31) if executed else [None]
  best = None
  for bw in np.geomspace(2e9, 2e11, 31):
    for fl in np.geomspace(5e9, 5e11, 31):
      for kv in gathers:
        hw = Hardware("cpu-fit", bw, fl, mem_efficiency=1.0, flop_efficiency=1.0,
                      step_overhead_s=overhead, kv_read_bandwidth=kv)
        sim = RooflineSimulator(cfg, hw, bytes_per_param=4, executed_shape=executed)
        err = np.mean([abs(sim.price(t["step"], page_size, True) - t["measured_s"])
                       / t["measured_s"] for t in timed])
        if best is None or err < best[0]:
          best = (float(err), hw)
  return best


def run_workload(eng, names, wfs):
  from icarus_jax.bench.harness import run_workflows
  return run_workflows(eng, wfs, names)


def instrument(eng) -> dict:
  """Times the engine's host work apart from its device steps: ``step()`` wall time and, inside
  it, every ``runner.execute`` (synchronised, so device time is not counted as host time)."""
  rec = {"step_s": 0.0, "execute_s": 0.0, "executes": 0}
  execute, step = eng.runner.execute, eng.step

  def timed_execute(st):
    t0 = time.perf_counter()
    out = jax.block_until_ready(execute(st))
    rec["execute_s"] += time.perf_counter() - t0
    rec["executes"] += 1
    return out

  def timed_step():
    t0 = time.perf_counter()
    out = step()
    rec["step_s"] += time.perf_counter() - t0
    return out

  eng.runner.execute, eng.step = timed_execute, timed_step
  return rec


def host_per_execute(rec: dict) -> float:
  return (rec["step_s"] - rec["execute_s"]) / max(rec["executes"], 1)


def main(argv):
  del argv
  from icarus_jax import init_adapter
  from icarus_jax.serving.cost_model import RooflineSimulator
  from icarus_jax.serving.engine import Engine
  from icarus_jax.bench.workload import WorkloadConfig, generate_workflows
  cfg, base = model()
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(base))
  kw = dict(page_size=16, max_batch=8, prefill_chunk=128, max_seq_len=2048)
  eng = Engine(cfg, base, num_pages=600, **kw)
  shapes = [(1, 1, 64), (4, 1, 256), (8, 1, 512), (2, 1, 1024), (8, 1, 128), (1, 1, 512),
            (4, 1, 64), (8, 1, 1024), (2, 1, 256), (1, 128, 0), (2, 64, 256), (4, 128, 128),
            (1, 32, 512), (8, 16, 64), (2, 128, 0), (1, 64, 256)]
  timed = time_steps(eng, shapes)
  train, held = timed[::2], timed[1::2]
  names = ["a0", "a1"]
  ads = [init_adapter(cfg, jax.random.key(10 + i), name=n, base_params=base, rank=8, b_std=0.02)
         for i, n in enumerate(names)]
  wl = WorkloadConfig(num_workflows=FLAGS.workflows, num_models=2, request_rate=1.0, num_turns=4,
                      system_len=256, context_len=64, header_len=8, output_len=16,
                      observation_len=48, seed=FLAGS.seed, token_low=32, token_high=8000)
  wfs = generate_workflows(wl)
  warm = Engine(cfg, base, num_pages=600, **kw)
  for a in ads:
    warm.add_adapter(a)
  run_workload(warm, names, wfs)  # compiles every bucket shape the measured run meets
  calib = Engine(cfg, base, num_pages=600, **kw)
  for a in ads:
    calib.add_adapter(a)
  calib_rec = instrument(calib)
  run_workload(calib, names, wfs)  # compiled already: host time per device step
  host_s = host_per_execute(calib_rec)  # calibrated on its own run, not the measured one
  real = Engine(cfg, base, num_pages=600, **kw)
  for a in ads:
    real.add_adapter(a)
  real_rec = instrument(real)
  m_real = run_workload(real, names, wfs)
  keys = ("p50_workflow_latency_ms", "p95_workflow_latency_ms", "duration", "engine_steps",
          "prefill_tokens_computed")
  models = {}
  fits = {}
  for name, executed, host in (("rows", False, False), ("executed", True, False),
                               ("executed_host", True, True)):
    if executed not in fits:
      fits[executed] = fit(cfg, train, kw["page_size"], executed)
    err, hw = fits[executed]
    if host:  # the engine's own host work per device step, measured on the calibration run
      hw = dataclasses.replace(hw, step_overhead_s=hw.step_overhead_s + host_s)
    sim = RooflineSimulator(cfg, hw, bytes_per_param=4, executed_shape=executed)
    for t in timed if not host else ():  # device steps: the host term does not apply
      t[f"predicted_s_{name}"] = sim.price(t["step"], kw["page_size"], True)
      t[f"rel_error_{name}"] = (t[f"predicted_s_{name}"] - t["measured_s"]) / t["measured_s"]
    proj = Engine(cfg, base, num_pages=600, simulator=sim, **kw)
    for a in ads:
      proj.add_adapter(a)
    m_proj = run_workload(proj, names, wfs)
    models[name] = {
        "fitted": {"bandwidth_bytes_per_s": hw.hbm_bandwidth, "flops_per_s": hw.peak_flops,
                   "kv_read_bandwidth_bytes_per_s": hw.kv_read_bandwidth,
                   "step_overhead_s": hw.step_overhead_s, "train_mean_abs_rel_error": err},
        "heldout_mean_abs_rel_error": None if host else float(
            np.mean([abs(t[f"rel_error_{name}"]) for t in held])),
        "workflow": {k: {"measured": m_real[k], "predicted": m_proj[k],
                         "rel_error": (m_proj[k] - m_real[k]) / m_real[k] if m_real[k] else None}
                     for k in keys}}
  for t in timed:
    del t["step"]
  out = {"command": "python -m benchmarks.cost_model_cpu " + " ".join(sys.argv[1:]),
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                     "jax": jax.__version__},
         "seed": FLAGS.seed, "model_params": int(n_params), "model": {
             "d_model": cfg.d_model, "layers": cfg.num_layers, "heads": cfg.num_heads,
             "kv_heads": cfg.num_kv_heads, "mlp": cfg.mlp_dim, "vocab": cfg.vocab_size},
         "engine": kw, "models": models, "steps": timed,
         "host": {"calibration_host_s_per_execute": host_s, "calibration_run": calib_rec,
                  "measured_run": {**real_rec, "host_s_per_execute": host_per_execute(real_rec)}}}
  Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
  Path(FLAGS.out).write_text(json.dumps(out, indent=1))
  print(json.dumps({"model_params": out["model_params"], "models": models,
                    "host": out["host"]}, indent=1))


if __name__ == "__main__":
  app.run(main)
