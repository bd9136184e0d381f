r"""Fused ICaRus decode step vs the conventional step, timed on whatever device JAX has.

  python -m benchmarks.device_steps --out /tmp/device_steps.json     # on a GPU or TPU

A random Llama-style model (``--preset``, default a 1B-class shape, bf16) and the engine's own
jitted step (``engine_steps.step``) on a decode bucket of ``--batch`` rows, each over
``--context`` cached tokens on its own shuffled pages, half the rows on an adapter: the ICaRus
step (encoder row + decoder row per sequence, one read of weights and pages) and the
conventional step (one row, adapter on K/V too), both attention backends. Median of ``--iters``
donated calls after warm-up. Prints one JSON line and writes it to ``--out``. On CPU it runs
(small) but says nothing about accelerators: that is what ``benchmarks/device_check.sh gpu`` and
``benchmarks/device_check.sh tpu`` run it for.
"""

from __future__ import annotations

import datetime
import dataclasses
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from icarus_jax import init_base_params
from icarus_jax.model.adapters import DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS, init_adapter
from icarus_jax.model.config import ModelConfig
from icarus_jax.serving import engine_steps, step_batch
from icarus_jax.serving.adapter_pool import AdapterPool

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/device_steps.json", "JSON output")
flags.DEFINE_integer("batch", 32, "decode rows")
flags.DEFINE_integer("context", 2048, "cached tokens per row")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_integer("iters", 20, "timed steps")
flags.DEFINE_integer("layers", 16, "layers of the random model")
flags.DEFINE_integer("d_model", 2048, "width of the random model")
flags.DEFINE_list("backends", ["reference", "pallas"], "attention backends")


def model_config() -> ModelConfig:
  d = FLAGS.d_model
  return ModelConfig.from_preset("llama-3.1-8b").replace(
      name=f"random-{FLAGS.layers}l-{d}", num_layers=FLAGS.layers, d_model=d,
      num_heads=d // 64, num_kv_heads=max(1, d // 256), head_dim=64, mlp_dim=4 * d,
      vocab_size=32_000)


def timed(fn, iters: int) -> float:
  fn()  # compile + warm-up
  fn()
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def main(argv):
  del argv
  cfg = model_config()
  base = init_base_params(cfg, jax.random.key(0))
  B, ps = FLAGS.batch, FLAGS.page_size
  N = -(-FLAGS.context // ps)
  rng = np.random.RandomState(0)
  table = (1 + rng.permutation(B * N)).reshape(B, N).astype(np.int32)
  out = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "model": cfg.name,
         "batch": B, "context": FLAGS.context, "date": datetime.date.today().isoformat(),
         "machine": platform.node(), "steps_s": {}}
  for mode, targets in (("icarus", DEFAULT_ICARUS_TARGETS), ("isolated", DEFAULT_LORA_TARGETS)):
    pool = AdapterPool(cfg, capacity=2, max_rank=16, targets=targets)
    slot = pool.add("a", init_adapter(cfg, jax.random.key(1), name="a", kind="icarus_lora"
                                      if mode == "icarus" else "lora", targets=targets, rank=16,
                                      base_params=base, b_std=0.01))
    rows = [step_batch.StepRow([1] * FLAGS.context, FLAGS.context - 1, 1, list(table[b]),
                               slot if b % 2 else 0) for b in range(B)]
    st = step_batch.build(rows, decode=True, max_batch=B, prefill_chunk=16, max_pages=N)
    batch = jax.device_put(dataclasses.replace(st.batch, sampling=None))
    for backend in FLAGS.backends:
      attn = {"reference": engine_steps.paged_attention_reference,
              "pallas": engine_steps.paged_attention_pallas}[backend]
      state = {"pages": jnp.asarray(rng.standard_normal(engine_steps.pool_shape(
          cfg, B * N + 1, ps)).astype(np.float32) * 0.1, cfg.jnp_dtype)}
      step = functools.partial(engine_steps.step, cfg, mode, attn_fn=attn)

      def call():
        logits, state["pages"] = step(base, pool.weights, state["pages"], batch)
        return logits
      out["steps_s"][f"{mode}/{backend}"] = timed(call, FLAGS.iters)
  s = out["steps_s"]
  out["icarus_over_isolated"] = {b: s[f"icarus/{b}"] / s[f"isolated/{b}"] for b in FLAGS.backends}
  line = json.dumps(out)
  Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
  Path(FLAGS.out).write_text(line + "\n")
  print(line)


if __name__ == "__main__":
  app.run(main)
