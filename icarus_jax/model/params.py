"""The frozen base parameter pytree: its layout, random init and fingerprint.

Every weight is declared once in :data:`LAYER_WEIGHTS` / :data:`TOP_WEIGHTS` (shape, logical
sharding axes, initializer, condition); shapes, init, sharding rules and LoRA factor shapes are
derived from that table.

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

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Weight:
  """One base weight, declared once: what ``param_shapes``, ``init_base_params``, the sharding
  rules (``model.sharding``) and the LoRA factor shapes (``model.adapters``) all read.

  ``dims`` are config attribute names, or ``"heads*head_dim"`` style products, per axis (the
  layer axis excluded); ``axes`` the logical sharding axis of each; ``init`` is ``"normal"``
  (``N(0, scale)``) or ``"ones"``; ``when`` names a config flag the weight exists under
  (``"!tie_embeddings"`` negates).
  """

  name: str
  dims: tuple[str, ...]
  axes: tuple[str, ...]
  init: str = "normal"
  when: str | None = None

  def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
    def size(d):
      n = 1
      for f in d.split("*"):
        n *= getattr(cfg, f)
      return n
    return tuple(size(d) for d in self.dims)

  def present(self, cfg: ModelConfig) -> bool:
    if self.when is None:
      return True
    return not getattr(cfg, self.when[1:]) if self.when.startswith("!") else bool(getattr(cfg, self.when))

  @property
  def is_projection(self) -> bool:
    """A 2-D matrix initialised at random: for a layer weight, a projection ``[in, out]``
    applied as ``x @ W`` (a LoRA target)."""
    return len(self.dims) == 2 and self.init == "normal"


#: Per-layer weights (stacked on a leading ``[num_layers]`` axis, logical axis ``"layers"``).
LAYER_WEIGHTS = (
    Weight("attn_norm", ("d_model",), ("embed",), "ones"),
    Weight("q", ("d_model", "num_heads*head_dim"), ("embed", "heads")),
    Weight("k", ("d_model", "num_kv_heads*head_dim"), ("embed", "kv_heads")),
    Weight("v", ("d_model", "num_kv_heads*head_dim"), ("embed", "kv_heads")),
    Weight("o", ("num_heads*head_dim", "d_model"), ("heads", "embed")),
    Weight("q_bias", ("num_heads*head_dim",), ("heads",), when="attention_bias"),
    Weight("k_bias", ("num_kv_heads*head_dim",), ("kv_heads",), when="attention_bias"),
    Weight("v_bias", ("num_kv_heads*head_dim",), ("kv_heads",), when="attention_bias"),
    Weight("q_norm", ("head_dim",), ("head_dim",), "ones", when="qk_norm"),
    Weight("k_norm", ("head_dim",), ("head_dim",), "ones", when="qk_norm"),
    Weight("mlp_norm", ("d_model",), ("embed",), "ones"),
    Weight("gate", ("d_model", "mlp_dim"), ("embed", "mlp")),
    Weight("up", ("d_model", "mlp_dim"), ("embed", "mlp")),
    Weight("down", ("mlp_dim", "d_model"), ("mlp", "embed")),
)
#: Weights outside the layer stack.
TOP_WEIGHTS = (
    Weight("embed", ("vocab_size", "d_model"), ("vocab", "embed")),
    Weight("final_norm", ("d_model",), ("embed",), "ones"),
    Weight("lm_head", ("d_model", "vocab_size"), ("embed", "vocab"), when="!tie_embeddings"),
)
WEIGHTS = {w.name: w for w in LAYER_WEIGHTS + TOP_WEIGHTS}


def param_shapes(cfg: ModelConfig) -> Params:
  """Nested dict of shapes of the base pytree for ``cfg`` (same structure as the params)."""
  layers = {w.name: (cfg.num_layers, *w.shape(cfg)) for w in LAYER_WEIGHTS if w.present(cfg)}
  shapes: Params = {w.name: w.shape(cfg) for w in TOP_WEIGHTS if w.present(cfg)}
  shapes["layers"] = layers
  return shapes


def logical_axes(cfg: ModelConfig) -> Params:
  """Logical sharding axes of every base weight, in the pytree's structure."""
  axes: Params = {w.name: w.axes for w in TOP_WEIGHTS if w.present(cfg)}
  axes["layers"] = {w.name: ("layers", *w.axes) for w in LAYER_WEIGHTS if w.present(cfg)}
  return axes


def lora_axes(target: str) -> dict[str, tuple[str, ...]]:
  """Logical axes of one adapter's LoRA factors on ``target``: each factor is sharded like the
  weight it modifies on its outer dimension (``a [.., in, r]``, ``b [.., r, out]``)."""
  w = WEIGHTS[target]
  i, o = w.axes
  lead = ("layers",) if w in LAYER_WEIGHTS else ()
  return {"a": (*lead, i, "lora_rank"), "b": (*lead, "lora_rank", o)}


def init_base_params(cfg: ModelConfig, key: jax.Array, *, scale: float = 0.02) -> Params:
  """Random base parameters: ``N(0, scale)`` matrices and biases, unit norms (``Weight.init``)."""
  shapes = param_shapes(cfg)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(flat))
  dtype = cfg.jnp_dtype
  leaves = []
  for (path, shape), k in zip(flat, keys):
    if WEIGHTS[path[-1].key].init == "ones":
      leaves.append(jnp.ones(shape, dtype))
    else:
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
