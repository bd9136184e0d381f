"""The transformer as pure functions: plain causal LM, ICaRus encoder stream and decoder stream.

Notation: B batch, T query tokens, S cached key positions, L layers, H query heads, K kv heads,
hd head_dim, D d_model, V vocab, G = H / K.

Streams (see ``../shared/DESIGN.md`` section 1):

* ``encode``: the frozen base. Produces K/V of every layer ``{"k","v": [L, B, S, K, hd]}``.
  It never sees an adapter, so the cache is the same whichever adapter reads it.
* ``decode``: the decoder stream. Its queries come from its own hidden state (base weights plus
  the adapter), its keys/values are the encoder's at every layer, up to and including the
  query's own position. It never writes K/V; position ``t`` depends only on token ``t`` and the
  cache.
* ``forward``: logits of a whole model for every position: the base model (no adapter), a
  conventional model with a standard LoRA/full adapter applied everywhere, or an ICaRus model
  (``decode(encode(tokens))``).

The layer math is written once, in :func:`block`; every path (these streams, training's two
streams, generation, the serving engine's fused step over its paged pool) runs its layers
through it and differs only in how K/V are stored and attended.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from icarus_jax.model.adapters import Adapter, lora_weights
from icarus_jax.model.config import ModelConfig
from icarus_jax.errors import IcarusError
from icarus_jax.model.params import Params, lm_head_weight
from kernels_pallas.reference import causal_visibility, masked_attention

KVCache = dict  # {"k": [L, B, S, K, hd], "v": [L, B, S, K, hd]}


# ------------------------------------------------------------------------------------------
# Primitives
# ------------------------------------------------------------------------------------------
def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in float32, cast back to ``x.dtype`` before the weight (as Hugging Face does)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return w * y.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half RoPE. ``x [B, T, h, hd]``, ``positions [B, T]`` int -> same shape as x."""
  ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B,T,hd/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  x1, x2 = x32[..., :half], x32[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
              *, sliding_window: int | None = None) -> jax.Array:
  """Dense causal GQA attention: :func:`~kernels_pallas.reference.masked_attention` (the one jnp
  attention every kernel is checked against) with a causal, windowed visibility.

  Args:
    q: ``[B, T, H, hd]`` queries (RoPE applied).
    k, v: ``[B, S, K, hd]`` keys (RoPE applied) and values.
    q_pos: ``[B, T]`` positions of the queries.
    k_pos: ``[B or 1, S]`` positions of the keys; key ``s`` is visible to query ``t`` iff
      ``k_pos[s] <= q_pos[t]`` (and within ``sliding_window``).
  Returns:
    ``[B, T, H, hd]`` in q's dtype; a query with no visible key gets 0.
  """
  return masked_attention(q, k, v, causal_visibility(q_pos, k_pos, sliding_window))


def lora_delta(x: jax.Array, ab: dict | None, rows: jax.Array | None) -> jax.Array | None:
  """``(x @ a) @ b`` for ``x [B, T, in]``.

  ``a [in, r]``/``b [r, out]`` (one adapter), or pool factors ``a [A, in, r]`` gathered by
  ``rows [B]`` (one adapter slot per batch row, the BGMV pattern; see ``docs/model.md`` for why a
  gather rather than a ``vmap`` over rows).
  """
  if ab is None:
    return None
  a, b = ab["a"].astype(x.dtype), ab["b"].astype(x.dtype)  # float32 masters -> compute dtype
  if rows is not None:
    a, b = a[rows], b[rows]
  if a.ndim == 2:
    return (x @ a) @ b
  return jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x, a), b)


def project(x: jax.Array, w: jax.Array, *, bias: jax.Array | None = None, lora: dict | None = None,
            rows: jax.Array | None = None, lora_from: int = 0) -> jax.Array:
  """``x @ w (+ bias) (+ LoRA delta on tokens t >= lora_from)``.

  ``x [B, T, in]``, ``w [in, out]`` -> ``[B, T, out]``. ``lora_from`` splits the token axis into
  a base-weights part and an adapter part (the fused ICaRus step: encoder tokens, then the
  decoder's); 0 applies the adapter to every token.
  """
  y = x @ w
  if bias is not None:
    y = y + bias
  if lora is None or lora_from >= x.shape[1]:
    return y
  # The delta is computed for every token and kept from ``lora_from`` on: the adapter rows then
  # come out of the same ``[B, T, in]`` product as ``x @ w`` (a separate ``[B, 1, in]`` product
  # rounds differently on XLA:CPU), so the engine's chunk equals training on the same tokens.
  # The extra work is ``r / out`` of the base matmul on the encoder tokens (0.4% at r=16, 4096).
  d = lora_delta(x, lora, rows).astype(y.dtype)
  if lora_from == 0:
    return y + d
  keep = (jnp.arange(x.shape[1]) >= lora_from)[None, :, None]
  return y + jnp.where(keep, d, jnp.zeros((), d.dtype))


# ------------------------------------------------------------------------------------------
# The transformer block: the one place the layer math lives.
# ------------------------------------------------------------------------------------------
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def block(cfg: ModelConfig, lp: Params, lora: Params, h: jax.Array, q_pos: jax.Array,
          attend: Attend, *, kv_tokens: int | None = None, lora_from: int = 0,
          kv_lora: bool = True, rows: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """One layer: attention (pre-norm, GQA, RoPE, optional biases and q/k-norm) and gated MLP.

  Every path runs its layers through this function: ``forward``/``encode`` (one stream),
  ``decode`` (queries only, over given K/V), training's two streams, greedy generation, and the
  engine's fused and conventional steps over the paged pool. They differ only in ``attend`` and
  in which tokens make K/V and which see the adapter.

  Args:
    lp: this layer's weights (base, with a full adapter's replacements swapped in).
    lora: this layer's LoRA factors ``{target: {"a", "b"}}`` (maybe empty; pool factors
      ``[A, ...]`` with ``rows``).
    h: ``[B, T, D]`` hidden states at positions ``q_pos [B, T]``.
    attend: ``(q [B, T, H, hd], k, v [B, kv_tokens, K, hd]) -> (o [B, T, H, hd], aux)``; it
      places this layer's new K/V (a dense list, a contiguous cache, the paged pool) and
      attends. ``aux`` is returned unchanged (new K/V, an updated cache or pool).
    kv_tokens: the first ``kv_tokens`` tokens make K/V (default all; 0 for a decoder stream
      that reads K/V made elsewhere).
    lora_from: tokens ``t >= lora_from`` use the adapter on q, o and the MLP.
    kv_lora: whether the K/V tokens use the adapter on k and v (a conventional model: True;
      the frozen ICaRus encoder: False).
    rows: ``[B]`` adapter slot of each row when ``lora`` holds pool factors.
  Returns:
    ``(h [B, T, D], aux)``.
  """
  B, T = h.shape[:2]
  n_kv = T if kv_tokens is None else kv_tokens
  H, K, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps
  inv_freq = cfg.rope_inv_freq()

  def proj(x, name, start):
    return project(x, lp[name], bias=lp.get(name + "_bias"), lora=lora.get(name), rows=rows,
                   lora_from=start)

  a = rms_norm(h, lp["attn_norm"], eps)
  q = proj(a, "q", lora_from).reshape(B, T, H, hd)
  if cfg.qk_norm:
    q = rms_norm(q, lp["q_norm"], eps)
  q = apply_rope(q, q_pos, inv_freq)
  ak = a[:, :n_kv]
  kv_start = 0 if kv_lora else n_kv
  k = proj(ak, "k", kv_start).reshape(B, n_kv, K, hd)
  v = proj(ak, "v", kv_start).reshape(B, n_kv, K, hd)
  if cfg.qk_norm:
    k = rms_norm(k, lp["k_norm"], eps)
  k = apply_rope(k, q_pos[:, :n_kv], inv_freq)
  o, aux = attend(q, k, v)
  h = h + proj(o.reshape(B, T, H * hd), "o", lora_from)
  m = rms_norm(h, lp["mlp_norm"], eps)
  g = jax.nn.silu(proj(m, "gate", lora_from)) * proj(m, "up", lora_from)
  return h + proj(g, "down", lora_from), aux


def head(cfg: ModelConfig, top: Params, lora_head: dict | None, h: jax.Array,
         rows: jax.Array | None = None) -> jax.Array:
  """Final norm and LM head: ``h [B, T, D]`` -> float32 logits ``[B, T, V]``."""
  x = rms_norm(h, top["final_norm"], cfg.norm_eps)
  w = lm_head_weight(cfg, top)
  return project(x, w, lora=lora_head, rows=rows).astype(jnp.float32)


def embed(params: Params, tokens: jax.Array) -> jax.Array:
  """``tokens [B, T]`` -> ``[B, T, D]``."""
  return jnp.take(params["embed"], tokens, axis=0)


# ------------------------------------------------------------------------------------------
# Adapter views
# ------------------------------------------------------------------------------------------
def model_view(params: Params, adapter: Adapter | None) -> tuple[Params, Params]:
  """``(weights, lora)`` seen by a stream using ``adapter`` (None: the plain base).

  ``weights`` is the base pytree with a full adapter's replacement weights swapped in;
  ``lora`` holds scaled LoRA factors ``{"layers": {...}, "lm_head"?: ...}``.
  """
  if adapter is None:
    return params, {"layers": {}}
  if adapter.config.is_lora:
    return params, lora_weights(adapter)
  w = dict(params)
  w["layers"] = {**params["layers"], **adapter.params.get("layers", {})}
  for k, v in adapter.params.items():
    if k != "layers":
      w[k] = v
  return w, {"layers": {}}


def _check_tokens(cfg: ModelConfig, tokens: Any) -> jax.Array:
  if isinstance(tokens, jax.core.Tracer):
    return tokens
  arr = np.asarray(tokens)
  if arr.ndim != 2:
    raise IcarusError(f"tokens must have shape [batch, seq], got {arr.shape}")
  if arr.size == 0:
    raise IcarusError("tokens is empty")
  if not np.issubdtype(arr.dtype, np.integer):
    raise IcarusError(f"tokens must be integers, got dtype {arr.dtype}")
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0 or hi >= cfg.vocab_size:
    raise IcarusError(f"token ids must be in [0, {cfg.vocab_size}), got range [{lo}, {hi}]")
  return jnp.asarray(arr, jnp.int32)


def _default_positions(tokens: jax.Array, positions) -> jax.Array:
  if positions is None:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return jnp.asarray(positions, jnp.int32)


# ------------------------------------------------------------------------------------------
# Streams
# ------------------------------------------------------------------------------------------
def dense_attend(q_pos: jax.Array, sliding_window: int | None,
                 cache: tuple[jax.Array, jax.Array] | None = None) -> Attend:
  """``attend`` over a contiguous cache (or, without one, over the block's own new K/V).

  The block's K/V tokens are the first ``k.shape[1]`` of ``q_pos [B, T]``. With ``cache = (k, v)
  [B, S, K, hd]`` of this layer, they are written at their positions and queries attend to the
  cache (key ``s`` at position ``s``); ``aux`` is the updated ``(k, v)``. Without a cache,
  ``aux`` is the new ``(k, v)``. A block with ``kv_tokens=0`` reads the cache as given (the
  decoder stream).
  """
  def attend(q, k, v):
    kv_pos = q_pos[:, :k.shape[1]]
    if cache is None:
      return attention(q, k, v, q_pos, kv_pos, sliding_window=sliding_window), (k, v)
    ck, cv = cache
    if k.shape[1]:
      bidx = jnp.arange(k.shape[0])[:, None]
      ck = ck.at[bidx, kv_pos].set(k.astype(ck.dtype))
      cv = cv.at[bidx, kv_pos].set(v.astype(cv.dtype))
    k_pos = jnp.arange(ck.shape[1], dtype=jnp.int32)[None]
    return attention(q, ck, cv, q_pos, k_pos, sliding_window=sliding_window), (ck, cv)
  return attend


@functools.partial(jax.jit, static_argnames=("cfg", "with_head"))
def single_stream(cfg: ModelConfig, weights: Params, lora: Params, tokens: jax.Array,
                  positions: jax.Array, cache: KVCache | None, with_head: bool):
  """One stream where the same weights make K/V and queries (the base or a conventional model).

  Args: ``weights``/``lora`` from :func:`model_view`; ``tokens``, ``positions [B, T]``.
  Without ``cache``: attention over the tokens themselves; returns
  ``(logits [B, T, V] | None, kv {"k","v": [L, B, T, K, hd]})``.
  With ``cache [L, B, S, K, hd]``: new K/V are written at ``positions`` and queries attend to
  cache keys at positions <= their own; returns ``(logits | None, updated cache)``.
  """
  h = embed(weights, tokens)

  def body(h, xs):
    lp, ll, ck, cv = xs
    attend = dense_attend(positions, cfg.sliding_window, None if ck is None else (ck, cv))
    return block(cfg, lp, ll, h, positions, attend)

  ck = cache["k"] if cache is not None else None
  cv = cache["v"] if cache is not None else None
  h, (ks, vs) = jax.lax.scan(body, h, (weights["layers"], lora["layers"], ck, cv))
  logits = head(cfg, weights, lora.get("lm_head"), h) if with_head else None
  return logits, {"k": ks, "v": vs}


@functools.partial(jax.jit, static_argnames=("cfg",))
def decoder_stream(cfg: ModelConfig, weights: Params, lora: Params, tokens: jax.Array,
                   positions: jax.Array, kv: KVCache) -> jax.Array:
  """The ICaRus decoder over the encoder's ``kv [L, B, S, K, hd]`` (read, never written):
  float32 logits ``[B, T, V]`` for ``tokens`` at ``positions [B, T]``."""
  h = embed(weights, tokens)

  def body(h, xs):
    lp, ll, k, v = xs
    attend = dense_attend(positions, cfg.sliding_window, (k, v))
    h, _ = block(cfg, lp, ll, h, positions, attend, kv_tokens=0)
    return h, None

  h, _ = jax.lax.scan(body, h, (weights["layers"], lora["layers"], kv["k"], kv["v"]))
  return head(cfg, weights, lora.get("lm_head"), h)


def icarus_logits(cfg: ModelConfig, base: Params, adapter: Adapter | None, tokens: jax.Array,
                  positions: jax.Array) -> jax.Array:
  """Both ICaRus streams (un-jitted, traceable): the frozen base encodes ``tokens``, the decoder
  with ``adapter`` reads its K/V. Logits ``[B, T, V]``; no gradient reaches the encoder."""
  _, kv = single_stream(cfg, base, {"layers": {}}, tokens, positions, None, False)
  kv = jax.lax.stop_gradient(kv)  # the encoder is frozen
  weights, lora = model_view(base, adapter)
  return decoder_stream(cfg, weights, lora, tokens, positions, kv)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """Zero contiguous cache ``{"k","v": [L, batch, max_len, K, hd]}``."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dt = dtype or cfg.jnp_dtype
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def encode(config: ModelConfig, base_params: Params, tokens, *, positions=None,
           cache: KVCache | None = None) -> KVCache:
  """ICaRus encoder: the frozen base's K/V for ``tokens [B, T]``.

  Without ``cache``: returns ``{"k","v": [L, B, T, K, hd]}`` for positions ``0..T-1`` (or the
  given ``positions``). With ``cache [L, B, S, K, hd]``: writes the new tokens' K/V at
  ``positions [B, T]`` (they must continue the cached prefix) and returns the updated cache.
  """
  tokens = _check_tokens(config, tokens)
  positions = _default_positions(tokens, positions)
  _, kv = single_stream(config, base_params, {"layers": {}}, tokens, positions, cache, False)
  return kv


def decode(config: ModelConfig, base_params: Params, adapter: Adapter | None, tokens, kv: KVCache,
           *, positions=None) -> jax.Array:
  """ICaRus decoder stream: float32 logits ``[B, T, V]`` for ``tokens [B, T]`` at ``positions``.

  The query at position ``p`` attends to ``kv`` (the encoder's cache ``[L, B, S, K, hd]``) at
  positions ``0..p``, so the cache must already hold position ``p`` (encode first). Default
  positions are ``0..T-1`` (training: ``kv = encode(tokens)``). ``adapter`` may be None (base
  decoder = base model) or an ICaRus adapter; conventional kinds are refused.
  """
  if adapter is not None and not adapter.config.is_icarus:
    raise IcarusError(f"decode() runs the ICaRus decoder stream; adapter {adapter.name!r} is of "
                      f"kind {adapter.kind!r}; use forward() for conventional adapters")
  tokens = _check_tokens(config, tokens)
  positions = _default_positions(tokens, positions)
  weights, lora = model_view(base_params, adapter)
  return decoder_stream(config, weights, lora, tokens, positions, kv)


def forward(config: ModelConfig, base_params: Params, tokens, adapter: Adapter | None = None, *,
            positions=None) -> jax.Array:
  """Float32 logits ``[B, T, V]`` of the model (base + ``adapter``) at every position.

  * ``adapter=None``: the base causal LM.
  * ``lora`` / ``full`` kinds: the conventional fine-tuned model (adapter everywhere, own K/V).
  * ICaRus kinds: ``decode(encode(tokens))``, the two-stream model (no gradient reaches the
    encoder, so training differentiates this same function).
  """
  tokens = _check_tokens(config, tokens)
  positions = _default_positions(tokens, positions)
  if adapter is not None and adapter.config.is_icarus:
    return icarus_logits(config, base_params, adapter, tokens, positions)
  weights, lora = model_view(base_params, adapter)
  logits, _ = single_stream(config, weights, lora, tokens, positions, None, True)
  return logits


def forward_with_cache(config: ModelConfig, base_params: Params, tokens, cache: KVCache,
                       adapter: Adapter | None = None, *, positions=None) -> tuple[jax.Array, KVCache]:
  """Single-stream step for conventional models: writes this model's own K/V into ``cache``.

  Returns ``(logits [B, T, V], cache)``. For ICaRus adapters use ``encode`` + ``decode``.
  """
  if adapter is not None and adapter.config.is_icarus:
    raise IcarusError("forward_with_cache is for conventional models; ICaRus adapters use "
                      "encode() (shared cache) then decode()")
  tokens = _check_tokens(config, tokens)
  positions = _default_positions(tokens, positions)
  weights, lora = model_view(base_params, adapter)
  return single_stream(config, weights, lora, tokens, positions, cache, True)
