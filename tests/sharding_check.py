"""Run in a subprocess with 8 forced CPU devices (see test_sharding.py); prints one JSON line."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from icarus_jax import IcarusError, init_adapter, init_base_params, tiny_config  # noqa: E402
from icarus_jax.serving import step_batch  # noqa: E402
from icarus_jax.serving import engine_steps
from icarus_jax.serving.engine import Engine  # noqa: E402
from icarus_jax.serving.runner import rows_split  # noqa: E402
from icarus_jax.serving.sampling import SamplingParams  # noqa: E402
from icarus_jax.model.sharding import make_mesh, shard_base, shard_engine  # noqa: E402
from icarus_jax.training.objective import TrainConfig, init_trainable, make_optimizer, train_step  # noqa: E402


def pool_growth(cfg, e, mesh, attn=None):
  """Sharded fused decode step lowered for 256 and 16,384 pages (shapes only): temp bytes per
  device and pool-shaped copies / all-gathers in the compiled HLO (in place: none)."""
  import re
  from jax.sharding import NamedSharding
  from icarus_jax.model.sharding import PAGES_AXES, _spec, load_rules
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
  temps, bad = [], 0
  for P in (256, 16384):
    shape = engine_steps.pool_shape(cfg, P, 8)
    pages = jax.ShapeDtypeStruct(shape, jnp.float32,
                                 sharding=NamedSharding(mesh, _spec(PAGES_AXES, load_rules())))
    c = engine_steps.icarus_step.lower(cfg, e.runner.base, e.runner.pool.weights, pages, i32(4, 1), i32(4, 1),
                                       jax.ShapeDtypeStruct((4, 1), jnp.bool_), i32(4, 4), i32(4),
                                       i32(4), i32(4), attn_fn=attn).compile()
    temps.append(c.memory_analysis().temp_size_in_bytes)
    pat = re.compile(r"\[(%d,%d|%d),\d+,8," % (cfg.num_layers, P, cfg.num_layers * P))
    bad += sum(1 for l in c.as_text().splitlines()
               if pat.search(l) and re.search(r"\s(copy|all-gather)\(", l))
  return {"pool_temp_growth_bytes": temps[1] - temps[0], "pool_copies": bad,
          "large_pool_bytes": 4 * cfg.num_layers * 16384 * 8 * 2 * cfg.num_kv_heads * cfg.head_dim}


def main():
  out = {"devices": len(jax.devices())}
  cfg = tiny_config(num_heads=8, num_kv_heads=8, head_dim=8, mlp_dim=128)
  base = init_base_params(cfg, jax.random.key(0), scale=0.1)
  ads = [init_adapter(cfg, jax.random.key(5 + i), name=f"a{i}", base_params=base, b_std=0.05)
         for i in range(3)]
  rng = np.random.RandomState(0)
  prompts = [list(rng.randint(0, 256, n)) for n in (5, 13, 21, 30)]
  names = [None, "a0", "a1", "a2"]

  def engine(backend="reference"):
    e = Engine(cfg, base, mode="icarus", num_pages=32, page_size=8, max_batch=4, prefill_chunk=16,
               attention_backend=backend)
    for a in ads:
      e.add_adapter(a)
    return e

  ref = [o.output_tokens for o in engine().generate(prompts, names, SamplingParams(max_tokens=6))]
  ref_p = [o.output_tokens for o in engine("pallas").generate(prompts, names,
                                                               SamplingParams(max_tokens=6))]
  def runner_step(e):
    """One prefill step through the engine's runner (explicit shardings on a mesh)."""
    lp = SamplingParams(logprobs=20)  # the step's 20 most likely tokens' logprobs per row
    st = step_batch.build([step_batch.StepRow([3, 4, 5, 6, 7], 0, 5, [1], 2, lp),
                           step_batch.StepRow([9, 8, 7], 0, 3, [2], 0, lp)], decode=False,
                          max_batch=4, prefill_chunk=16, max_pages=4)
    res = e.runner.execute(st)
    # ids in the order of the first run's, so a near-tie swapped between runs still compares
    return {int(i): float(v) for i, v in zip(res.top_ids.ravel() + 1000 * np.repeat(
        np.arange(2), 20), res.top_logprobs.ravel())}

  r0 = {b: runner_step(engine(b)) for b in ("reference", "pallas")}
  # one step's logits, unsharded
  e0 = engine()
  args = (np.array([[3, 4, 5, 6]], np.int32), np.array([[0, 1, 2, 3]], np.int32),
          np.ones((1, 4), bool), np.array([[1]], np.int32), np.array([6], np.int32),
          np.array([3], np.int32), np.array([2], np.int32))
  l0, _ = engine_steps.icarus_step(cfg, e0.runner.base, e0.runner.pool.weights, e0.runner.pages, *args)
  tc = TrainConfig(mode="icarus_lora")
  batch = {"inputs": jnp.asarray(rng.randint(0, 256, (4, 16)), jnp.int32),
           "targets": jnp.asarray(rng.randint(0, 256, (4, 16)), jnp.int32),
           "mask": jnp.ones((4, 16))}
  tx = make_optimizer(tc)
  ad0 = init_trainable(cfg, base, tc)
  ad0 = jax.tree.map(lambda x: x + 0.01, ad0)
  t0, _, m0 = train_step(cfg, ad0, tx.init(ad0.params), base, batch, tx=tx)
  for spec in ("data:1,model:8", "data:2,model:4", "data:8,model:1"):
    mesh = make_mesh(spec)
    e = shard_engine(engine(), mesh)
    got = [o.output_tokens for o in e.generate(prompts, names, SamplingParams(max_tokens=6))]
    ep = shard_engine(engine("pallas"), mesh)
    got_p = [o.output_tokens for o in ep.generate(prompts, names, SamplingParams(max_tokens=6))]
    e1 = shard_engine(engine(), mesh)
    l1, pages = engine_steps.icarus_step(cfg, e1.runner.base, e1.runner.pool.weights, e1.runner.pages, *args)
    r1 = {b: runner_step(shard_engine(engine(b), mesh)) for b in ("reference", "pallas")}
    sb = shard_base(cfg, base, mesh)
    ad1 = init_trainable(cfg, base, tc)
    ad1 = jax.tree.map(lambda x: x + 0.01, ad1)
    t1, _, m1 = train_step(cfg, ad1, tx.init(ad1.params), sb, batch, tx=tx)
    out[spec] = {
        "tokens_equal": got == ref,
        "step_logits_max_diff": float(jnp.abs(l1 - l0).max()),
        "runner_logits_max_diff": {b: max(abs(r1[b].get(k, np.inf) - v) for k, v in r0[b].items())
                                   for b in r0},  # top-20 logprobs of the sampling step
        "sharded_step_programs": e.runner.compiled_steps(),
        "train_loss_diff": abs(float(m1["loss"]) - float(m0["loss"])),
        "train_params_max_diff": float(max(jax.tree.leaves(jax.tree.map(
            lambda a, b: jnp.abs(a - b).max(), t1.params, t0.params)))),
        "q_weight_sharding": str(e.runner.base["layers"]["q"].sharding.spec),
        "q_weight_replicated": e.runner.base["layers"]["q"].sharding.is_fully_replicated,
        "pages_sharding": str(e.runner.pages.sharding.spec),
        "pages_devices": len(e.runner.pages.sharding.device_set),
        "pool_sharding": str(e.runner.pool.weights["layers"]["q"]["b"].sharding.spec),
        **pool_growth(cfg, e, mesh),
        "pallas_tokens_equal": got_p == ref_p,
        "sharded_attention_axes": [ep.runner.sharded_attention(rows_split(mesh, 8)).row_axis,
                                   ep.runner.sharded_attention(rows_split(mesh, 8)).head_axis],
        "pallas": pool_growth(cfg, ep, mesh, ep.runner.sharded_attention(False)),
    }
  try:
    make_mesh("data:4,model:4")
  except IcarusError as err:
    out["too_large_error"] = str(err)
  try:
    shard_engine(Engine(tiny_config(), init_base_params(tiny_config(), jax.random.key(0)),
                        num_pages=8, page_size=8), make_mesh("data:2,model:4"))
  except IcarusError as err:
    out["kv_heads_error"] = str(err)
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
