"""Paged attention over the one shared KV pool, with an explicit position for every query row.

This file holds the kernels every public attention entry point runs on (decode with several
query streams, ragged prefill, the engine's fused ICaRus step), in two lowerings, plus the jitted
wrapper and the pure-jnp reference they are tested against.

Shapes (B batch rows, T query tokens per row, H query heads, K kv heads, G = H / K, hd head_dim,
P pool pages, ps page_size, N logical pages per row):

  q           ``[B, T, H, hd]``   queries, RoPE applied; f32 or bf16
  pages       ``[P, 2K, ps, hd]`` pages of the pool; K and V interleaved per kv head:
                                  ``[p, 2k]`` is K, ``[p, 2k + 1]`` V of head ``k``; the head
                                  axis is untiled, ``(ps, hd)`` is the TPU tile
  page_table  ``[B, N]`` int32   pool page of each logical page of the row
  q_pos       ``[B, T]`` int32   position of each query; ``-1`` marks a padding query (output 0)

Query ``(b, t)`` sees key position ``p`` iff ``p <= q_pos[b, t]`` (and ``p > q_pos - window`` with
a sliding window). Keys live at ``pages[page_table[b, p // ps], :, p % ps]``.

How the work is laid out (the point of this kernel):
  * The ``T`` query tokens of a row and the ``G`` heads that share a kv head are folded into one
    block of ``R = q_block * G`` query rows. Every K/V page is read once per (row, kv head, query
    block) and serves all those rows: for a decode step with ``S`` streams (the encoder row and
    the decoder rows of the adapters reading the same sequence) ``T = S`` and the page traffic is
    that of a single stream.
  * Each program loops over its pages inside the kernel, ``pages_per_chunk`` pages per step, with
    an online (flash) softmax; pages outside ``[lo, hi)`` (the union of the block's visible
    ranges, so causal and sliding-window blocks skip what they cannot see) are never touched.
  * ``num_splits > 1`` splits the page range over the grid (flash-decoding); the partial results
    are merged outside the kernel with a log-sum-exp weighting.
  * Key slots outside ``[lo, hi)`` that a chunk still loads (the tail of a chunk, a partly filled
    page) are zeroed before they meet the probabilities, so stale or NaN data in unused pages can
    never leak into the output.

Lowerings:
  * ``impl="gpu"``: the page table is an ordinary kernel input and pages are gathered with vector
    indices from a per-kv-head view of the pool (Triton / Mosaic-GPU friendly: power-of-two
    blocks, ``dot_general`` with f32 accumulation).
  * ``impl="tpu"``: page table and block bounds are scalar-prefetched into SMEM, the pool stays in
    HBM (``memory_space=ANY``) and each page's ``[2, ps, hd]`` K/V pair of the program's kv head
    is one DMA into a double-buffered VMEM scratch: chunk ``c + 1`` is in flight while chunk
    ``c`` is computed. The DMA slices only the page and head axes, which Mosaic leaves untiled,
    so it is tile-aligned for every dtype and mesh split (the old ``[P, ps, 2K, hd]`` layout
    sliced one head out of the tiled sublane axis, which libtpu rejects).
  The online-softmax step, bounds computation, folding and split merge are shared.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.reference import MASK_VALUE, causal_visibility, gather_pages, masked_attention

IMPLS = ("auto", "gpu", "tpu")



# ----------------------------------------------------------------------------- reference


def paged_attention_reference(q: jax.Array, pages: jax.Array, page_table: jax.Array,
                              q_pos: jax.Array, *, sliding_window: int | None = None
                              ) -> jax.Array:
  """Pure-jnp paged attention: :func:`~kernels_pallas.reference.masked_attention` over every
  page of the row, keys at positions ``0 .. N * ps - 1``.

  Same contract as :func:`paged_attention`: ``[B, T, H, hd]`` in q's dtype, padding queries
  (``q_pos == -1``) give 0, NaN in slots no query may read is harmless.
  """
  k, v = gather_pages(pages, page_table)
  k_pos = jnp.arange(k.shape[1], dtype=jnp.int32)[None]
  return masked_attention(q, k, v, causal_visibility(q_pos, k_pos, sliding_window))


# ----------------------------------------------------------------------------- shared pieces


def _online_softmax_step(carry, q, k, v, row_pos, k_pos, key_ok, *, sliding_window, scale):
  """One chunk of flash attention for a block of folded query rows.

  q ``[R, hd]``, k/v ``[C, hd]``, row_pos ``[R, 1]`` int32, k_pos ``[1, C]`` int32, key_ok
  ``[C, 1]`` (False for slots no row of the block may read). carry = (o ``[R, hd]`` f32,
  m ``[R, 1]`` f32, l ``[R, 1]`` f32).
  """
  o, m, l = carry
  # f32: no silent TF32 / bf16 passes; bf16/f16: the native MXU pass, explicitly (Mosaic rejects
  # an fp32-precision matmul of bf16 operands, e.g. under jax_default_matmul_precision=highest)
  prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec,
                      preferred_element_type=jnp.float32)
  s = s * scale
  vis = k_pos <= row_pos
  if sliding_window is not None:
    vis = vis & (k_pos > row_pos - sliding_window)
  s = jnp.where(vis, s, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  v = jnp.where(key_ok, v, jnp.zeros_like(v))
  pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=prec,
                       preferred_element_type=jnp.float32)
  return alpha * o + pv, m_new, l_new


def _chunk_range(lo_tok, hi_tok, split, *, page_size, pages_per_chunk, chunks_per_split):
  """Chunks ``[c_lo, c_hi)`` this split must visit for the token range ``[lo_tok, hi_tok)``."""
  chunk_tokens = page_size * pages_per_chunk
  c_lo = jnp.maximum(lo_tok // chunk_tokens, split * chunks_per_split)
  c_hi = jnp.minimum((hi_tok + chunk_tokens - 1) // chunk_tokens, (split + 1) * chunks_per_split)
  return c_lo, c_hi


def _chunk_positions(c, lo_tok, hi_tok, *, page_size, pages_per_chunk):
  C = page_size * pages_per_chunk
  k_pos = c * C + lax.broadcasted_iota(jnp.int32, (1, C), 1)
  slot = c * C + lax.broadcasted_iota(jnp.int32, (C, 1), 0)
  key_ok = (slot >= lo_tok) & (slot < hi_tok)
  return k_pos, key_ok


def _init_carry(R, hd):
  return (jnp.zeros((R, hd), jnp.float32), jnp.full((R, 1), MASK_VALUE, jnp.float32),
          jnp.zeros((R, 1), jnp.float32))


def _page_loop(load_chunk, c_lo, c_hi, lo_tok, hi_tok, q_ref, pos_ref, o_ref, m_ref, l_ref, *,
               page_size, pages_per_chunk, sliding_window, scale):
  """The in-kernel loop both lowerings share: chunks ``[c_lo, c_hi)``, online softmax, store.

  ``load_chunk(c) -> (k, v)`` each ``[pages_per_chunk * page_size, hd]`` is the only part that
  differs (vector gather on GPU, double-buffered DMA on TPU).
  """
  q = q_ref[...]
  row_pos = pos_ref[...]

  def body(c, carry):
    k, v = load_chunk(c)
    k_pos, key_ok = _chunk_positions(c, lo_tok, hi_tok, page_size=page_size,
                                     pages_per_chunk=pages_per_chunk)
    return _online_softmax_step(carry, q, k, v, row_pos, k_pos, key_ok,
                                sliding_window=sliding_window, scale=scale)

  o, m, l = lax.fori_loop(c_lo, jnp.maximum(c_lo, c_hi), body, _init_carry(*q.shape))
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = l


def _block_specs(q_shape, num_splits):
  """Blocks both lowerings share, for grid ``(B, K, nqb, num_splits)``.

  In: positions ``[R, 1]`` and q ``[R, hd]`` of (row, kv head, query block). Out: the split's
  unnormalised o ``[R, hd]`` and running max / denominator ``[R, 1]``, all f32. Index maps take
  ``*_`` so the TPU grid's scalar-prefetch refs pass through.
  """
  B, K, nqb, R, hd = q_shape
  out_map = lambda b, k, j, s, *_: (b, k, j, s, 0, 0)  # noqa: E731
  in_specs = [pl.BlockSpec((None, None, R, 1), lambda b, k, j, s, *_: (b, j, 0, 0)),
              pl.BlockSpec((None, None, None, R, hd), lambda b, k, j, s, *_: (b, k, j, 0, 0))]
  stat = pl.BlockSpec((None, None, None, None, R, 1), out_map)
  out_specs = [pl.BlockSpec((None, None, None, None, R, hd), out_map), stat, stat]
  stat_shape = jax.ShapeDtypeStruct((B, K, nqb, num_splits, R, 1), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct((B, K, nqb, num_splits, R, hd), jnp.float32), stat_shape,
               stat_shape]
  return in_specs, out_specs, out_shape


# ----------------------------------------------------------------------------- GPU-style kernel


def _gpu_kernel(pos_ref, q_ref, bounds_ref, pt_ref, pages_ref, o_ref, m_ref, l_ref, *,
                num_kv_heads, page_size, pages_per_chunk, chunks_per_split, sliding_window,
                scale):
  """One (row, kv head, query block, split): pages gathered by vector index from the pool.

  pos ``[R, 1]``, q ``[R, hd]``, bounds ``[2]`` token range, pt ``[N_pad]``, pages the whole
  pool ``[P, 2K, ps, hd]`` (left in global memory: a chunk's pages are gathered from it, nothing
  pool-sized is ever staged or copied), outputs o ``[R, hd]``, m/l ``[R, 1]`` f32.
  """
  kh = pl.program_id(1)
  split = pl.program_id(3)
  lo_tok, hi_tok = bounds_ref[0], bounds_ref[1]
  c_lo, c_hi = _chunk_range(lo_tok, hi_tok, split, page_size=page_size,
                            pages_per_chunk=pages_per_chunk, chunks_per_split=chunks_per_split)
  hd = q_ref.shape[-1]
  C = page_size * pages_per_chunk

  def load_chunk(c):
    pidx = pt_ref[pl.ds(c * pages_per_chunk, pages_per_chunk)]
    k = pages_ref[pidx, 2 * kh, :, :]  # K and V of a kv head are interleaved
    v = pages_ref[pidx, 2 * kh + 1, :, :]
    return k.reshape(C, hd), v.reshape(C, hd)

  _page_loop(load_chunk, c_lo, c_hi, lo_tok, hi_tok, q_ref, pos_ref, o_ref, m_ref, l_ref,
             page_size=page_size, pages_per_chunk=pages_per_chunk,
             sliding_window=sliding_window, scale=scale)


def _call_gpu(q_f, pos_f, bounds, pt, pages, *, num_splits, chunks_per_split, pages_per_chunk,
              sliding_window, interpret):
  B, K, nqb, R, hd = q_f.shape
  kernel = functools.partial(_gpu_kernel, num_kv_heads=K, page_size=pages.shape[2],
                             pages_per_chunk=pages_per_chunk, chunks_per_split=chunks_per_split,
                             sliding_window=sliding_window, scale=1.0 / math.sqrt(hd))
  in_specs, out_specs, out_shape = _block_specs(q_f.shape, num_splits)
  return pl.pallas_call(
      kernel,
      grid=(B, K, nqb, num_splits),
      in_specs=in_specs + [
          pl.BlockSpec((None, None, 2), lambda b, k, j, s: (b, j, 0)),  # bounds
          pl.BlockSpec((None, pt.shape[1]), lambda b, k, j, s: (b, 0)),  # page table row
          # The whole pool as one block at a fixed origin: a pointer into global memory on GPU,
          # and in interpret mode a loop-invariant value (no per-step slice of the pool).
          pl.BlockSpec(pages.shape, lambda b, k, j, s: (0, 0, 0, 0)),
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      interpret=interpret,
      # Triton, explicitly: the pool stays in global memory and is gathered per chunk (Mosaic
      # GPU would stage whole blocks in shared memory).
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      name="icarus_paged_attention_gpu",
  )(pos_f, q_f, bounds, pt, pages)


# ----------------------------------------------------------------------------- TPU-style kernel


def _tpu_kernel(pt_sref, bounds_sref, pos_ref, q_ref, pages_hbm, o_ref, m_ref, l_ref,
                kv_buf, sem, *, num_kv_heads, num_qblocks, pt_row_len, page_size,
                pages_per_chunk, chunks_per_split, sliding_window, scale):
  """One (row, kv head, query block, split) with scalar-prefetched page table and DMA'd pages.

  pt_sref ``[B * N_pad]`` and bounds_sref ``[B * nqb * 2]`` in SMEM; pages_hbm the whole pool
  ``[P, 2K, ps, hd]`` in HBM; kv_buf ``[2 (slot), pages_per_chunk, 2 (k/v), ps, hd]`` VMEM
  (double buffer); sem one DMA semaphore per slot. A page's K and V of head ``kh`` are
  ``pages_hbm[pidx, 2kh : 2kh + 2]``: one DMA over untiled axes.
  """
  b, kh, j, split = (pl.program_id(i) for i in range(4))
  row = b * num_qblocks + j
  lo_tok, hi_tok = bounds_sref[2 * row], bounds_sref[2 * row + 1]
  c_lo, c_hi = _chunk_range(lo_tok, hi_tok, split, page_size=page_size,
                            pages_per_chunk=pages_per_chunk, chunks_per_split=chunks_per_split)
  pt_row = b * pt_row_len
  hd = q_ref.shape[-1]
  C = page_size * pages_per_chunk

  def copies(c, slot):
    out = []
    for i in range(pages_per_chunk):
      pidx = pt_sref[pt_row + c * pages_per_chunk + i]
      out.append(pltpu.make_async_copy(pages_hbm.at[pidx, pl.ds(2 * kh, 2)],
                                       kv_buf.at[slot, i], sem.at[slot]))
    return out

  @pl.when(c_lo < c_hi)
  def _():
    for cp in copies(c_lo, 0):
      cp.start()

  def load_chunk(c):
    slot = (c - c_lo) % 2

    @pl.when(c + 1 < c_hi)
    def _():  # prefetch the next chunk into the other buffer while this one is computed
      for cp in copies(c + 1, 1 - slot):
        cp.start()

    for cp in copies(c, slot):
      cp.wait()
    kv = kv_buf[slot]  # [pages_per_chunk, 2, ps, hd]
    return kv[:, 0].reshape(C, hd), kv[:, 1].reshape(C, hd)

  _page_loop(load_chunk, c_lo, c_hi, lo_tok, hi_tok, q_ref, pos_ref, o_ref, m_ref, l_ref,
             page_size=page_size, pages_per_chunk=pages_per_chunk,
             sliding_window=sliding_window, scale=scale)


def _call_tpu(q_f, pos_f, bounds, pt, pages, *, num_splits, chunks_per_split, pages_per_chunk,
              sliding_window, interpret):
  B, K, nqb, R, hd = q_f.shape
  ps = pages.shape[2]
  kernel = functools.partial(_tpu_kernel, num_kv_heads=K, num_qblocks=nqb,
                             pt_row_len=pt.shape[1], page_size=ps,
                             pages_per_chunk=pages_per_chunk, chunks_per_split=chunks_per_split,
                             sliding_window=sliding_window, scale=1.0 / math.sqrt(hd))
  in_specs, out_specs, out_shape = _block_specs(q_f.shape, num_splits)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(B, K, nqb, num_splits),
      in_specs=in_specs + [pl.BlockSpec(memory_space=pl.ANY)],  # the pool layer stays in HBM
      out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((2, pages_per_chunk, 2, ps, hd), pages.dtype),
                      pltpu.SemaphoreType.DMA((2,))],
  )
  if interpret is True:
    interpret = pltpu.InterpretParams()
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="icarus_paged_attention_tpu",
  )(pt.reshape(-1), bounds.reshape(-1), pos_f, q_f, pages)


# ----------------------------------------------------------------------------- the wrapper


def _is_int(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.integer)


def _validate(q, pages, page_table, q_pos, sliding_window, q_block, pages_per_chunk, num_splits,
              impl):
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, tokens, heads, head_dim]; got shape {q.shape}")
  if pages.ndim != 4:
    raise ValueError(f"pages must be [num_pages, 2 * kv_heads, page_size, head_dim]; got shape "
                     f"{pages.shape}")
  B, T, H, hd = q.shape
  P, K2, ps, phd = pages.shape
  if phd != hd:
    raise ValueError(f"pages head_dim {phd} != q head_dim {hd}")
  if K2 % 2:
    raise ValueError(f"pages axis 1 holds K and V of each kv head and must be even; got {K2}")
  if H % (K2 // 2):
    raise ValueError(f"q heads {H} must be a multiple of the kv heads {K2 // 2} (GQA)")
  if q.dtype != pages.dtype:
    raise ValueError(f"q dtype {q.dtype} != pages dtype {pages.dtype}")
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"q dtype {q.dtype} unsupported; accepted: float32, bfloat16, float16")
  if page_table.ndim != 2 or page_table.shape[0] != B or not _is_int(page_table):
    raise ValueError(f"page_table must be int [batch={B}, pages_per_seq]; got "
                     f"{page_table.dtype}{list(page_table.shape)}")
  if q_pos.shape != (B, T) or not _is_int(q_pos):
    raise ValueError(f"q_pos must be int [batch={B}, tokens={T}]; got "
                     f"{q_pos.dtype}{list(q_pos.shape)}")
  if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
    raise ValueError(f"sliding_window must be a positive int or None; got {sliding_window!r}")
  for name, val in (("q_block", q_block), ("pages_per_chunk", pages_per_chunk),
                    ("num_splits", num_splits)):
    if val is not None and (not isinstance(val, int) or val < 1):
      raise ValueError(f"{name} must be a positive int; got {val!r}")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")


def target_platform() -> str:
  """The platform a program traced now is compiled for: the devices of the current mesh (set by
  ``jax.set_mesh`` or an enclosing ``shard_map``) when there is one, e.g. an ahead-of-time
  compile for a TPU topology on a CPU host; else the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def resolve_impl(impl: str, interpret) -> tuple[str, object]:
  """``auto`` -> the target platform's lowering; ``interpret=None`` -> interpret on CPU only."""
  backend = target_platform()
  if impl == "auto":
    impl = "tpu" if backend == "tpu" else "gpu"
  if interpret is None:
    interpret = backend == "cpu"
  return impl, interpret


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@functools.partial(jax.jit, static_argnames=("sliding_window", "q_block", "pages_per_chunk",
                                             "num_splits", "impl", "interpret"))
def paged_attention(q: jax.Array, pages: jax.Array, page_table: jax.Array, q_pos: jax.Array, *,
                    sliding_window: int | None = None, q_block: int | None = None,
                    pages_per_chunk: int = 4, num_splits: int = 1, impl: str = "auto",
                    interpret=None) -> jax.Array:
  """Paged attention of ``q [B, T, H, hd]`` at ``q_pos [B, T]`` over one pool layer.

  Static tuning args: ``q_block`` query tokens per block (default: all ``T``, the decode
  setting), ``pages_per_chunk`` pages per inner-loop step, ``num_splits`` split-K partitions of
  the page range, ``impl`` (``auto | gpu | tpu``) and ``interpret`` (``None``: on CPU only; True;
  or a ``pltpu.InterpretParams`` for the TPU-style kernel).

  Returns ``[B, T, H, hd]`` in q's dtype; rows with ``q_pos == -1`` are 0.
  Raises ``ValueError`` naming the argument on bad shapes, dtypes or tuning values.
  """
  _validate(q, pages, page_table, q_pos, sliding_window, q_block, pages_per_chunk, num_splits,
            impl)
  impl, interpret = resolve_impl(impl, interpret)
  B, T, H, hd = q.shape
  _, K2, ps, _ = pages.shape
  K, G = K2 // 2, H // (K2 // 2)
  N = page_table.shape[1]
  q_block = min(q_block or T, T)
  nqb = -(-T // q_block)
  T_pad = nqb * q_block

  # Fold [B, T, H, hd] -> [B, K, nqb, R, hd]: row r = token (r // G), head-in-group (r % G).
  qg = q.reshape(B, T, K, G, hd)
  pos = q_pos.astype(jnp.int32)
  if T_pad != T:
    qg = jnp.pad(qg, ((0, 0), (0, T_pad - T), (0, 0), (0, 0), (0, 0)))
    pos = jnp.pad(pos, ((0, 0), (0, T_pad - T)), constant_values=-1)
  R = q_block * G
  q_f = qg.reshape(B, nqb, q_block, K, G, hd).transpose(0, 3, 1, 2, 4, 5).reshape(B, K, nqb, R, hd)
  pos_f = jnp.repeat(pos.reshape(B, nqb, q_block), G, axis=2)  # [B, nqb, R]
  if impl == "gpu" and not interpret:
    R_pad = max(16, pl.next_power_of_2(R))  # Triton dot wants power-of-two blocks >= 16
  else:
    R_pad = _round_up(R, 8)
  if R_pad != R:
    q_f = jnp.pad(q_f, ((0, 0), (0, 0), (0, 0), (0, R_pad - R), (0, 0)))
    pos_f = jnp.pad(pos_f, ((0, 0), (0, 0), (0, R_pad - R)), constant_values=-1)

  # Token range [lo, hi) each query block may see; empty if every row is padding.
  live = pos_f >= 0
  hi = jnp.where(live.any(-1), jnp.max(pos_f, axis=-1) + 1, 0)
  hi = jnp.minimum(hi, N * ps)
  if sliding_window is None:
    lo = jnp.zeros_like(hi)
  else:
    min_pos = jnp.min(jnp.where(live, pos_f, jnp.iinfo(jnp.int32).max), axis=-1)
    lo = jnp.where(live.any(-1), jnp.maximum(min_pos - sliding_window + 1, 0), 0)
  bounds = jnp.stack([lo, hi], axis=-1).astype(jnp.int32)  # [B, nqb, 2]

  ppc = min(pages_per_chunk, N)
  if impl == "gpu" and not interpret:
    C = ppc * ps
    if C < 16 or C & (C - 1) or hd < 16 or hd & (hd - 1):
      raise ValueError(f"the GPU lowering needs pages_per_chunk * page_size ({ppc} * {ps}) and "
                       f"head_dim ({hd}) to be powers of two >= 16 (Triton block shapes); "
                       f"raise pages_per_chunk or use interpret mode")
  n_chunks = -(-N // ppc)
  num_splits = min(num_splits, n_chunks)
  cps = -(-n_chunks // num_splits)
  N_pad = cps * num_splits * ppc
  pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, N_pad - N)))

  call = _call_tpu if impl == "tpu" else _call_gpu
  o, m, l = call(q_f, pos_f[..., None], bounds, pt, pages, num_splits=num_splits,
                 chunks_per_split=cps, pages_per_chunk=ppc, sliding_window=sliding_window,
                 interpret=interpret)
  o = merge_splits(o, m, l)  # [B, K, nqb, R_pad, hd] f32
  o = o[:, :, :, :R].reshape(B, K, nqb, q_block, G, hd).transpose(0, 2, 3, 1, 4, 5)
  return o.reshape(B, T_pad, H, hd)[:, :T].astype(q.dtype)


def merge_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
  """Log-sum-exp merge of split-K partials.

  o ``[..., S, R, hd]`` unnormalised f32, m/l ``[..., S, R, 1]`` running max and denominator;
  returns ``[..., R, hd]``; rows that saw no key are 0.
  """
  m_all = jnp.max(m, axis=-3, keepdims=True)
  w = jnp.exp(m - m_all)
  l_all = jnp.sum(w * l, axis=-3)
  o_all = jnp.sum(w * o, axis=-3)
  return o_all / jnp.where(l_all == 0, 1.0, l_all)
