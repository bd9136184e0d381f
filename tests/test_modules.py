"""The Flax NNX model (``icarus_jax.model.modules``): one declaration, used as pure functions.

Oracles: the functional model (``model.transformer.forward``, held to the HF parity tests
elsewhere), ``jax.grad`` of that function with respect to the adapter's plain pytree, and the
Weight table's shapes and axes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from icarus_jax.model.adapters import AdapterConfig, init_adapter
from icarus_jax.model.config import tiny_config
from icarus_jax.model.modules import (AdapterParam, BaseParam, Transformer, adapter_params, apply,
                                      split)
from icarus_jax.model.params import init_base_params, logical_axes, lora_axes, param_shapes
from icarus_jax.model.transformer import dense_attend, embed, forward, head
from icarus_jax.training.objective import (TrainConfig, make_optimizer, masked_ce, state_loss,
                                           train_step)

CONFIGS = {"llama": dict(), "qwen": dict(attention_bias=True, qk_norm=True),
           "tied": dict(tie_embeddings=True)}
TOKENS = jnp.array([[5, 9, 2, 7, 3, 8, 1, 4], [6, 6, 1, 2, 9, 3, 7, 5]], jnp.int32)


def _pspecs(state):
  return jax.tree_util.tree_map(tuple, nnx.get_partition_spec(state).to_pure_dict(),
                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def _adapter(cfg, base, kind, seed=1):
  rank = 4 if kind.endswith("lora") else 8  # full kinds ignore it
  ad = init_adapter(cfg, jax.random.key(seed), kind=kind, rank=rank, base_params=base)
  # make every adapter move the logits (LoRA b = 0 and full copies would equal the base)
  leaves, tdef = jax.tree_util.tree_flatten(ad.params)
  keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return type(ad)(jax.tree_util.tree_unflatten(tdef, leaves), ad.config)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_state_layout_is_the_params_layout_with_the_tables_axes(arch):
  cfg = tiny_config(**CONFIGS[arch])
  base = init_base_params(cfg, jax.random.key(0))
  ad = _adapter(cfg, base, "icarus_lora")
  graphdef, base_state, adapter_state = split(Transformer(cfg, base, ad))
  # the states are the pytrees checkpoints and the engine use: same structure, same arrays
  got = base_state.to_pure_dict()
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(base)
  assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(base)))
  assert jax.tree_util.tree_structure(adapter_params(adapter_state)) == \
      jax.tree_util.tree_structure(ad.params)
  # each weight carries the logical axes declared once in the Weight table
  assert _pspecs(base_state) == logical_axes(cfg)
  want = {"layers": {t: lora_axes(t) for t in ad.params["layers"]}, "lm_head": lora_axes("lm_head")}
  assert _pspecs(adapter_state)["adapter"] == want
  # nothing is left outside the two states (split's filters are exhaustive)
  assert {type(v) for v in jax.tree_util.tree_leaves(
      base_state, is_leaf=lambda x: isinstance(x, nnx.Variable))} == {BaseParam}
  assert {type(v) for v in jax.tree_util.tree_leaves(
      adapter_state, is_leaf=lambda x: isinstance(x, nnx.Variable))} == {AdapterParam}


def test_fresh_model_is_declared_from_the_table_and_a_fresh_lora_is_the_base():
  cfg = tiny_config(attention_bias=True, qk_norm=True)
  model = Transformer(cfg, rngs=nnx.Rngs(0), adapter=AdapterConfig(kind="icarus_lora", rank=4))
  graphdef, base_state, adapter_state = split(model)
  shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), base_state.to_pure_dict())
  assert shapes == param_shapes(cfg)
  np.testing.assert_array_equal(base_state.to_pure_dict()["layers"]["q_norm"], 1.0)
  # b = 0: the fresh ICaRus model is exactly the base model (bitwise)
  np.testing.assert_array_equal(apply(graphdef, base_state, adapter_state, TOKENS),
                                forward(cfg, base_state.to_pure_dict(), TOKENS))
  with pytest.raises(ValueError, match="rngs"):
    Transformer(cfg)


@pytest.mark.parametrize("kind", ["icarus_lora", "lora", "icarus_full", "full", None])
def test_merged_model_equals_the_functional_model(kind):
  cfg = tiny_config(attention_bias=True, qk_norm=True)
  base = init_base_params(cfg, jax.random.key(0))
  ad = None if kind is None else _adapter(cfg, base, kind)
  graphdef, base_state, adapter_state = split(Transformer(cfg, base, ad))
  got = apply(graphdef, base_state, adapter_state, TOKENS)
  np.testing.assert_array_equal(got, forward(cfg, base, TOKENS, ad))
  if ad is not None:  # the adapter really is applied (not silently dropped)
    assert float(jnp.abs(got - forward(cfg, base, TOKENS)).max()) > 1e-3


def test_icarus_model_streams_share_the_bases_cache():
  cfg = tiny_config()
  base = init_base_params(cfg, jax.random.key(0))
  a = Transformer(cfg, base, _adapter(cfg, base, "icarus_lora", seed=1))
  b = Transformer(cfg, base, _adapter(cfg, base, "icarus_lora", seed=2))
  kv_a, kv_b = a.encode(TOKENS), b.encode(TOKENS)
  for name in ("k", "v"):
    np.testing.assert_array_equal(kv_a[name], kv_b[name])
  np.testing.assert_array_equal(a.decode(TOKENS, kv_b), a(TOKENS))


def test_block_is_one_layer_of_the_stack():
  """Running the stacked Block layer by layer reproduces the model (the slicing and stacking)."""
  cfg = tiny_config(attention_bias=True, qk_norm=True)
  base = init_base_params(cfg, jax.random.key(0))
  model = Transformer(cfg, base)
  pos = jnp.broadcast_to(jnp.arange(TOKENS.shape[1], dtype=jnp.int32), TOKENS.shape)
  h = embed(base, TOKENS)
  for i in range(cfg.num_layers):
    h, _ = model.layers(i, h, pos, dense_attend(pos, cfg.sliding_window))
  np.testing.assert_allclose(head(cfg, base, None, h), forward(cfg, base, TOKENS), atol=1e-5)


@pytest.mark.parametrize("kind", ["icarus_lora", "lora", "icarus_full"])
def test_gradient_is_over_the_adapter_state_only_and_matches_the_functional_gradient(kind):
  cfg = tiny_config()
  base = init_base_params(cfg, jax.random.key(0))
  ad = _adapter(cfg, base, kind)
  batch = {"inputs": TOKENS, "targets": jnp.roll(TOKENS, -1, axis=1),
           "mask": jnp.ones(TOKENS.shape, jnp.float32)}
  graphdef, base_state, adapter_state = split(Transformer(cfg, base, ad))
  g_state = jax.grad(lambda s: state_loss(s, graphdef, base_state, batch)[0])(adapter_state)
  grads = adapter_params(g_state)
  assert set(g_state.to_pure_dict()) == {"adapter"}  # no base weight gets a gradient slot

  def oracle(params):  # the functional model, differentiated on the plain adapter pytree
    logits = forward(cfg, base, TOKENS, type(ad)(params, ad.config))
    return masked_ce(logits, batch["targets"], batch["mask"])[0]

  want = jax.grad(oracle)(ad.params)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(want)
  for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 0


def test_train_step_updates_only_the_adapter_and_optax_sees_only_its_leaves():
  cfg = tiny_config()
  base = init_base_params(cfg, jax.random.key(0))
  base_copy = jax.tree_util.tree_map(np.array, base)
  tc = TrainConfig(mode="icarus_lora", rank=4, learning_rate=1e-2, total_steps=3, warmup_steps=1)
  ad = _adapter(cfg, base, "icarus_lora")
  before = jax.tree_util.tree_map(np.array, ad.params)
  tx = make_optimizer(tc)
  opt = tx.init(ad.params)
  n_adapter = len(jax.tree_util.tree_leaves(ad.params))
  mu = [x for x in jax.tree_util.tree_leaves(opt) if getattr(x, "ndim", 0) > 0]
  assert len(mu) == 2 * n_adapter  # Adam's two moments, one per adapter leaf, nothing else
  batch = {"inputs": TOKENS, "targets": jnp.roll(TOKENS, -1, axis=1),
           "mask": jnp.ones(TOKENS.shape, jnp.float32)}
  for _ in range(3):
    ad, opt, metrics = train_step(cfg, ad, opt, base, batch, tx)
  for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(base_copy)):
    np.testing.assert_array_equal(a, b)
  moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(
      jax.tree_util.tree_leaves(ad.params), jax.tree_util.tree_leaves(before))]
  assert min(moved) > 0 and np.isfinite(float(metrics["loss"]))


def test_a_new_adapter_of_the_same_shape_does_not_recompile():
  cfg = tiny_config()
  base = init_base_params(cfg, jax.random.key(0))
  second = _adapter(cfg, base, "icarus_lora", seed=2)
  g1, b1, a1 = split(Transformer(cfg, base, _adapter(cfg, base, "icarus_lora", seed=1)))
  g2, b2, a2 = split(Transformer(cfg, base, second))
  apply(g1, b1, a1, TOKENS)
  n = apply._cache_size()
  out = apply(g2, b2, a2, TOKENS)
  assert apply._cache_size() == n
  np.testing.assert_array_equal(out, forward(cfg, base, TOKENS, second))


def test_nnx_train_step_compiles_to_the_functional_step():
  """Splitting and merging are trace-time only: the step that differentiates the adapter state
  compiles to the same XLA ops as differentiating ``forward`` on the plain adapter pytree, and
  gives bitwise the same update."""
  import collections
  import functools
  import re

  from icarus_jax.model.adapters import Adapter

  cfg = tiny_config()
  base = init_base_params(cfg, jax.random.key(0))
  tc = TrainConfig(mode="icarus_lora", rank=4)
  ad = _adapter(cfg, base, "icarus_lora")
  tx = make_optimizer(tc)
  opt = tx.init(ad.params)
  batch = {"inputs": TOKENS, "targets": jnp.roll(TOKENS, -1, axis=1),
           "mask": jnp.ones(TOKENS.shape, jnp.float32)}

  @functools.partial(jax.jit, static_argnames=("cfg", "tx"))
  def functional_step(cfg, adapter, opt_state, base, batch, tx):
    def loss(params):
      logits = forward(cfg, base, batch["inputs"], Adapter(params, adapter.config))
      loss, acc = masked_ce(logits, batch["targets"], batch["mask"])
      return loss, {"loss": loss, "token_accuracy": acc}
    (_, m), g = jax.value_and_grad(loss, has_aux=True)(adapter.params)
    u, opt_state = tx.update(g, opt_state, adapter.params)
    m["grad_norm"] = optax.global_norm(g)
    return Adapter(optax.apply_updates(adapter.params, u), adapter.config), opt_state, m

  nnx_step = jax.jit(train_step.__wrapped__, static_argnames=("cfg", "tx"))

  def ops(step):
    text = step.lower(cfg, ad, opt, base, batch, tx).compile().as_text()
    return collections.Counter(re.findall(r"= \S+ (\w[\w-]*)\(", text))

  assert ops(nnx_step) == ops(functional_step)
  got, want = nnx_step(cfg, ad, opt, base, batch, tx), functional_step(cfg, ad, opt, base, batch, tx)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)
