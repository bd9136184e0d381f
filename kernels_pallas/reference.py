"""The one jnp attention reference: dense, masked, grouped-query, NaN-safe.

Every other attention in the project is this function on a different view of the keys: the
model's dense causal attention (keys are the tokens themselves), the engine's paged reference
(keys gathered from the row's pages), and the references the Pallas kernels are tested against
(decode streams, ragged prefill). Only the visibility mask differs; the arithmetic is here once.

Shapes: B rows, T queries per row, S keys per row, H query heads, K kv heads (G = H / K query
heads share one kv head), hd head_dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

#: Score of a masked key: finite, so a row that sees nothing never computes inf - inf, and
#: ``exp(MASK_VALUE - max)`` is exactly 0 next to any visible key.
MASK_VALUE = -1e30


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
  """``softmax(q k^T / sqrt(hd)) v`` over the keys ``visible`` marks.

  Args:
    q: ``[B, T, H, hd]`` queries (RoPE applied).
    k, v: ``[B, S, K, hd]`` keys (RoPE applied) and values; ``H % K == 0``.
    visible: ``[B, T, S]`` bool, key ``s`` is visible to query ``t``.
  Returns:
    ``[B, T, H, hd]`` in q's dtype. Scores and softmax are float32 (the products accumulate in
    float32 from q's dtype). Keys and values no query of the row can see are zeroed before they
    are read, so inf/NaN in unused slots (stale pages, the null page) never reach the output; a
    query that sees no key gets 0.
  """
  B, T, H, hd = q.shape
  K = k.shape[2]
  used = jnp.any(visible, axis=1)[:, :, None, None]  # [B, S, 1, 1]: keys some query sees
  v = jnp.where(used, v, 0)  # NaN in K needs no zeroing: its scores are replaced below
  qg = q.reshape(B, T, K, H // K, hd)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype),
                 preferred_element_type=jnp.float32) / math.sqrt(hd)
  s = jnp.where(visible[:, None, None], s, MASK_VALUE)  # finite: masked keys get exactly 0
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = jnp.where(jnp.any(visible, axis=2)[:, :, None, None, None], o, 0)  # sees nothing: 0
  return o.reshape(B, T, H, hd).astype(q.dtype)


def gather_pages(pages: jax.Array, page_table: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keys and values of each row's pages, in logical order.

  ``pages [P, 2K, ps, hd]`` (K and V interleaved per kv head: ``2k`` is K, ``2k + 1`` V of head
  ``k``; see :data:`PAGE_LAYOUT`), ``page_table [B, N]`` -> ``k, v [B, N * ps, K, hd]``; key
  ``s`` of row ``b`` is at position ``s``.
  """
  B, N = page_table.shape
  K2, ps, hd = pages.shape[1:]
  kv = pages[page_table].transpose(0, 1, 3, 2, 4).reshape(B, N * ps, K2, hd)
  return kv[:, :, 0::2], kv[:, :, 1::2]


#: The page layout every kernel, reference and the engine share: ``[P, 2K, ps, hd]``. The
#: (kv-head, K/V) axis leads the page and is never tiled; the two minor axes ``(ps, hd)`` are the
#: TPU's (sublane, lane) tile whatever the mesh splits, so a DMA of one head's K and V is
#: tile-aligned and a ``model`` split of the head axis never changes the page's tiling.
PAGE_LAYOUT = ("pages", "kv_heads", "page_slots", "head_dim")


def page_shape(num_pages: int, page_size: int, kv_heads: int, head_dim: int) -> tuple:
  """Shape of a pool of ``num_pages`` pages in :data:`PAGE_LAYOUT`: ``(P, 2K, ps, hd)``."""
  return (num_pages, 2 * kv_heads, page_size, head_dim)


def causal_visibility(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None = None
                      ) -> jax.Array:
  """``[B, T, S]``: key at ``k_pos [B or 1, S]`` is visible to the query at ``q_pos [B, T]`` iff
  ``k_pos <= q_pos`` (and ``k_pos > q_pos - sliding_window``). ``q_pos = -1`` sees nothing."""
  kp = k_pos[:, None, :]
  qp = q_pos[:, :, None]
  vis = (kp <= qp) & (kp >= 0)
  if sliding_window is not None:
    vis &= kp > qp - sliding_window
  return vis
