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

Layer building blocks (``layer_q``, ``layer_kv``, ``layer_out``, ``head``) are public so the
serving engine composes the same math over its paged cache.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from icarus_jax.adapters import Adapter, lora_weights
from icarus_jax.config import ModelConfig
from icarus_jax.errors import IcarusError
from icarus_jax.params import Params, lm_head_weight
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
              *, sliding_window: int | None = None, k_valid: jax.Array | None = None) -> jax.Array:
  """Dense causal GQA attention: :func:`~kernels_pallas.reference.masked_attention` (the one jnp
  attention every kernel is checked against) with a causal, windowed visibility.

  Args:
    q: ``[B, T, H, hd]`` queries (RoPE applied).
    k, v: ``[B, S, K, hd]`` keys (RoPE applied) and values.
    q_pos: ``[B, T]`` positions of the queries.
    k_pos: ``[B, S]`` positions of the keys; key ``s`` is visible to query ``t`` iff
      ``k_pos[s] <= q_pos[t]`` (and within ``sliding_window``, and ``k_valid``).
  Returns:
    ``[B, T, H, hd]`` in q's dtype; a query with no visible key gets 0.
  """
  vis = causal_visibility(q_pos, k_pos, sliding_window)
  if k_valid is not None:
    vis &= k_valid[:, None, :]
  return masked_attention(q, k, v, vis)


def _lora_delta(x: jax.Array, ab: dict | None, rows: jax.Array | None) -> jax.Array | None:
  """``(x @ a) @ b`` for ``x [B, T, in]``.

  ``a [in, r]``/``b [r, out]`` (one adapter), or pool factors ``a [A, in, r]`` gathered by
  ``rows [B]`` (one adapter slot per batch row, the BGMV pattern).
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
            rows: jax.Array | None = None) -> jax.Array:
  """``x @ w (+ bias) (+ LoRA delta)``; ``x [B, T, in]``, ``w [in, out]`` -> ``[B, T, out]``."""
  y = x @ w
  if bias is not None:
    y = y + bias
  d = _lora_delta(x, lora, rows)
  if d is not None:
    y = y + d.astype(y.dtype)
  return y


# ------------------------------------------------------------------------------------------
# One layer, in pieces. ``lp`` = that layer's weights (base, with full-adapter replacements),
# ``lora`` = that layer's LoRA factors {target: {"a","b"}} (maybe empty).
# ------------------------------------------------------------------------------------------
def layer_q(cfg: ModelConfig, lp: Params, lora: Params, h: jax.Array, pos: jax.Array,
            rows: jax.Array | None = None) -> jax.Array:
  """Queries of one layer: ``h [B, T, D]`` -> ``[B, T, H, hd]`` (norm, proj, q-norm, RoPE)."""
  a = rms_norm(h, lp["attn_norm"], cfg.norm_eps)
  q = project(a, lp["q"], bias=lp.get("q_bias"), lora=lora.get("q"), rows=rows)
  q = q.reshape(*h.shape[:2], cfg.num_heads, cfg.head_dim)
  if cfg.qk_norm:
    q = rms_norm(q, lp["q_norm"], cfg.norm_eps)
  return apply_rope(q, pos, cfg.rope_inv_freq())


def layer_kv(cfg: ModelConfig, lp: Params, lora: Params, h: jax.Array, pos: jax.Array,
             rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Keys and values of one layer: ``h [B, T, D]`` -> two ``[B, T, K, hd]`` (RoPE on k)."""
  a = rms_norm(h, lp["attn_norm"], cfg.norm_eps)
  k = project(a, lp["k"], bias=lp.get("k_bias"), lora=lora.get("k"), rows=rows)
  v = project(a, lp["v"], bias=lp.get("v_bias"), lora=lora.get("v"), rows=rows)
  k = k.reshape(*h.shape[:2], cfg.num_kv_heads, cfg.head_dim)
  v = v.reshape(*h.shape[:2], cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    k = rms_norm(k, lp["k_norm"], cfg.norm_eps)
  return apply_rope(k, pos, cfg.rope_inv_freq()), v


def layer_out(cfg: ModelConfig, lp: Params, lora: Params, h: jax.Array, attn: jax.Array,
              rows: jax.Array | None = None) -> jax.Array:
  """Output projection, residual and gated MLP: ``attn [B, T, H, hd]`` -> new ``h [B, T, D]``."""
  o = project(attn.reshape(*attn.shape[:2], -1), lp["o"], lora=lora.get("o"), rows=rows)
  h = h + o
  m = rms_norm(h, lp["mlp_norm"], cfg.norm_eps)
  g = project(m, lp["gate"], lora=lora.get("gate"), rows=rows)
  u = project(m, lp["up"], lora=lora.get("up"), rows=rows)
  return h + project(jax.nn.silu(g) * u, lp["down"], lora=lora.get("down"), rows=rows)


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
@functools.partial(jax.jit, static_argnames=("cfg", "with_head"))
def _single_stream(cfg: ModelConfig, weights: Params, lora: Params, tokens: jax.Array,
                   positions: jax.Array, cache: KVCache | None, with_head: bool):
  """One stream where the same weights make K/V and queries (the base or a standard model).

  Without ``cache``: attention over the tokens themselves; returns (logits|None, kv [L,B,T,K,hd]).
  With ``cache`` ``[L, B, S, K, hd]``: new K/V are written at ``positions`` and queries attend to
  cache keys at positions <= their own; returns (logits|None, updated cache).
  """
  h = embed(weights, tokens)
  B = tokens.shape[0]
  bidx = jnp.arange(B)[:, None]

  def body(h, xs):
    lp, ll, ck, cv = xs
    q = layer_q(cfg, lp, ll, h, positions)
    k, v = layer_kv(cfg, lp, ll, h, positions)
    if ck is None:
      ck, cv, k_pos = k, v, positions
    else:
      ck = ck.at[bidx, positions].set(k.astype(ck.dtype))
      cv = cv.at[bidx, positions].set(v.astype(cv.dtype))
      k_pos = jnp.broadcast_to(jnp.arange(ck.shape[1], dtype=jnp.int32), ck.shape[:2])
    a = attention(q, ck, cv, positions, k_pos, sliding_window=cfg.sliding_window)
    return layer_out(cfg, lp, ll, h, a), (ck, cv)

  ck = cache["k"] if cache is not None else None
  cv = cache["v"] if cache is not None else None
  h, (ks, vs) = jax.lax.scan(body, h, (weights["layers"], lora["layers"], ck, cv))
  logits = head(cfg, weights, lora.get("lm_head"), h) if with_head else None
  return logits, {"k": ks, "v": vs}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _decoder_stream(cfg: ModelConfig, weights: Params, lora: Params, tokens: jax.Array,
                    positions: jax.Array, kv: KVCache) -> jax.Array:
  h = embed(weights, tokens)
  S = kv["k"].shape[2]
  k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (tokens.shape[0], S))

  def body(h, xs):
    lp, ll, k, v = xs
    q = layer_q(cfg, lp, ll, h, positions)
    a = attention(q, k, v, positions, k_pos, sliding_window=cfg.sliding_window)
    return layer_out(cfg, lp, ll, h, a), None

  h, _ = jax.lax.scan(body, h, (weights["layers"], lora["layers"], kv["k"], kv["v"]))
  return head(cfg, weights, lora.get("lm_head"), h)


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
  _, kv = _single_stream(config, base_params, {"layers": {}}, tokens, positions, cache, False)
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
  return _decoder_stream(config, weights, lora, tokens, positions, kv)


def forward(config: ModelConfig, base_params: Params, tokens, adapter: Adapter | None = None, *,
            positions=None) -> jax.Array:
  """Float32 logits ``[B, T, V]`` of the model (base + ``adapter``) at every position.

  * ``adapter=None``: the base causal LM.
  * ``lora`` / ``full`` kinds: the conventional fine-tuned model (adapter everywhere, own K/V).
  * ICaRus kinds: ``decode(encode(tokens))``, the two-stream model.
  """
  tokens = _check_tokens(config, tokens)
  positions = _default_positions(tokens, positions)
  if adapter is not None and adapter.config.is_icarus:
    kv = encode(config, base_params, tokens, positions=positions)
    return decode(config, base_params, adapter, tokens, kv, positions=positions)
  weights, lora = model_view(base_params, adapter)
  logits, _ = _single_stream(config, weights, lora, tokens, positions, None, True)
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
  return _single_stream(config, weights, lora, tokens, positions, cache, True)
