r"""Decode step time vs KV pool size: a step must cost the same whatever the pool's size.

  python -m benchmarks.kv_pool_scaling --out docs/results/kv_pool_scaling.json

For pools from ~16 MB to ~4 GB (``--pool_pages``) it builds the engine's decode bucket
(``--batch`` rows, ``T = 1``, ``--pages_per_row`` pages per row, each row on its own pages) of a
``--layers``-layer, ``--d_model``-wide float32 model, then for each mode (ICaRus fused step,
conventional step) and attention backend:

* compiles the step and records XLA's ``memory_analysis().temp_size_in_bytes`` (must stay flat:
  a pool copy would add the pool's size);
* times ``--iters`` donated calls after a warm-up (median and p10/p90, ``time.perf_counter``
  around ``block_until_ready``), interleaved over the pool sizes (round r runs one step on every
  pool) so that load from other processes on a shared machine hits every size alike;
* compares what the step reads and writes with the roofline runner's model
  (``cost_model.RooflineSimulator.step_bytes``: weights + the rows' K/V + the written K/V).

Writes JSON (with command, seed, machine, date) and a PNG plot next to it. ``--flat_tol`` (10%)
is the acceptance: the largest pool's median step may exceed the smallest's by at most that.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from icarus_jax import init_base_params

from icarus_jax.serving import engine_steps
from icarus_jax.serving.adapter_pool import AdapterPool
from icarus_jax.model.adapters import DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS
from icarus_jax.model.config import ModelConfig
from icarus_jax.serving.cost_model import HARDWARE, RooflineSimulator

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs/results/kv_pool_scaling.json", "JSON output (PNG beside it)")
flags.DEFINE_list("pool_pages", ["256", "1024", "4096", "16384", "65536"],
                  "pool sizes in pages (65536 pages of 64 KiB = 4.3 GB)")
flags.DEFINE_list("backends", ["reference", "pallas"], "attention backends to time")
flags.DEFINE_list("modes", ["icarus", "isolated"], "icarus (fused step) and/or isolated")
flags.DEFINE_integer("batch", 8, "decode rows")
flags.DEFINE_integer("pages_per_row", 16, "pages in each row's page table (context = this x page)")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_integer("layers", 4, "model layers")
flags.DEFINE_integer("d_model", 256, "model width")
flags.DEFINE_integer("iters", 40, "timed steps per point")
flags.DEFINE_integer("seed", 0, "random seed (weights, tokens)")
flags.DEFINE_string("before", None, "JSON of an earlier run (e.g. the pre-fix engine) to overlay "
                    "dashed in the plot")
flags.DEFINE_bool("plot_only", False, "only re-draw the PNG from --out (and --before)")
flags.DEFINE_float("flat_tol", 0.10, "largest/smallest pool median step time must be <= 1 + this")


def model_config() -> ModelConfig:
  d = FLAGS.d_model
  return ModelConfig(name=f"bench-{FLAGS.layers}L-d{d}", vocab_size=512, d_model=d,
                     num_layers=FLAGS.layers, num_heads=4, num_kv_heads=2, head_dim=d // 4,
                     mlp_dim=int(d * 2.6875), max_seq_len=4096, dtype="float32")


def step_fn(mode, backend):
  attn = {"reference": engine_steps.paged_attention_reference,
          "pallas": engine_steps.paged_attention_pallas}[backend]
  return (engine_steps.icarus_step if mode == "icarus" else engine_steps.conventional_step), attn


def batch_args(mode, rng, B, N, P, ps, vocab):
  ctx = N * ps - 1  # each row decodes its last slot
  tokens = rng.randint(0, vocab, (B, 1)).astype(np.int32)
  positions = np.full((B, 1), ctx, np.int32)
  valid = np.ones((B, 1), bool)
  table = (1 + np.arange(B * N, dtype=np.int32).reshape(B, N)) % P  # rows on their own pages
  slots = (np.arange(B) % 3).astype(np.int32)
  if mode == "icarus":
    return (tokens, positions, valid, table, tokens[:, 0], positions[:, 0], slots)
  return (tokens, positions, valid, table, np.zeros((B,), np.int32), slots)


def measure(cfg, base, pools, mode, backend, sizes):
  """All pool sizes of one (mode, backend), timed *interleaved*: each of ``--iters`` rounds runs
  one step on every pool, so drift on a shared machine hits every size alike."""
  fn, attn = step_fn(mode, backend)
  rng = np.random.RandomState(FLAGS.seed)
  ps, B, N = FLAGS.page_size, FLAGS.batch, FLAGS.pages_per_row
  pool = pools[mode]
  state, out = {}, {}
  for P in sizes:
    shape = engine_steps.pool_shape(cfg, P, ps)
    args = batch_args(mode, rng, B, N, P, ps, cfg.vocab_size)
    compiled = fn.lower(cfg, base, pool, jax.ShapeDtypeStruct(shape, jnp.float32), *args,
                        attn_fn=attn).compile()
    pages = jnp.zeros(shape, jnp.float32)
    for _ in range(2):  # warm-up (jit reuses the program compiled for these shapes)
      _, pages = fn(cfg, base, pool, pages, *args, attn_fn=attn)
    jax.block_until_ready(pages)
    state[P] = [pages, args, []]
    out[P] = {"mode": mode, "backend": backend, "num_pages": P,
              "pool_bytes": int(np.prod(shape)) * 4,
              "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}
  for _ in range(FLAGS.iters):
    for P in sizes:
      pages, args, times = state[P]
      t0 = time.perf_counter()
      logits, pages = fn(cfg, base, pool, pages, *args, attn_fn=attn)
      jax.block_until_ready((logits, pages))
      times.append(time.perf_counter() - t0)
      state[P][0] = pages
  for P in sizes:
    times = state[P][2]
    out[P].update(median_ms=1e3 * statistics.median(times),
                  p10_ms=1e3 * float(np.percentile(times, 10)),
                  p90_ms=1e3 * float(np.percentile(times, 90)))
  state.clear()
  return [out[P] for P in sizes]


def roofline_bytes(cfg, mode) -> dict:
  """What the roofline runner charges one decode step of this bucket (float32 here)."""
  sim = RooflineSimulator(cfg, HARDWARE["h100"], bytes_per_param=4)
  ctx = FLAGS.pages_per_row * FLAGS.page_size
  rows = [(ctx, 1, 1 + i % 2) for i in range(FLAGS.batch)]
  return sim.step_bytes(rows, icarus=(mode == "icarus"))


def plot(results, path, before=None):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for (mode, backend), rs in _groups(results).items():
    x = [r["pool_bytes"] / 1e6 for r in rs]
    ax.plot(x, [r["median_ms"] for r in rs], marker="o", label=f"{mode} / {backend}")
  for (mode, backend), rs in _groups(before or []).items():
    x = [r["pool_bytes"] / 1e6 for r in rs]
    ax.plot(x, [r["median_ms"] for r in rs], marker="x", linestyle="--",
            label=f"{mode} / {backend}, before (pool copied every step)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("KV pool size (MB)")
  ax.set_ylabel("decode step, median (ms)")
  ax.set_title(f"Decode step vs pool size (B={FLAGS.batch}, {FLAGS.pages_per_row} pages/row, "
               f"{FLAGS.layers}L d{FLAGS.d_model}, CPU)", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _groups(results):
  out = {}
  for r in results:
    out.setdefault((r["mode"], r["backend"]), []).append(r)
  return out


def main(argv):
  del argv
  path = Path(FLAGS.out)
  before = json.loads(Path(FLAGS.before).read_text())["results"] if FLAGS.before else None
  if FLAGS.plot_only:
    plot(json.loads(path.read_text())["results"], path.with_suffix(".png"), before)
    return
  cfg = model_config()
  base = init_base_params(cfg, jax.random.key(FLAGS.seed), scale=0.05)
  pools = {}
  for mode in FLAGS.modes:
    targets = DEFAULT_ICARUS_TARGETS if mode == "icarus" else DEFAULT_LORA_TARGETS
    pools[mode] = AdapterPool(cfg, capacity=4, max_rank=16, targets=targets).weights
  results = []
  try:
    from tqdm import tqdm
  except ImportError:  # pragma: no cover
    tqdm = lambda x, **k: x  # noqa: E731
  sizes = [int(p) for p in FLAGS.pool_pages]
  groups = [(m, b) for m in FLAGS.modes for b in FLAGS.backends]
  for mode, backend in tqdm(groups, desc="mode x backend"):
    for r in measure(cfg, base, pools, mode, backend, sizes):
      results.append(r)
      tqdm.write(f"{mode:9s} {backend:9s} pool {r['pool_bytes'] / 1e6:9.1f} MB  step "
                 f"{r['median_ms']:8.2f} ms  (p10 {r['p10_ms']:.2f}, p90 {r['p90_ms']:.2f})  "
                 f"temp {r['temp_bytes'] / 1e6:7.2f} MB")
  summary = {}
  for (mode, backend), rs in _groups(results).items():
    rs = sorted(rs, key=lambda r: r["pool_bytes"])
    ratio = rs[-1]["median_ms"] / rs[0]["median_ms"]
    summary[f"{mode}/{backend}"] = {
        "smallest_pool_ms": rs[0]["median_ms"], "largest_pool_ms": rs[-1]["median_ms"],
        "largest_over_smallest": ratio, "flat_within_tol": ratio <= 1 + FLAGS.flat_tol,
        "temp_bytes_growth": rs[-1]["temp_bytes"] - rs[0]["temp_bytes"],
        "roofline_step_bytes": roofline_bytes(cfg, mode)}
  out = {"command": "python -m benchmarks.kv_pool_scaling " + " ".join(sys.argv[1:]),
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine": {"platform": platform.platform(), "processor": platform.processor(),
                     "cpus": os.cpu_count(), "jax": jax.__version__,
                     "device": str(jax.devices()[0].device_kind)},
         "seed": FLAGS.seed, "model": cfg.to_dict(),
         "bucket": {"batch": FLAGS.batch, "tokens": 1, "pages_per_row": FLAGS.pages_per_row,
                    "page_size": FLAGS.page_size},
         "flat_tol": FLAGS.flat_tol, "summary": summary, "results": results}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=1))
  plot(results, path.with_suffix(".png"), before)
  print(json.dumps(summary, indent=1))
  print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
  app.run(main)
