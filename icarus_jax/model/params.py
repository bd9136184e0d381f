"""The frozen base parameter pytree: its layout, random init and fingerprint.

Layout (a plain nested dict; layer weights stacked on a leading ``[num_layers]`` axis so the
model scans over layers and compiles one layer body):

    embed        [vocab, d_model]
    final_norm   [d_model]
    lm_head      [d_model, vocab]            (absent when ``tie_embeddings``)
    layers:
      attn_norm  [L, d_model]
      q          [L, d_model, heads * head_dim]
      k, v       [L, d_model, kv_heads * head_dim]
      o          [L, heads * head_dim, d_model]
      q_bias     [L, heads * head_dim]       (attention_bias only)
      k_bias, v_bias [L, kv_heads * head_dim] (attention_bias only)
      q_norm, k_norm [L, head_dim]           (qk_norm only)
      mlp_norm   [L, d_model]
      gate, up   [L, d_model, mlp_dim]
      down       [L, mlp_dim, d_model]

Projection matrices are stored ``[in, out]`` (``x @ W``); Hugging Face stores ``[out, in]``.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from icarus_jax.model.config import ModelConfig

Params = dict[str, Any]

#: Weights that produce K/V (or feed every layer's K/V): an ICaRus adapter may never touch them.
ENCODER_ONLY_WEIGHTS = ("embed", "k", "v", "k_bias", "v_bias", "k_norm")


def param_shapes(cfg: ModelConfig) -> Params:
  """Nested dict of shapes of the base pytree for ``cfg`` (same structure as the params)."""
  L, D, H, K, hd, F, V = (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                          cfg.head_dim, cfg.mlp_dim, cfg.vocab_size)
  layers = {
      "attn_norm": (L, D),
      "q": (L, D, H * hd),
      "k": (L, D, K * hd),
      "v": (L, D, K * hd),
      "o": (L, H * hd, D),
      "mlp_norm": (L, D),
      "gate": (L, D, F),
      "up": (L, D, F),
      "down": (L, F, D),
  }
  if cfg.attention_bias:
    layers.update(q_bias=(L, H * hd), k_bias=(L, K * hd), v_bias=(L, K * hd))
  if cfg.qk_norm:
    layers.update(q_norm=(L, hd), k_norm=(L, hd))
  shapes = {"embed": (V, D), "final_norm": (D,), "layers": layers}
  if not cfg.tie_embeddings:
    shapes["lm_head"] = (D, V)
  return shapes


def init_base_params(cfg: ModelConfig, key: jax.Array, *, scale: float = 0.02) -> Params:
  """Random base parameters: normal(0, scale) matrices and biases, unit norms."""
  shapes = param_shapes(cfg)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(flat))
  dtype = cfg.jnp_dtype
  leaves = []
  for (path, shape), k in zip(flat, keys):
    name = path[-1].key
    if name.endswith("norm"):
      leaves.append(jnp.ones(shape, dtype))
    else:  # matrices and biases
      leaves.append((scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def lm_head_weight(cfg: ModelConfig, params: Params) -> jax.Array:
  """``[d_model, vocab]`` head matrix (the transposed embedding when tied and no own head)."""
  if "lm_head" in params:
    return params["lm_head"]
  return params["embed"].T


def flatten_names(tree: Params, sep: str = ".") -> dict[str, Any]:
  """``{"layers.q": leaf, ...}`` in sorted key order."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[sep.join(str(p.key) for p in path)] = leaf
  return dict(sorted(out.items()))


def unflatten_names(flat: dict[str, Any], sep: str = ".") -> Params:
  out: Params = {}
  for name, leaf in flat.items():
    node = out
    parts = name.split(sep)
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = leaf
  return out


def check_param_shapes(cfg: ModelConfig, params: Params, source: str = "params") -> None:
  """Raises ``CheckpointError`` naming the first missing, extra or mis-shaped tensor."""
  from icarus_jax.errors import CheckpointError
  want = {}
  for path, shape in jax.tree_util.tree_flatten_with_path(
      param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))[0]:
    want[".".join(p.key for p in path)] = tuple(shape)
  have = flatten_names(params)
  for name, shape in want.items():
    if name not in have:
      raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {shape})")
    if tuple(have[name].shape) != shape:
      raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(have[name].shape)}, "
                            f"expected {shape}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise CheckpointError(f"{source}: unexpected tensors {extra} for this config")


def base_fingerprint(cfg: ModelConfig, params: Params) -> str:
  """Stable hash of the frozen base (the ICaRus encoder) that adapters record.

  It covers every base weight (the whole base model is the frozen encoder; the decoder stream
  reuses the same weights under its adapter) plus the config fields that change the math.
  Values are hashed as float32 so the same checkpoint loaded in bf16 or f32 from a bf16 file
  hashes the same. The result is cached on the params dict identity.
  """
  leaves = jax.tree_util.tree_leaves(params)
  key = tuple(id(x) for x in leaves)
  hit = _FP_CACHE.get(key)
  if hit is not None and all(r() is x for r, x in zip(hit[0], leaves)):
    return hit[1]
  h = hashlib.blake2b(digest_size=16)
  math_fields = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim", "rope_theta", "norm_eps", "attention_bias", "qk_norm",
                 "tie_embeddings", "sliding_window")
  h.update(repr([(f, getattr(cfg, f)) for f in math_fields]).encode())
  h.update(repr(cfg.rope_scaling).encode())
  for name, leaf in flatten_names(params).items():
    arr = np.asarray(jax.device_get(leaf)).astype(np.float32)
    h.update(name.encode())
    h.update(repr(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  fp = "icarus-base-" + h.hexdigest()
  try:  # weak references only: the cache never keeps a (possibly huge, unsharded) base alive
    _FP_CACHE[key] = (tuple(weakref.ref(x) for x in leaves), fp)
  except TypeError:  # a leaf type without weakref support: just do not cache
    return fp
  while len(_FP_CACHE) > 16:
    _FP_CACHE.pop(next(iter(_FP_CACHE)))
  return fp


_FP_CACHE: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], str]] = {}


def param_bytes(tree: Params) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))
