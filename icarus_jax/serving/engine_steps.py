"""Jitted serving steps over the paged KV pool. Pure functions of (base, adapter pool, pages, batch).

Pool layout: ``pages [L, P, 2 * K, page_size, hd]`` (:func:`pool_shape`): for each layer and page,
the K and V of ``page_size`` consecutive positions, interleaved per kv head (``[l, p, 2k]`` is K
and ``[l, p, 2k + 1]`` V of kv head ``k``), so a split of axis 2 over the mesh's ``model`` axis
keeps each head's K and V on the device that holds its query heads. The two minor axes
``(page_size, hd)`` are the TPU's tiled (sublane, lane) axes whatever the mesh splits: the scatter
of new K/V and the gather/DMA of pages agree on one tiling, so the compiler never converts (copies)
the pool between them (``docs/kernels.md``, ``tests/test_tpu_aot.py``).
Page 0 is the null page: page tables are padded with it and no query reads it unmasked;
padding tokens write nowhere.

In place: the pool is donated to every step and carried through the layer scan as one flat
``[L * P, 2K, ps, hd]`` buffer (``flat_pool``; layer ``l`` offsets the page table by ``l * P``).
Each layer scatters its new K/V into that buffer and attention reads only the rows' pages, so a
step's memory traffic and temporaries depend on the batch, never on the pool's size
(``tests/test_kv_in_place.py`` checks the compiled programs).

Batch metadata (``B`` rows, bucketed; padding rows have ``valid`` all False and a page table of
zeros):
  tokens, positions, valid  ``[B, T]``  the new tokens whose K/V this step writes
  page_table                ``[B, N]``  pool page of each of the row's logical pages
  rows                      ``[B]``     adapter slot (0 = base)

``icarus_step`` runs two streams per row in one pass over the weights: the encoder over the new
tokens (base weights, writes K/V) and the decoder at ``dec_pos`` (base + the row's adapter). Their
hidden states are concatenated on the token axis, so every projection reads the weights once and
one attention call serves both streams over the same pages. Both steps run their layers through
:func:`icarus_jax.model.transformer.block`, the model's only layer implementation; what is specific to
serving here is the paged ``attend`` (write K/V into the pool, attend over the row's pages). A decode step is ``T = 1`` with the
decoder on the same token; a prefill chunk is ``T > 1`` with the decoder at the chunk's last
position (its logits are used only for the final chunk); a fully cached prompt is ``T`` padding
plus the decoder row.

``conventional_step`` is the baseline: one stream with the adapter everywhere (K/V included).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from icarus_jax.model.config import ModelConfig
from icarus_jax.model.transformer import block, embed, head
from icarus_jax.model.params import Params
from icarus_jax.serving.step_batch import StepBatch
from kernels_pallas.paged_attention import paged_attention
from kernels_pallas.paged_attention import paged_attention_reference as paged_attention_jnp
from kernels_pallas.reference import page_shape


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
  """Shape of the engine's KV pool: ``(L, P, 2K, ps, hd)`` (the kernels' page layout per layer)."""
  return (cfg.num_layers, *page_shape(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim))


def flat_pool(pages: jax.Array) -> jax.Array:
  """``[L, P, 2K, ps, hd] -> [L * P, 2K, ps, hd]``: one page axis over all layers (a bitcast).

  Layer ``l``'s page ``p`` is flat page ``l * P + p``: the layer scan offsets the page table by
  ``l * P``, so every attention function and the K/V write see one array and index only the
  pages a row uses.
  """
  L, P = pages.shape[:2]
  return pages.reshape(L * P, *pages.shape[2:])


def write_kv(pool: jax.Array, k: jax.Array, v: jax.Array, table: jax.Array,
             positions: jax.Array, valid: jax.Array) -> jax.Array:
  """Scatters ``k, v [B, T, K, hd]`` into the flat pool ``[L * P, 2K, ps, hd]`` in place.

  ``table [B, N]`` holds flat page ids (the layer's page table plus ``l * P``). Invalid tokens (``valid`` False)
  are dropped (their index is out of bounds), so padding never touches any page, the null page
  included. Called on a donated or loop-carried pool, XLA updates the buffer in place: the cost
  is that of the ``B * T`` written slots, whatever the pool's size.

  Each update is one ``[hd]`` vector at ``(page, 2k or 2k + 1, slot)``: the scatter's window is
  the minor (lane) axis alone, so it constrains no other axis's layout and the compiler keeps the
  pool in the layout the attention reads (a window over ``(2K, hd)`` made libtpu store the pool
  with the head axis second-minor and copy it to the gather's layout in every layer).
  """
  ps = pool.shape[2]
  logical = jnp.clip(positions // ps, 0, table.shape[1] - 1)
  pidx = jnp.take_along_axis(table, logical, axis=1)
  pidx = jnp.where(valid, pidx, pool.shape[0])  # out of bounds: dropped
  B, T, K, hd = k.shape
  kv = jnp.stack([k, v], axis=3).reshape(B, T, 2 * K, hd).astype(pool.dtype)  # interleaved
  heads = jnp.arange(2 * K, dtype=jnp.int32)[None, None, :]
  page = jnp.broadcast_to(pidx[:, :, None], (B, T, 2 * K))
  slot = jnp.broadcast_to((positions % ps)[:, :, None], (B, T, 2 * K))
  return pool.at[page, heads, slot].set(kv, mode="drop")


def paged_attention_reference(q, pool, table, q_pos, *, sliding_window=None):
  """jnp attention of ``q [B, T, H, hd]`` at ``q_pos [B, T]`` over the pages in ``table``.

  Reads only the row's pages (``pool[table]``, ``[B, N, 2K, ps, hd]``), never a copy that grows
  with the pool, and zeroes the slots no query may see, so stale inf/NaN left in a page by a
  previous owner (or in the null page) never reaches the output.
  """
  return paged_attention_jnp(q, pool, table, q_pos, sliding_window=sliding_window)


@dataclasses.dataclass(frozen=True)
class PallasAttention:
  """The Pallas kernel on the engine's layout: tokens and the decoder row folded per kv head.

  Same contract as :func:`paged_attention_reference`. A decode step (``T + 1 = 2`` rows at one
  position) is one query block whose pages are read once for both streams; a prefill chunk is
  cut into blocks of 16 tokens that each skip the pages causality hides from them. ``impl`` /
  ``interpret`` as in :func:`kernels_pallas.paged_attention.paged_attention` (``auto``: the
  target platform's lowering; an explicit ``impl="gpu", interpret=False`` exports the Triton
  kernel from a CPU host). Frozen and hashable: a static argument of the jitted steps.
  """

  impl: str = "auto"
  interpret: bool | None = None

  def __call__(self, q, pool, table, q_pos, *, sliding_window=None):
    return paged_attention(q, pool, table, q_pos, sliding_window=sliding_window,
                           q_block=min(q.shape[1], 16), impl=self.impl, interpret=self.interpret)


#: The engine's ``attention_backend="pallas"``.
paged_attention_pallas = PallasAttention()


@dataclasses.dataclass(frozen=True)
class ShardedAttention:
  """``attn_fn`` run per device inside ``jax.shard_map``: rows over ``row_axis``, kv heads over
  ``head_axis`` (either may be None: not split).

  q ``[B, T, H, hd]`` is split on its rows and heads, the flat pool ``[L * P, 2K, ps, hd]`` on its
  interleaved K/V axis (replicated over ``row_axis``), page tables and positions ``[B, .]`` on
  their rows. Device ``(d, m)`` attends only for the rows it owns, over exactly the K/V pairs of
  its query heads: no pool data moves between devices and no device attends for another's rows
  (GSPMD cannot partition a Pallas custom call, and left to itself gathers rows or the pool).
  Frozen and hashable, so it is a valid static argument of the jitted steps.
  """

  attn_fn: Callable
  mesh: Mesh
  head_axis: str | None
  row_axis: str | None = None

  def __call__(self, q, pool, table, q_pos, *, sliding_window=None):
    q_spec = P(self.row_axis, None, self.head_axis, None)
    rows = P(self.row_axis, None)
    f = functools.partial(self.attn_fn, sliding_window=sliding_window)
    return jax.shard_map(f, mesh=self.mesh,
                         in_specs=(q_spec, P(None, self.head_axis, None, None), rows, rows),
                         out_specs=q_spec, check_vma=False)(q, pool, table, q_pos)


_SCAN_UNROLL = contextvars.ContextVar("layer_scan_unroll", default=1)


@contextlib.contextmanager
def layer_scan_unroll(n: int):
  """Trace the steps with the layer scan unrolled ``n`` times (analysis only: libtpu's cost
  analysis counts a ``while`` body once, so ``icarus_jax.bench.aot.per_layer`` compiles unroll 1
  and 2 and takes the difference). Affects programs traced inside the block only."""
  token = _SCAN_UNROLL.set(n)
  try:
    yield
  finally:
    _SCAN_UNROLL.reset(token)


def _layer_scan(body, carry, base: Params, pool: Params, pages: jax.Array):
  """Runs ``body(carry, pool_flat, (lp, ll, table_offset)) -> (carry, pool_flat)`` over layers.

  The KV pool is part of the scan *carry* (never ``xs``/``ys``): each layer scatters its new K/V
  into the carried buffer and attention gathers only the rows' pages from it, so XLA keeps one
  pool buffer (the donated argument) and updates it in place.
  """
  L, P = pages.shape[:2]
  offsets = jnp.arange(L, dtype=jnp.int32) * P

  def step(c, xs):
    inner, pool_flat = c
    inner, pool_flat = body(inner, pool_flat, xs)
    return (inner, pool_flat), None

  (carry, pool_flat), _ = jax.lax.scan(step, (carry, flat_pool(pages)),
                                       (base["layers"], pool["layers"], offsets),
                                       unroll=_SCAN_UNROLL.get())
  return carry, pool_flat.reshape(pages.shape)


def paged_attend(pool_flat: jax.Array, table: jax.Array, q_pos: jax.Array, valid: jax.Array,
                 attn_fn, sliding_window: int | None):
  """The block's ``attend`` over the paged pool: scatter the new K/V (the block's first
  ``k.shape[1]`` tokens of ``q_pos``, where ``valid [B, k.shape[1]]``) into their pages, then
  ``attn_fn`` over the row's pages; ``aux`` is the updated flat pool."""
  def attend(q, k, v):
    pool = write_kv(pool_flat, k, v, table, q_pos[:, :k.shape[1]], valid)
    return attn_fn(q, pool, table, q_pos, sliding_window=sliding_window), pool
  return attend


def icarus_forward(cfg: ModelConfig, base: Params, pool: Params, pages: jax.Array,
                tokens: jax.Array, positions: jax.Array, valid: jax.Array, page_table: jax.Array,
                dec_token: jax.Array, dec_pos: jax.Array, rows: jax.Array, attn_fn=None):
  """Fused ICaRus step. Returns ``(logits [B, V] float32 of the decoder rows, pages)``.

  Each layer is one :func:`~icarus_jax.model.transformer.block` over ``[B, T + 1]`` tokens: the ``T``
  encoder tokens make K/V with the base weights, the decoder token (the last) uses the row's
  adapter and only queries. ``pages [L, P, 2K, ps, hd]`` is donated and updated in place (only
  the written slots change).
  """
  T = tokens.shape[1]
  attn_fn = attn_fn or paged_attention_reference
  h = embed(base, jnp.concatenate([tokens, dec_token[:, None]], axis=1))  # [B, T+1, D]
  q_pos = jnp.concatenate([positions, dec_pos[:, None]], axis=1)

  def body(h, pool_flat, xs):
    lp, ll, offset = xs
    attend = paged_attend(pool_flat, page_table + offset, q_pos, valid, attn_fn,
                          cfg.sliding_window)
    return block(cfg, lp, ll, h, q_pos, attend, kv_tokens=T, lora_from=T, kv_lora=False,
                 rows=rows)

  h, pages = _layer_scan(body, h, base, pool, pages)
  logits = head(cfg, base, pool.get("lm_head"), h[:, T:], rows)[:, 0]
  return logits, pages


def conventional_forward(cfg: ModelConfig, base: Params, pool: Params, pages: jax.Array,
                      tokens: jax.Array, positions: jax.Array, valid: jax.Array,
                      page_table: jax.Array, last_idx: jax.Array, rows: jax.Array, attn_fn=None):
  """Baseline step: the row's adapter on every weight, its own K/V written to its own pages.

  Returns ``(logits [B, V] at token index last_idx[b], pages)``; ``pages`` donated, updated in
  place.
  """
  attn_fn = attn_fn or paged_attention_reference

  def body(h, pool_flat, xs):
    lp, ll, offset = xs
    attend = paged_attend(pool_flat, page_table + offset, positions, valid, attn_fn,
                          cfg.sliding_window)
    return block(cfg, lp, ll, h, positions, attend, rows=rows)

  h, pages = _layer_scan(body, embed(base, tokens), base, pool, pages)
  h_last = jnp.take_along_axis(h, last_idx[:, None, None], axis=1)
  logits = head(cfg, base, pool.get("lm_head"), h_last, rows)[:, 0]
  return logits, pages


_STEP_JIT = dict(static_argnames=("cfg", "attn_fn"), donate_argnums=(3,))
icarus_step = jax.jit(icarus_forward, **_STEP_JIT)
conventional_step = jax.jit(conventional_forward, **_STEP_JIT)


def serving_step(cfg: ModelConfig, mode: str, base: Params, pool: Params, pages: jax.Array,
                 batch: StepBatch, attn_fn=None):
  """The model half of the engine's step on a :class:`~icarus_jax.serving.step_batch.StepBatch`
  (its ``sampling`` is not read: pass ``sampling=None``, so the program does not depend on the
  sampling widths): ``mode="icarus"`` runs :func:`icarus_forward`, ``"isolated"``
  :func:`conventional_forward`. Returns ``(logits [B, V] float32, pages)``; the runner samples
  from them on the device (``sampling.sample_step``). Un-jitted: the device runner jits it with
  the shardings of its mesh (``runner.DeviceRunner``); :data:`step` is the jit without a mesh.
  """
  b = batch
  if mode == "icarus":
    return icarus_forward(cfg, base, pool, pages, b.tokens, b.positions, b.valid, b.page_table,
                          b.dec_token, b.dec_pos, b.slots, attn_fn=attn_fn)
  return conventional_forward(cfg, base, pool, pages, b.tokens, b.positions, b.valid,
                              b.page_table, b.last_idx, b.slots, attn_fn=attn_fn)


step = jax.jit(serving_step, static_argnames=("cfg", "mode", "attn_fn"), donate_argnums=(4,))


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_pages(pages: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
  """``pages[:, dst[i]] = pages[:, src[i]]`` (copy-on-write of partially shared pages).

  ``pages`` is donated: only the ``dst`` pages are written.
  """
  return pages.at[:, dst].set(pages[:, src])
