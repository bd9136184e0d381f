r"""Compile time and step time of the model's three hot paths, to compare two versions of the code.

  PYTHONPATH=<checkout> python -m benchmarks.model_steps --label=before --out=docs/results/model_steps
  python -m benchmarks.model_steps --label=after --out=docs/results/model_steps
  python -m benchmarks.model_steps --compare=before,after --out=docs/results/model_steps

Paths (float32, CPU):
  forward      ``model.forward`` with an ICaRus-LoRA adapter (both streams), batch x seq tokens
  train_step   ``training.train_step`` (icarus_lora, AdamW), batch x seq tokens
  engine_step  ``engine_steps.icarus_step``: one fused decode step of ``batch`` rows (T = 1)
               over the paged pool, adapters from the pool by slot

For each path: ``compile_s`` is the first call after ``jax.clear_caches()`` minus one steady
call (tracing + lowering + XLA compile), ``step_ms`` the median of ``--iters`` calls (p10/p90
too), ``block_until_ready`` around each. Models: the embedded ``small`` preset and a 25M-parameter
``medium`` one where compute, not dispatch, dominates. Only public functions that exist in both
versions are called (found under the package layout's paths or the flat ones before it), so
``PYTHONPATH`` can point at an older checkout. ``--repeats`` runs the
whole measurement that many times in this process and keeps each figure's minimum (other load on
a shared machine only ever adds time).

Writes ``<out>_<label>.json``; ``--compare=a,b`` writes ``<out>.md`` with b / a ratios.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("label", "after", "Name of this run (e.g. before / after).")
flags.DEFINE_string("out", "docs/results/model_steps", "Output prefix.")
flags.DEFINE_integer("iters", 20, "Timed calls per path.")
flags.DEFINE_integer("repeats", 2, "Whole measurements per process (minimum kept).")
flags.DEFINE_integer("batch", 8, "Rows.")
flags.DEFINE_integer("seq", 128, "Tokens per row for forward and train_step.")
flags.DEFINE_list("models", ["small", "medium"], "Model configs.")
flags.DEFINE_list("compare", None, "Two labels to compare (writes <out>.md).")

MEDIUM = dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1536)


def _time_calls(fn, iters):
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  ts.sort()
  med = statistics.median(ts)
  return {"compile_s": max(0.0, first - med), "step_ms": 1e3 * med,
          "p10_ms": 1e3 * ts[len(ts) // 10], "p90_ms": 1e3 * ts[(9 * len(ts)) // 10]}


def _module(path: str, old_path: str):
  """``icarus_jax.<path>``, or ``icarus_jax.<old_path>`` in a checkout from before the package
  layout (issue 18), so one script measures both."""
  import importlib
  try:
    return importlib.import_module(f"icarus_jax.{path}")
  except ModuleNotFoundError:
    return importlib.import_module(f"icarus_jax.{old_path}")


def measure(model: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  engine_steps = _module("serving.engine_steps", "engine_steps")
  AdapterPool = _module("serving.adapter_pool", "adapter_pool").AdapterPool
  adapters = _module("model.adapters", "adapters")
  DEFAULT_ICARUS_TARGETS, init_adapter = adapters.DEFAULT_ICARUS_TARGETS, adapters.init_adapter
  ModelConfig = _module("model.config", "config").ModelConfig
  forward = _module("model.transformer", "model").forward
  init_base_params = _module("model.params", "params").init_base_params
  objective = _module("training.objective", "training")
  TrainConfig, init_trainable = objective.TrainConfig, objective.init_trainable
  make_optimizer, train_step = objective.make_optimizer, objective.train_step

  cfg = ModelConfig.from_preset("small").replace(dtype="float32", vocab_size=272,
                                                 **(MEDIUM if model == "medium" else {}))
  B, T = FLAGS.batch, FLAGS.seq
  base = init_base_params(cfg, jax.random.key(0), scale=0.05)
  adapter = init_adapter(cfg, jax.random.key(1), name="a", base_params=base, rank=8, b_std=0.02,
                         targets=DEFAULT_ICARUS_TARGETS)
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (B, T)), jnp.int32)
  out = {"params": int(sum(x.size for x in jax.tree_util.tree_leaves(base)))}

  jax.clear_caches()
  out["forward"] = _time_calls(lambda: forward(cfg, base, tokens, adapter), FLAGS.iters)

  tc = TrainConfig(mode="icarus_lora", rank=8, total_steps=1000, batch_size=B, seq_len=T)
  tx = make_optimizer(tc)
  state = {"ad": init_trainable(cfg, base, tc)}
  state["opt"] = tx.init(state["ad"].params)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "mask": jnp.ones((B, T), jnp.float32)}

  def train():
    state["ad"], state["opt"], m = train_step(cfg, state["ad"], state["opt"], base, batch, tx)
    return m["loss"]
  jax.clear_caches()
  out["train_step"] = _time_calls(train, FLAGS.iters)

  pool = AdapterPool(cfg, capacity=4, max_rank=8, targets=DEFAULT_ICARUS_TARGETS)
  slot = pool.add("a", adapter)
  ps, N = 16, 8  # 128 cached positions per row, each row on its own pages
  P = 1 + B * N
  pst = {"pages": jnp.asarray(rng.randn(*engine_steps.pool_shape(cfg, P, ps)) * 0.1, jnp.float32)}
  table = jnp.asarray(1 + np.arange(B * N).reshape(B, N), jnp.int32)
  pos = jnp.full((B, 1), ps * N - 1, jnp.int32)
  tok1 = tokens[:, :1]
  rows = jnp.asarray([slot if b % 2 else 0 for b in range(B)], jnp.int32)

  def engine():
    logits, pst["pages"] = engine_steps.icarus_step(cfg, base, pool.weights, pst["pages"], tok1,
                                                    pos, jnp.ones((B, 1), bool), table, tok1[:, 0],
                                                    pos[:, 0], rows)
    return logits
  jax.clear_caches()
  out["engine_step"] = _time_calls(engine, FLAGS.iters)
  return out


def _minimum(runs: list[dict]) -> dict:
  res = {}
  for model in runs[0]:
    res[model] = {"params": runs[0][model]["params"]}
    for path in ("forward", "train_step", "engine_step"):
      res[model][path] = {k: min(r[model][path][k] for r in runs)
                          for k in runs[0][model][path]}
  return res


def compare(a: str, b: str) -> str:
  ra = json.loads(Path(f"{FLAGS.out}_{a}.json").read_text())
  rb = json.loads(Path(f"{FLAGS.out}_{b}.json").read_text())
  lines = [f"| model | path | compile {a} (s) | compile {b} (s) | ratio | step {a} (ms) | "
           f"step {b} (ms) | ratio |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for model, paths in rb["results"].items():
    for path in ("forward", "train_step", "engine_step"):
      x, y = ra["results"][model][path], paths[path]
      lines.append(f"| {model} | {path} | {x['compile_s']:.2f} | {y['compile_s']:.2f} | "
                   f"{y['compile_s'] / x['compile_s']:.2f} | {x['step_ms']:.2f} | "
                   f"{y['step_ms']:.2f} | {y['step_ms'] / x['step_ms']:.2f} |")
  text = (f"# Model hot paths: {a} ({ra['commit'][:8]}) vs {b} ({rb['commit'][:8]})\n\n"
          f"Command: `{rb['command']}` (and the same with `--label={a}` on the other checkout). "
          f"Machine: {rb['machine']}, {rb['date']}.\n\n" + "\n".join(lines) + "\n")
  Path(f"{FLAGS.out}.md").write_text(text)
  return text


def main(argv):
  del argv
  if FLAGS.compare:
    print(compare(*FLAGS.compare))
    return
  import icarus_jax
  root = Path(icarus_jax.__file__).resolve().parents[1]
  commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "icarus_jax",
                               "kernels_pallas"],
                              capture_output=True, text=True).stdout.strip())
  runs = []
  for r in range(FLAGS.repeats):
    runs.append({m: measure(m) for m in FLAGS.models})
    print(f"repeat {r}: " + json.dumps(runs[-1]))
  rec = {"label": FLAGS.label, "commit": commit + ("+dirty" if dirty else ""), "source": str(root),
         "command": f"python -m benchmarks.model_steps --label={FLAGS.label} --iters={FLAGS.iters} "
                    f"--repeats={FLAGS.repeats} --batch={FLAGS.batch} --seq={FLAGS.seq}",
         "machine": f"{platform.processor() or platform.machine()}, "
                    f"{__import__('os').cpu_count()} cores",
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "results": _minimum(runs), "runs": runs}
  Path(f"{FLAGS.out}_{FLAGS.label}.json").write_text(json.dumps(rec, indent=1))
  print(json.dumps(rec["results"], indent=1))


if __name__ == "__main__":
  app.run(main)
