"""Jitted serving steps over the paged KV pool. Pure functions of (base, adapter pool, pages, batch).

Pool layout: ``pages [L, P, page_size, 2 * K, hd]``: for each layer and page, the K heads
(``[..., :K, :]``) then the V heads (``[..., K:, :]``) of ``page_size`` consecutive positions.
Page 0 is the null page: padding writes land there and no sequence reads it unmasked.

Batch metadata (``B`` rows, bucketed; padding rows have ``valid`` all False and a page table of
zeros):
  tokens, positions, valid  ``[B, T]``  the new tokens whose K/V this step writes
  page_table                ``[B, N]``  pool page of each of the row's logical pages
  rows                      ``[B]``     adapter slot (0 = base)

``icarus_step`` runs two streams per row in one pass over the weights: the encoder over the new
tokens (base weights, writes K/V) and the decoder at ``dec_pos`` (base + the row's adapter). Their
hidden states are concatenated on the token axis, so every projection reads the weights once and
one attention call serves both streams over the same pages. A decode step is ``T = 1`` with the
decoder on the same token; a prefill chunk is ``T > 1`` with the decoder at the chunk's last
position (its logits are used only for the final chunk); a fully cached prompt is ``T`` padding
plus the decoder row.

``conventional_step`` is the baseline: one stream with the adapter everywhere (K/V included).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from icarus_jax.config import ModelConfig
from icarus_jax.model import (_lora_delta, apply_rope, attention, embed, head, layer_kv, layer_out,
                              layer_q, project, rms_norm)
from icarus_jax.params import Params
from kernels_pallas.paged_attention import paged_attention


def write_pages(pages_l: jax.Array, k: jax.Array, v: jax.Array, page_table: jax.Array,
                positions: jax.Array, valid: jax.Array) -> jax.Array:
  """Scatters ``k, v [B, T, K, hd]`` into one layer's pages ``[P, ps, 2K, hd]``."""
  ps = pages_l.shape[1]
  logical = positions // ps
  pidx = jnp.take_along_axis(page_table, jnp.clip(logical, 0, page_table.shape[1] - 1), axis=1)
  pidx = jnp.where(valid, pidx, 0)
  slot = jnp.where(valid, positions % ps, 0)
  kv = jnp.concatenate([k, v], axis=2).astype(pages_l.dtype)
  return pages_l.at[pidx, slot].set(kv)


def gather_pages(pages_l: jax.Array, page_table: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Contiguous ``k, v [B, N * ps, K, hd]`` of each row's pages."""
  B, N = page_table.shape
  _, ps, K2, hd = pages_l.shape
  kv = pages_l[page_table].reshape(B, N * ps, K2, hd)
  K = K2 // 2
  return kv[:, :, :K], kv[:, :, K:]


def paged_attention_reference(q, pages_l, page_table, q_pos, *, sliding_window=None):
  """Reference attention of ``q [B, T, H, hd]`` at ``q_pos [B, T]`` over a row's pages."""
  k, v = gather_pages(pages_l, page_table)
  S = k.shape[1]
  k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (q.shape[0], S))
  return attention(q, k, v, q_pos, k_pos, sliding_window=sliding_window)


def paged_attention_pallas(q, pages_l, page_table, q_pos, *, sliding_window=None):
  """The Pallas kernel on the engine's layout: tokens and the decoder row folded per kv head.

  Same contract as :func:`paged_attention_reference`. A decode step (``T + 1 = 2`` rows at one
  position) is one query block whose pages are read once for both streams; a prefill chunk is
  cut into blocks of 16 tokens that each skip the pages causality hides from them.
  """
  return paged_attention(q, pages_l, page_table, q_pos, sliding_window=sliding_window,
                         q_block=min(q.shape[1], 16))


def _proj_dec(x, w, bias, lora, rows, T):
  """``x [B, T+1, in] @ w``; the LoRA delta only on the decoder token ``x[:, T:]``."""
  y = x @ w
  if bias is not None:
    y = y + bias
  d = _lora_delta(x[:, T:], lora, rows)
  if d is None:
    return y
  return jnp.concatenate([y[:, :T], y[:, T:] + d.astype(y.dtype)], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "attn_fn"), donate_argnums=(3,))
def icarus_step(cfg: ModelConfig, base: Params, pool: Params, pages: jax.Array,
                tokens: jax.Array, positions: jax.Array, valid: jax.Array, page_table: jax.Array,
                dec_token: jax.Array, dec_pos: jax.Array, rows: jax.Array, attn_fn=None):
  """Fused ICaRus step. Returns ``(logits [B, V] float32 of the decoder rows, pages)``."""
  B, T = tokens.shape
  attn_fn = attn_fn or paged_attention_reference
  h_enc = embed(base, tokens)
  h_dec = embed(base, dec_token[:, None])
  q_pos = jnp.concatenate([positions, dec_pos[:, None]], axis=1)
  inv_freq = cfg.rope_inv_freq()
  H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def body(carry, xs):
    h_enc, h_dec = carry
    lp, ll, pages_l = xs
    h = jnp.concatenate([h_enc, h_dec], axis=1)  # [B, T+1, D]: encoder tokens, decoder token
    a = rms_norm(h, lp["attn_norm"], cfg.norm_eps)
    q = _proj_dec(a, lp["q"], lp.get("q_bias"), ll.get("q"), rows, T).reshape(B, T + 1, H, hd)
    ae = a[:, :T]
    k = project(ae, lp["k"], bias=lp.get("k_bias")).reshape(B, T, K, hd)  # encoder: no adapter
    v = project(ae, lp["v"], bias=lp.get("v_bias")).reshape(B, T, K, hd)
    if cfg.qk_norm:
      q = rms_norm(q, lp["q_norm"], cfg.norm_eps)
      k = rms_norm(k, lp["k_norm"], cfg.norm_eps)
    q = apply_rope(q, q_pos, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    pages_l = write_pages(pages_l, k, v, page_table, positions, valid)
    o = attn_fn(q, pages_l, page_table, q_pos, sliding_window=cfg.sliding_window)
    h = h + _proj_dec(o.reshape(B, T + 1, H * hd), lp["o"], None, ll.get("o"), rows, T)
    m = rms_norm(h, lp["mlp_norm"], cfg.norm_eps)
    g = _proj_dec(m, lp["gate"], None, ll.get("gate"), rows, T)
    u = _proj_dec(m, lp["up"], None, ll.get("up"), rows, T)
    h = h + _proj_dec(jax.nn.silu(g) * u, lp["down"], None, ll.get("down"), rows, T)
    return (h[:, :T], h[:, T:]), pages_l

  (_, h_dec), pages = jax.lax.scan(body, (h_enc, h_dec), (base["layers"], pool["layers"], pages))
  logits = head(cfg, base, pool.get("lm_head"), h_dec, rows)[:, 0]
  return logits, pages


@functools.partial(jax.jit, static_argnames=("cfg", "attn_fn"), donate_argnums=(3,))
def conventional_step(cfg: ModelConfig, base: Params, pool: Params, pages: jax.Array,
                      tokens: jax.Array, positions: jax.Array, valid: jax.Array,
                      page_table: jax.Array, last_idx: jax.Array, rows: jax.Array, attn_fn=None):
  """Baseline step: the row's adapter on every weight, its own K/V written to its own pages.

  Returns ``(logits [B, V] at token index last_idx[b], pages)``.
  """
  attn_fn = attn_fn or paged_attention_reference
  h = embed(base, tokens)

  def body(h, xs):
    lp, ll, pages_l = xs
    q = layer_q(cfg, lp, ll, h, positions, rows)
    k, v = layer_kv(cfg, lp, ll, h, positions, rows)
    pages_l = write_pages(pages_l, k, v, page_table, positions, valid)
    o = attn_fn(q, pages_l, page_table, positions, sliding_window=cfg.sliding_window)
    return layer_out(cfg, lp, ll, h, o, rows), pages_l

  h, pages = jax.lax.scan(body, h, (base["layers"], pool["layers"], pages))
  h_last = jnp.take_along_axis(h, last_idx[:, None, None], axis=1)
  logits = head(cfg, base, pool.get("lm_head"), h_last, rows)[:, 0]
  return logits, pages


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_pages(pages: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
  """``pages[:, dst[i]] = pages[:, src[i]]`` (copy-on-write of partially shared pages)."""
  return pages.at[:, dst].set(pages[:, src])
