"""Sampling parameters and the batched, jitted sampler (greedy, temperature, top-k, top-p, seed)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from icarus_jax.errors import IcarusError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each next token.

  ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p >= 1`` disable those filters.
  ``seed`` makes sampling reproducible per request (independent of batching and preemption).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  max_tokens: int = 16
  stop_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    if not (self.temperature >= 0):
      raise IcarusError(f"temperature must be >= 0, got {self.temperature}")
    if not (0 < self.top_p <= 1):
      raise IcarusError(f"top_p must be in (0, 1], got {self.top_p}")
    if int(self.top_k) != self.top_k:
      raise IcarusError(f"top_k must be an int, got {self.top_k}")
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise IcarusError(f"max_tokens must be a positive int, got {self.max_tokens!r}")


GREEDY = SamplingParams()


@jax.jit
def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seeds: jax.Array, counters: jax.Array) -> jax.Array:
  """Next tokens ``[B]`` int32 from ``logits [B, V]`` with per-row parameters ``[B]``.

  The key of row b is ``fold_in(key(seeds[b]), counters[b])``, so a request's k-th token does
  not depend on which other requests share the batch.
  """
  V = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  t = jnp.maximum(temperature, 1e-6)[:, None]
  x = logits / t
  sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
  # top-k: keep values >= the k-th largest.
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)
  x = jnp.where(x >= kth, x, -jnp.inf)
  # top-p over the (top-k filtered) distribution: smallest prefix with mass >= p.
  sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_x, axis=-1)
  cum = jnp.cumsum(probs, axis=-1)
  cutoff_idx = jnp.sum(cum - probs < top_p[:, None], axis=-1) - 1
  cutoff = jnp.take_along_axis(sorted_x, jnp.maximum(cutoff_idx, 0)[:, None], axis=-1)
  x = jnp.where(x >= cutoff, x, -jnp.inf)
  keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
  drawn = jax.vmap(lambda kk, row: jax.random.categorical(kk, row))(keys, x).astype(jnp.int32)
  return jnp.where(temperature <= 0, greedy, drawn)
