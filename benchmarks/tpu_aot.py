r"""What libtpu's compiler says about our programs on real TPU topologies (no TPU needed).

  python -m benchmarks.tpu_aot --out docs/results/tpu_aot.json

Needs libtpu (``pip install -r requirements-aot.txt``). For every case it compiles ahead of time
on compile-only devices (``icarus_jax.bench.aot``) and records compile status and time,
per-device argument / output / temporary bytes, ``cost_analysis`` flops and bytes, libtpu's
estimated cycles, and any pool-shaped copy or collective:

* the Pallas kernel at Llama-3.1-8B / Qwen2.5-7B / SmolLM2 head layouts (v5e, v6e; and the
  Triton lowering through ``jax.export(platforms=["cuda"])``);
* the engine's sharded serving step, Llama-3.1-8B bf16 on v5e 2x4 and v6e 2x4 (data 2 x model
  4): icarus / isolated x reference / Pallas x decode (B=64, 512 pages per row) / prefill
  (B=4 x T=512), with the KV pool ``cost_model.kv_budget`` gives one model-parallel group, and
  the pages that fit under libtpu's HBM limit;
* per-layer and per-step costs from the compiler (layer scan unrolled x1 and x2, the difference
  is one layer) for the decode bucket in both modes, next to the roofline formula's bytes and
  flops for the same bucket (``cost_model.RooflineSimulator``), and the ICaRus / isolated ratio;
* the pool kept in place on meshes 1x8, 2x4, 4x2, 8x1 (two pool sizes, 8B head layout);
* the ICaRus-LoRA training step.

Writes the JSON and a markdown table beside it (``.md``) with the command, machine and date.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import jax
from absl import app, flags
from tqdm import tqdm

from icarus_jax.bench import aot
from icarus_jax.model.config import ModelConfig
from icarus_jax.serving import cost_model

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs/results/tpu_aot.json", "JSON output (markdown beside it)")
flags.DEFINE_list("topologies", ["v5e:2x4", "v6e:2x4"], "TPU topologies (8 chips each)")
flags.DEFINE_boolean("meshes", True, "also sweep data x model = 1x8, 2x4, 4x2, 8x1 (in place)")

GIB = 2**30


def kernel_cases():
  return [
      aot.KernelCase("llama-3.1-8b decode", 32, 8, 128, T=2),
      aot.KernelCase("llama-3.1-8b fan-out", 32, 8, 128, T=8, splits=4),
      aot.KernelCase("llama-3.1-8b prefill", 32, 8, 128, T=33, q_block=16, window=4096),
      aot.KernelCase("qwen2.5-7b decode ps32", 28, 4, 128, T=1, page_size=32),
      aot.KernelCase("smollm2 prefill", 9, 3, 64, T=33, q_block=16),
  ]


def budget_pages(cfg, topology: str, model: int) -> int:
  hw = cost_model.HARDWARE["tpu-" + aot.chip(topology)]
  return cost_model.kv_budget(cfg, hw, chips=model, adapter_slots=8, lora_rank=16).kv_pages


def formula(cfg, hw_name: str, c: aot.StepCase, icarus: bool) -> dict:
  """The roofline formula's bytes and flops for the bucket as the reference backend runs it
  (every row over all N pages: ``executed_shape``), per device of a ``model``-way group and
  ``data``-way row split."""
  sim = cost_model.RooflineSimulator(cfg, cost_model.HARDWARE[hw_name])
  rows = [(c.N * c.page_size, c.T, 1 + b % c.adapter_slots) for b in range(c.B)]
  b = sim.step_bytes(rows, icarus)
  flops = 0.0
  for ctx, n_new, _ in rows:
    q_rows = n_new + (1 if icarus else 0)
    flops += 2.0 * sim.layer_params * q_rows + 2.0 * sim.head_params
    flops += 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * ctx * q_rows
  per_dev = c.data * c.model
  weights_dev = (b["weights"] + b["lora"]) / c.model          # replicated over data
  kv_dev = (b["kv_read"] + b["kv_write"]) / per_dev           # rows over data, heads over model
  return {"bytes": weights_dev + kv_dev, "flops": flops / per_dev,
          "time_s": sim.step_time(rows, c.T == 1, icarus, dense=True) - sim.hw.step_overhead_s}


def main(argv):
  del argv
  missing = aot.libtpu_missing()
  if missing:
    sys.exit(f"benchmarks.tpu_aot: {missing}")
  t0 = time.time()
  llama = ModelConfig.from_preset("llama-3.1-8b")
  out = {"command": "python -m " + " ".join(["benchmarks.tpu_aot"] + sys.argv[1:]),
         "date": datetime.date.today().isoformat(), "machine": platform.platform(),
         "jax": jax.__version__, "libtpu": _libtpu_version(), "kernels": [], "steps": [],
         "per_layer": [], "meshes": [], "train": []}

  jobs = [("kernel", k, t) for t in ("v5e:2x2", "v6e:2x4") for k in kernel_cases()]
  jobs += [("cuda", k, None) for k in kernel_cases()]
  for topo in FLAGS.topologies:
    pages = budget_pages(llama, topo, 4)
    for mode in ("icarus", "isolated"):
      for backend in ("reference", "pallas"):
        for B, T, N in ((64, 1, 512), (4, 512, 64)):
          jobs.append(("step", aot.StepCase(llama, topology=topo, mode=mode, backend=backend,
                                            B=B, T=T, N=N, num_pages=pages), None))
    for mode in ("icarus", "isolated"):
      jobs.append(("layer", aot.StepCase(llama, topology=topo, mode=mode, B=64, T=1, N=512,
                                         num_pages=pages), None))
    jobs.append(("train", topo, None))
  if FLAGS.meshes:
    small = llama.replace(name="llama-8b-heads-2l", num_layers=2, vocab_size=4096)
    for topo in FLAGS.topologies:
      for d, m in ((1, 8), (2, 4), (4, 2), (8, 1)):
        page_bytes = 2 * small.num_layers * 16 * small.num_kv_heads * small.head_dim * 2 // m
        for backend in ("reference", "pallas"):
          jobs.append(("mesh", [aot.StepCase(small, topology=topo, data=d, model=m,
                                             backend=backend, B=16, T=1, N=64, num_pages=n)
                                for n in (2**29 // page_bytes, 2**32 // page_bytes)], None))

  for kind, case, extra in tqdm(jobs, desc="libtpu compiles", unit="case"):
    if kind == "kernel":
      out["kernels"].append(aot.compile_kernel_tpu(case, extra).as_dict())
    elif kind == "cuda":
      out["kernels"].append(aot.export_kernel_cuda(case).as_dict())
    elif kind == "step":
      r = aot.compile_serving_step(case)
      d = r.as_dict()
      d.update(mode=case.mode, backend=case.backend, topology=case.topology,
               bucket="decode" if case.T == 1 else "prefill", num_pages=case.num_pages,
               max_pages=aot.max_pages(case, r) if r.ok else None)
      out["steps"].append(d)
    elif kind == "layer":
      costs = aot.per_layer(case)
      hw = "tpu-" + aot.chip(case.topology)
      out["per_layer"].append({"case": case.name, "topology": case.topology, "mode": case.mode,
                               "compiler": costs,
                               "formula": formula(llama, hw, case, case.mode == "icarus")})
    elif kind == "train":
      out["train"].append(aot.compile_train_step(llama, case, 2, 4, batch=8, seq=512).as_dict())
    elif kind == "mesh":
      rs = [aot.compile_serving_step(c) for c in case]
      out["meshes"].append({"case": case[0].name, "topology": case[0].topology,
                            "data": case[0].data, "model": case[0].model,
                            "backend": case[0].backend, "ok": all(r.ok for r in rs),
                            "pages": [c.num_pages for c in case],
                            "temp_bytes": [r.temp_bytes for r in rs],
                            "pool_bytes_per_device": [r.extra.get("pool_bytes_per_device")
                                                      for r in rs],
                            "pool_copies": sum(len(r.pool_copies) for r in rs),
                            "pool_collectives": sum(len(r.pool_collectives) for r in rs)})
  ratios = {}
  for topo in FLAGS.topologies:
    pl = {p["mode"]: p for p in out["per_layer"] if p["topology"] == topo}
    if {"icarus", "isolated"} <= set(pl):
      ratios[topo] = {k: pl["icarus"]["compiler"][k]["step"] / pl["isolated"]["compiler"][k]["step"]
                      for k in ("flops", "bytes_accessed", "estimated_cycles")}
  out["icarus_over_isolated_decode"] = ratios
  out["wall_s"] = round(time.time() - t0, 1)
  path = Path(FLAGS.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  path.with_suffix(".md").write_text(render(out))
  print(render(out))


def _libtpu_version() -> str:
  try:
    from importlib.metadata import version
    return version("libtpu")
  except Exception:  # noqa: BLE001
    return "unknown"


def render(out: dict) -> str:
  L = [f"# libtpu ahead-of-time compiles (`{out['command']}`)", "",
       f"{out['date']}, {out['machine']}, jax {out['jax']}, libtpu {out['libtpu']}; compile-only "
       f"TPU devices, nothing run. Bytes are per device. Wall time {out['wall_s']} s.", "",
       "## Kernels", "", "| case | ok | compile s | error |", "| --- | --- | --- | --- |"]
  for k in out["kernels"]:
    L.append(f"| {k['case']} | {k['ok']} | {k['compile_s']:.2f} | {k['error'][:80]} |")
  L += ["", "## Serving step, Llama-3.1-8B bf16, data 2 x model 4", "",
        "| topology | mode | backend | bucket | ok | compile s | pages | args GiB | temp GiB | "
        "peak GiB | limit GiB | pool GiB/dev | temp / pool | pool copies | pool collectives | "
        "max pages |", "| " + " | ".join(["---"] * 16) + " |"]
  for s in out["steps"]:
    pool = s["extra"].get("pool_bytes_per_device", 0)
    L.append(f"| {s['topology']} | {s['mode']} | {s['backend']} | {s['bucket']} | {s['ok']} | "
             f"{s['compile_s']:.1f} | {s['num_pages']} | {s['argument_bytes'] / GIB:.2f} | "
             f"{s['temp_bytes'] / GIB:.3f} | {s['peak_bytes'] / GIB:.2f} | "
             f"{s['extra'].get('hbm_limit', 0) / GIB:.2f} | {pool / GIB:.2f} | "
             f"{s['temp_bytes'] / max(pool, 1):.3f} | {len(s['pool_copies'])} | "
             f"{len(s['pool_collectives'])} | {s['max_pages']} |")
  L += ["", "## Decode step cost from the compiler vs the roofline formula (per device)", "",
        "Compiler: layer scan unrolled x1 and x2; step = once + (L - 1) x layer. Formula: "
        "`RooflineSimulator` bytes and flops of the same bucket (64 rows x 8,192 keys, the "
        "reference backend reads every page of the table) divided over the mesh.", "",
        "| topology | mode | compiler GFLOP | formula GFLOP | compiler GB accessed | formula GB | "
        "est. Mcycles | formula ms |", "| " + " | ".join(["---"] * 8) + " |"]
  for p in out["per_layer"]:
    c, f = p["compiler"], p["formula"]
    L.append(f"| {p['topology']} | {p['mode']} | {c['flops']['step'] / 1e9:.1f} | "
             f"{f['flops'] / 1e9:.1f} | {c['bytes_accessed']['step'] / 1e9:.2f} | "
             f"{f['bytes'] / 1e9:.2f} | {c['estimated_cycles']['step'] / 1e6:.1f} | "
             f"{f['time_s'] * 1e3:.2f} |")
  L += ["", "ICaRus / isolated decode step (compiler): " + ", ".join(
      f"{t}: flops {r['flops']:.2f}x, bytes {r['bytes_accessed']:.2f}x, est. cycles "
      f"{r['estimated_cycles']:.2f}x" for t, r in out["icarus_over_isolated_decode"].items()), ""]
  if out["meshes"]:
    L += ["## Pool in place on every mesh (2-layer model with Llama-3.1-8B heads, decode B=16)", "",
          "| topology | data x model | backend | ok | pages | temp bytes | pool copies | "
          "pool collectives |", "| " + " | ".join(["---"] * 8) + " |"]
    for m in out["meshes"]:
      L.append(f"| {m['topology']} | {m['data']}x{m['model']} | {m['backend']} | {m['ok']} | "
               f"{m['pages']} | {m['temp_bytes']} | {m['pool_copies']} | "
               f"{m['pool_collectives']} |")
  L += ["", "## ICaRus-LoRA training step, Llama-3.1-8B, batch 8 x 512, data 2 x model 4", "",
        "| case | ok | compile s | peak GiB | temp GiB |", "| --- | --- | --- | --- | --- |"]
  for t in out["train"]:
    L.append(f"| {t['case']} | {t['ok']} | {t['compile_s']:.1f} | {t['peak_bytes'] / GIB:.2f} | "
             f"{t['temp_bytes'] / GIB:.2f} |")
  return "\n".join(L) + "\n"


if __name__ == "__main__":
  app.run(main)
