"""Sampling parameters and the batched, jitted sampler (greedy, temperature, top-k, top-p, seed)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

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
    # Every value here ends up in a fixed-width device array of the batched sampler, so it is
    # checked per request, before it can share a batch (an out-of-range seed once failed the
    # conversion of the whole batch's seeds and with it every neighbour's request).
    try:
      stops = tuple(int(t) for t in self.stop_token_ids)
    except (TypeError, ValueError):
      raise IcarusError(f"stop_token_ids must be ints, got {self.stop_token_ids!r}") from None
    object.__setattr__(self, "stop_token_ids", stops)
    if not _is_real(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
      raise IcarusError(f"temperature must be a number in [0, {MAX_TEMPERATURE}], got "
                        f"{self.temperature!r}")
    if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
      raise IcarusError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
    if not _is_int(self.top_k) or not -1 <= self.top_k < 2**31:
      raise IcarusError(f"top_k must be an int in [-1, 2**31) (0 or -1: off), got {self.top_k!r}")
    if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
      raise IcarusError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
    if not _is_int(self.max_tokens) or self.max_tokens < 1:
      raise IcarusError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
    bad = [t for t in stops if not 0 <= t < 2**31]
    if bad:
      raise IcarusError(f"stop_token_ids must be in [0, 2**31), got {bad[:5]}")


MAX_TEMPERATURE = 1e4


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) \
      and math.isfinite(x)


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
