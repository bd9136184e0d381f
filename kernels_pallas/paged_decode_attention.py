"""Paged decode attention with several query streams per sequence, over the one shared KV pool.

``q [batch, streams, heads, head_dim]``: stream 0 is typically the ICaRus encoder row of the new
token, the others are decoder rows of adapters reading the same sequence (the fused step has 2;
a fan-out of one context to ``n`` adapters has ``n + 1``). All streams of a row attend to the
same keys ``[0, lengths[b])`` through one page table, so the kernel folds the streams into the
GQA query group (``streams * heads / kv_heads`` rows per kv head) and reads every K/V page once
for all of them. Long contexts are split over the grid (``num_splits``, flash-decoding) and the
partials merged with a log-sum-exp weighting.

The kernels themselves (GPU-style and TPU-style lowerings, in-kernel page loop, online softmax)
live in :mod:`kernels_pallas.paged_attention`, shared with the prefill entry point; this file is
the decode contract: wrapper, validation and an independent pure-jnp reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.paged_attention import paged_attention
from kernels_pallas.reference import causal_visibility, gather_pages, masked_attention


def paged_decode_attention_reference(q: jax.Array, pages: jax.Array, page_table: jax.Array,
                                     lengths: jax.Array, *, sliding_window: int | None = None
                                     ) -> jax.Array:
  """Dense jnp decode attention: each stream of row ``b`` sees keys ``[0, lengths[b])``.

  q ``[B, S, H, hd]``, pages ``[P, 2K, ps, hd]``, page_table ``[B, N]``, lengths ``[B]``;
  returns ``[B, S, H, hd]`` in q's dtype (0 for ``lengths == 0``).
  """
  k, v = gather_pages(pages, page_table)
  k_pos = jnp.arange(k.shape[1], dtype=jnp.int32)[None]
  q_pos = jnp.broadcast_to((lengths - 1)[:, None], q.shape[:2])  # every stream at the last key
  return masked_attention(q, k, v, causal_visibility(q_pos, k_pos, sliding_window))


@functools.partial(jax.jit, static_argnames=("sliding_window", "pages_per_chunk", "num_splits",
                                             "impl", "interpret"))
def paged_decode_attention(q: jax.Array, pages: jax.Array, page_table: jax.Array,
                           lengths: jax.Array, *, sliding_window: int | None = None,
                           pages_per_chunk: int = 4, num_splits: int = 1, impl: str = "auto",
                           interpret=None) -> jax.Array:
  """Decode attention of ``streams`` query rows per sequence over the shared paged pool.

  Args:
    q: ``[batch, streams, heads, head_dim]`` f32/bf16/f16 queries, RoPE applied.
    pages: ``[num_pages, 2 * kv_heads, page_size, head_dim]`` one layer of the pool (K and V
      interleaved per kv head: ``2k`` is K, ``2k + 1`` is V of head ``k``), same dtype as q.
    page_table: ``[batch, pages_per_seq]`` int pool pages of each sequence.
    lengths: ``[batch]`` int number of cached tokens of each sequence (the current token
      included); every stream of the row sees keys ``[0, length)``.
    sliding_window, pages_per_chunk, num_splits, impl, interpret: see
      :func:`kernels_pallas.paged_attention.paged_attention` (static).
  Returns:
    ``[batch, streams, heads, head_dim]`` in q's dtype.
  Raises:
    ValueError naming the argument for bad shapes, dtypes or tuning values.
  """
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, streams, heads, head_dim]; got shape {q.shape}")
  if lengths.shape != (q.shape[0],) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be int [batch={q.shape[0]}]; got "
                     f"{lengths.dtype}{list(lengths.shape)}")
  B, S = q.shape[:2]
  q_pos = jnp.broadcast_to((lengths.astype(jnp.int32) - 1)[:, None], (B, S))
  return paged_attention(q, pages, page_table, q_pos, sliding_window=sliding_window, q_block=S,
                         pages_per_chunk=pages_per_chunk, num_splits=num_splits, impl=impl,
                         interpret=interpret)
