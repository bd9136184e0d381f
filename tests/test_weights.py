"""Every base weight is declared once (``model.params.LAYER_WEIGHTS`` / ``TOP_WEIGHTS``): the
shapes, the logical sharding axes, the init and the LoRA targets are all derived from it and agree
with each other, for a Llama-style, a Qwen-style (biases, q/k-norm) and a tied-embedding config."""

import jax
import pytest

from icarus_jax.model.adapters import LAYER_LORA_TARGETS, lora_shapes
from icarus_jax.model.config import tiny_config
from icarus_jax.model.params import WEIGHTS, init_base_params, logical_axes, param_shapes
from icarus_jax.model.sharding import base_logical_axes

CONFIGS = {"llama": {}, "qwen": {"attention_bias": True, "qk_norm": True},
           "tied": {"tie_embeddings": True}}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_axes_and_init_come_from_one_declaration(name):
  cfg = tiny_config(**CONFIGS[name])
  shapes, axes = param_shapes(cfg), logical_axes(cfg)
  is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
  assert jax.tree_util.tree_structure(shapes, is_leaf=is_shape) == \
      jax.tree_util.tree_structure(axes, is_leaf=is_shape)
  for s, a in zip(jax.tree_util.tree_leaves(shapes, is_leaf=is_shape),
                  jax.tree_util.tree_leaves(axes, is_leaf=is_shape)):
    assert len(s) == len(a)
  params = init_base_params(cfg, jax.random.key(0))
  assert jax.tree_util.tree_map(lambda x: tuple(x.shape), params) == shapes
  assert base_logical_axes(cfg, params) == axes
  assert ("q_bias" in shapes["layers"]) == cfg.attention_bias
  assert ("k_norm" in shapes["layers"]) == cfg.qk_norm
  assert ("lm_head" in shapes) == (not cfg.tie_embeddings)
  # norms start at one, matrices at N(0, scale)
  assert float(params["layers"]["attn_norm"].min()) == 1.0
  assert float(abs(params["layers"]["q"]).max()) > 0 and float(params["layers"]["q"].std()) < 0.1
  # LoRA factors: [L, in, r] x [L, r, out] of each projection, sharded like it
  lora = lora_shapes(cfg, LAYER_LORA_TARGETS, 4)["layers"]
  for t in LAYER_LORA_TARGETS:
    L, din, dout = shapes["layers"][t]
    assert lora[t] == {"a": (L, din, 4), "b": (L, 4, dout)}
    assert len(WEIGHTS[t].axes) == 2


def test_lora_targets_are_the_layer_projections():
  assert LAYER_LORA_TARGETS == ("q", "k", "v", "o", "gate", "up", "down")


def test_hand_written_llama_shapes():
  """An independent oracle: the shapes as HF Llama writes them (transposed to [in, out])."""
  cfg = tiny_config()
  L, D, H, K, hd, F, V = (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                          cfg.head_dim, cfg.mlp_dim, cfg.vocab_size)
  assert param_shapes(cfg) == {
      "embed": (V, D), "final_norm": (D,), "lm_head": (D, V),
      "layers": {"attn_norm": (L, D), "q": (L, D, H * hd), "k": (L, D, K * hd),
                 "v": (L, D, K * hd), "o": (L, H * hd, D), "mlp_norm": (L, D),
                 "gate": (L, D, F), "up": (L, D, F), "down": (L, F, D)}}
