"""The model as Flax NNX modules, used as pure functions: a graph, a frozen base state, adapter states.

    from flax import nnx
    from icarus_jax.model.modules import Transformer, apply, split

    model = Transformer(cfg, rngs=nnx.Rngs(0), adapter=AdapterConfig(kind="icarus_lora", rank=8))
    graphdef, base_state, adapter_state = split(model)   # nnx.split(model, BaseParam, AdapterParam)
    logits = apply(graphdef, base_state, adapter_state, tokens)   # jitted, nnx.merge inside

``base_state`` is the frozen ICaRus encoder (the whole base model: its weights also serve the
decoder stream under the adapter); ``adapter_state`` is one task's decoder adapter. Training
differentiates a function of ``adapter_state`` only (``training.objective.train_step``), so the
gradients and the optimizer never see a base weight.

**One declaration.** Every base weight is declared once, in the Weight table of
:mod:`icarus_jax.model.params` (dims, logical sharding axes, initializer, condition). The modules
wrap each array in a :class:`BaseParam` carrying those logical axes (``sharding_names``, so
``nnx.get_partition_spec(base_state)`` is the table's axes and ``model.sharding``'s rules map them
to a mesh); LoRA factors become :class:`AdapterParam` with the axes of the weight they modify
(``params.lora_axes``).

**One state layout.** The module tree mirrors the params pytree, so
``base_state.to_pure_dict()`` *is* the dict that checkpoints (HF, GGUF, Orbax), the engine and the
sharding rules use, and :func:`adapter_params` of an adapter state *is* ``Adapter.params``. A
state converts to either without a copy; every loader works unchanged.

Module tree (``L`` layers, ``D`` d_model, ``V`` vocab)::

    Transformer         embed [V, D], final_norm [D], lm_head [D, V] (untied)     BaseParam
      layers: Block     every layer weight stacked [L, ...] (logical axis "layers"),
                        scanned over by the streams                                  BaseParam
      adapter: AdapterWeights | None
                        layers {target: {"a" [L, in, r], "b" [L, r, out]}}, lm_head, or a full
                        adapter's replacement weights; its AdapterConfig is static  AdapterParam

**One piece of math.** The modules hold no layer math. ``Block.__call__`` is
:func:`model.transformer.block`, the function the engine's paged step also runs, and
``Transformer.__call__`` / ``encode`` / ``decode`` run the streams of :mod:`model.transformer`
on the module's weights. So the modules and the engine cannot drift apart.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx

from icarus_jax.model import transformer as tf
from icarus_jax.model.adapters import Adapter, AdapterConfig, init_adapter
from icarus_jax.model.config import ModelConfig
from icarus_jax.model.params import (LAYER_WEIGHTS, TOP_WEIGHTS, WEIGHTS, Params,
                                     check_param_shapes, init_base_params, lora_axes)


class BaseParam(nnx.Param):
  """A frozen base weight: the ICaRus encoder's, read by the decoder stream too."""


class AdapterParam(nnx.Param):
  """A trainable adapter weight: a LoRA factor or a full adapter's replacement weight."""


def _declare(kind: type[nnx.Param], value: jax.Array, axes: tuple[str, ...]) -> nnx.Param:
  """Wraps ``value`` with its logical sharding axes (metadata only: placing it on a mesh is
  ``model.sharding``'s job, so no mesh is needed to build a model)."""
  if len(axes) != value.ndim:
    raise ValueError(f"logical axes {axes} do not match a value of shape {value.shape}")
  return kind(value, sharding_names=tuple(axes), eager_sharding=False)


def _values(module: nnx.Module, kind: type[nnx.Param]) -> Params:
  return nnx.state(module, kind).to_pure_dict()


class Block(nnx.Module):
  """Every layer's base weights, stacked on a leading ``[L]`` axis (logical ``"layers"``).

  Attributes are the :data:`~icarus_jax.model.params.LAYER_WEIGHTS` present in the config:
  ``attn_norm [L, D]``, ``q [L, D, H*hd]``, ``k``/``v [L, D, K*hd]``, ``o [L, H*hd, D]``,
  optional ``q_bias``/``k_bias``/``v_bias`` and ``q_norm``/``k_norm [L, hd]``, ``mlp_norm``,
  ``gate``/``up [L, D, F]``, ``down [L, F, D]``.
  """

  def __init__(self, cfg: ModelConfig, weights: Params):
    self.cfg = cfg
    for w in LAYER_WEIGHTS:
      if w.present(cfg):
        setattr(self, w.name, _declare(BaseParam, weights[w.name], ("layers", *w.axes)))

  def weights(self) -> Params:
    """``{name: [L, ...]}``: the stacked layer weights as plain arrays."""
    return _values(self, BaseParam)

  def __call__(self, layer: int, h: jax.Array, q_pos: jax.Array, attend: tf.Attend,
               lora: Params | None = None, **kw) -> tuple[jax.Array, Any]:
    """Layer ``layer`` on ``h [B, T, D]`` at ``q_pos [B, T]``: :func:`model.transformer.block`
    with this layer's weights and ``lora`` (``{target: {"a","b"}}`` stacked, scaled) sliced
    to it; ``attend`` and ``kw`` as there. Returns ``(h [B, T, D], aux)``."""
    lp = {k: v[layer] for k, v in self.weights().items()}
    ll = jax.tree_util.tree_map(lambda x: x[layer], lora or {})
    return tf.block(self.cfg, lp, ll, h, q_pos, attend, **kw)


class AdapterWeights(nnx.Module):
  """One adapter's weights as :class:`AdapterParam` in ``Adapter.params``' layout, and its
  static :class:`~icarus_jax.model.adapters.AdapterConfig` (part of the graph, not the state)."""

  def __init__(self, cfg: ModelConfig, adapter: Adapter):
    self.config = adapter.config
    lora = adapter.config.is_lora

    def axes(name):
      if lora:
        return lora_axes(name)
      w = WEIGHTS[name]
      return ("layers", *w.axes) if w in LAYER_WEIGHTS else w.axes

    def wrap(name, value):
      ax = axes(name)
      if isinstance(value, dict):
        return {f: _declare(AdapterParam, v, ax[f]) for f, v in value.items()}
      return _declare(AdapterParam, value, ax)

    self.layers = nnx.data({t: wrap(t, v) for t, v in adapter.params.get("layers", {}).items()})
    for name, value in adapter.params.items():
      if name != "layers":
        v = wrap(name, value)
        setattr(self, name, nnx.data(v) if isinstance(v, dict) else v)

  def adapter(self) -> Adapter:
    """The functional form: ``Adapter(params, config)`` over this module's current values."""
    params = _values(self, AdapterParam)
    params.setdefault("layers", {})
    return Adapter(params, self.config)


class Transformer(nnx.Module):
  """A decoder-only LM (Llama / Qwen2 / Qwen3 / Mistral, per ``cfg``) with at most one adapter.

  Args:
    cfg: the model config (static: part of the graph).
    params: base weights in the params layout (a loaded checkpoint); default: initialised from
      the Weight table with ``rngs``.
    adapter: an ``Adapter`` to hold, or an ``AdapterConfig`` to initialise one for (LoRA:
      ``a ~ N(0, 1/in)``, ``b = 0``, so the fresh model is exactly the base; full kinds: a
      copy of the base weights), or None (the base model).
    rngs: ``nnx.Rngs`` for whatever is initialised.
  """

  def __init__(self, cfg: ModelConfig, params: Params | None = None,
               adapter: Adapter | AdapterConfig | None = None, *, rngs: nnx.Rngs | None = None):
    if params is None or isinstance(adapter, AdapterConfig):
      if rngs is None:
        raise ValueError("Transformer: rngs are needed to initialise the base or the adapter")
    if params is None:
      params = init_base_params(cfg, rngs.params())
    check_param_shapes(cfg, params, "Transformer(params=...)")
    if isinstance(adapter, AdapterConfig):
      ac = adapter
      adapter = init_adapter(cfg, rngs.params(), name=ac.name, kind=ac.kind, targets=ac.targets,
                             rank=ac.rank, alpha=ac.alpha, base_params=params,
                             use_rslora=ac.use_rslora)
    self.cfg = cfg
    for w in TOP_WEIGHTS:
      if w.present(cfg):
        setattr(self, w.name, _declare(BaseParam, params[w.name], w.axes))
    self.layers = Block(cfg, params["layers"])
    self.adapter = None if adapter is None else AdapterWeights(cfg, adapter)

  # ---------------------------------------------------------------- views of the state
  def base_params(self) -> Params:
    """The base weights in the params layout (what checkpoints and the engine hold)."""
    return _values(self, BaseParam)

  def adapter_view(self) -> Adapter | None:
    return None if self.adapter is None else self.adapter.adapter()

  # ---------------------------------------------------------------- the streams
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Float32 logits ``[B, T, V]`` for ``tokens [B, T]``: :func:`model.transformer.forward`
    (base, conventional adapter with its own K/V, or ICaRus: frozen encoder + decoder)."""
    return tf.forward(self.cfg, self.base_params(), tokens, self.adapter_view(),
                      positions=positions)

  def encode(self, tokens: jax.Array, *, positions=None, cache: tf.KVCache | None = None):
    """The frozen encoder's K/V ``{"k","v": [L, B, S, K, hd]}`` (never sees the adapter)."""
    return tf.encode(self.cfg, self.base_params(), tokens, positions=positions, cache=cache)

  def decode(self, tokens: jax.Array, kv: tf.KVCache, *, positions=None) -> jax.Array:
    """The ICaRus decoder stream over the encoder's ``kv``: logits ``[B, T, V]``."""
    return tf.decode(self.cfg, self.base_params(), self.adapter_view(), tokens, kv,
                     positions=positions)


# -------------------------------------------------------------------- pure-function use
def split(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """``(graphdef, base_state, adapter_state)``; the adapter state is empty for a base model."""
  return nnx.split(model, BaseParam, AdapterParam)


def merge(graphdef: nnx.GraphDef, base_state: nnx.State, adapter_state: nnx.State) -> Transformer:
  return nnx.merge(graphdef, base_state, adapter_state)


@functools.partial(jax.jit, static_argnums=0)
def apply(graphdef: nnx.GraphDef, base_state: nnx.State, adapter_state: nnx.State,
          tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
  """Logits ``[B, T, V]`` of the merged model; one compiled program per graph, whatever the
  values of the states (a new adapter of the same kind, targets and rank does not recompile)."""
  return merge(graphdef, base_state, adapter_state)(tokens, positions)


def adapter_params(adapter_state: nnx.State) -> Params:
  """``Adapter.params`` of an adapter state (or of its gradient): a plain pytree for optax."""
  params = adapter_state.to_pure_dict().get("adapter", {})
  params.setdefault("layers", {})
  return params
