"""Ragged paged prefill attention: new tokens of several sequences, packed back to back.

``q [total_tokens, heads, head_dim]`` holds the new tokens of sequence ``s`` at rows
``cu_q_lens[s] : cu_q_lens[s + 1]`` (vLLM's ``cu_seqlens_q`` convention). Sequence ``s`` has
``kv_lens[s]`` tokens in the cache once this step's K/V are written (its cached prefix, possibly
reused from another adapter's request, plus the new tokens), so new token ``i`` sits at position
``kv_lens[s] - q_len[s] + i`` and attends causally to the prefix pages and to the new tokens
before it. Used by the encoder during prefill (and by the engine's fused step, whose rows are
already padded and which calls :func:`kernels_pallas.paged_attention.paged_attention` directly).

The wrapper scatters the packed tokens into per-sequence query blocks (``max_q_len`` static, a
bucket bound like the engine's chunk size), runs the shared kernel with ``q_block`` tokens per
block (each block skips the pages causality hides from it), and gathers the rows back to the
packed layout. The copy in and out touches ``O(tokens * heads * head_dim)`` bytes, small next to
the K/V pages the kernel reads; ``docs/kernels.md`` discusses the trade-off against a kernel
that indexes the packed array directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.paged_attention import paged_attention
from kernels_pallas.reference import causal_visibility, gather_pages, masked_attention


def ragged_paged_prefill_attention_reference(q: jax.Array, pages: jax.Array,
                                             page_tables: jax.Array, cu_q_lens: jax.Array,
                                             kv_lens: jax.Array, *,
                                             sliding_window: int | None = None) -> jax.Array:
  """Token-by-token jnp reference: every packed token gathers its sequence's pages densely.

  Returns ``[total_tokens, heads, head_dim]`` in q's dtype; rows past ``cu_q_lens[-1]`` are 0.
  """
  i = jnp.arange(q.shape[0])
  seq = jnp.clip(jnp.searchsorted(cu_q_lens, i, side="right") - 1, 0, page_tables.shape[0] - 1)
  q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
  pos = kv_lens[seq] - q_len + (i - cu_q_lens[seq])  # [Tt]
  live = i < cu_q_lens[-1]
  k, v = gather_pages(pages, page_tables[seq])  # [Tt, N * ps, K, hd]: one "row" per token
  k_pos = jnp.arange(k.shape[1], dtype=jnp.int32)[None]
  q_pos = jnp.where(live, pos, -1)[:, None]  # [Tt, 1]
  o = masked_attention(q[:, None], k, v, causal_visibility(q_pos, k_pos, sliding_window))
  return o[:, 0]


@functools.partial(jax.jit, static_argnames=("max_q_len", "q_block", "sliding_window",
                                             "pages_per_chunk", "num_splits", "impl",
                                             "interpret"))
def ragged_paged_prefill_attention(q: jax.Array, pages: jax.Array, page_tables: jax.Array,
                                   cu_q_lens: jax.Array, kv_lens: jax.Array, *, max_q_len: int,
                                   q_block: int = 16, sliding_window: int | None = None,
                                   pages_per_chunk: int = 4, num_splits: int = 1,
                                   impl: str = "auto", interpret=None) -> jax.Array:
  """Causal attention of packed new tokens over their sequences' cached pages and themselves.

  Args:
    q: ``[total_tokens, heads, head_dim]`` packed queries (RoPE applied); rows past
      ``cu_q_lens[-1]`` are padding (output 0).
    pages: ``[num_pages, 2 * kv_heads, page_size, head_dim]`` one pool layer with this step's K/V
      already written.
    page_tables: ``[num_seqs, pages_per_seq]`` int.
    cu_q_lens: ``[num_seqs + 1]`` int, non-decreasing, ``cu_q_lens[0] == 0``.
    kv_lens: ``[num_seqs]`` int, cached tokens of each sequence including the new ones.
    max_q_len: static bound on any sequence's new tokens (the caller's bucket).
    q_block: static query tokens per kernel block.
    sliding_window, pages_per_chunk, num_splits, impl, interpret: as in
      :func:`kernels_pallas.paged_attention.paged_attention`.
  Returns:
    ``[total_tokens, heads, head_dim]`` in q's dtype.
  Raises:
    ValueError naming the argument for bad shapes, dtypes or tuning values.
  """
  if q.ndim != 3:
    raise ValueError(f"q must be [total_tokens, heads, head_dim]; got shape {q.shape}")
  if page_tables.ndim != 2:
    raise ValueError(f"page_tables must be [num_seqs, pages_per_seq]; got shape "
                     f"{page_tables.shape}")
  S = page_tables.shape[0]
  if cu_q_lens.shape != (S + 1,) or not jnp.issubdtype(cu_q_lens.dtype, jnp.integer):
    raise ValueError(f"cu_q_lens must be int [num_seqs + 1 = {S + 1}]; got "
                     f"{cu_q_lens.dtype}{list(cu_q_lens.shape)}")
  if kv_lens.shape != (S,) or not jnp.issubdtype(kv_lens.dtype, jnp.integer):
    raise ValueError(f"kv_lens must be int [num_seqs = {S}]; got {kv_lens.dtype}"
                     f"{list(kv_lens.shape)}")
  if not isinstance(max_q_len, int) or max_q_len < 1:
    raise ValueError(f"max_q_len must be a positive int; got {max_q_len!r}")
  if not isinstance(q_block, int) or q_block < 1:
    raise ValueError(f"q_block must be a positive int; got {q_block!r}")
  Tt = q.shape[0]
  cu = cu_q_lens.astype(jnp.int32)
  q_lens = cu[1:] - cu[:-1]
  t = jnp.arange(max_q_len, dtype=jnp.int32)[None, :]
  valid = t < q_lens[:, None]  # [S, max_q_len]
  idx = jnp.clip(cu[:-1, None] + t, 0, Tt - 1)
  q_seq = jnp.where(valid[:, :, None, None], q[idx], 0)  # [S, max_q_len, H, hd]
  q_pos = jnp.where(valid, kv_lens.astype(jnp.int32)[:, None] - q_lens[:, None] + t, -1)
  o = paged_attention(q_seq, pages, page_tables, q_pos, sliding_window=sliding_window,
                      q_block=min(q_block, max_q_len), pages_per_chunk=pages_per_chunk,
                      num_splits=num_splits, impl=impl, interpret=interpret)
  i = jnp.arange(Tt, dtype=jnp.int32)
  seq = jnp.clip(jnp.searchsorted(cu, i, side="right") - 1, 0, S - 1)
  off = jnp.clip(i - cu[seq], 0, max_q_len - 1)
  live = (i < cu[-1])[:, None, None]
  return jnp.where(live, o[seq, off], 0).astype(q.dtype)
