"""Sampling parameters and the batched, jitted sampler that runs on the device after each step.

Per request (:class:`SamplingParams`): greedy or temperature, top-k, top-p, min-p, a seed,
presence / frequency / repetition penalties, ``logit_bias``, and logprobs (the sampled token's
and up to :data:`MAX_TOP_LOGPROBS` alternatives). Per step, the rows' parameters travel as a
:class:`SamplingBatch` inside the step's batch; :data:`sample_step` turns the step's logits into
token ids (and logprobs) on the device, dispatched right after the model step (the logits never
leave the device), so one small device-to-host transfer per step carries everything the
scheduler needs, and rows with different parameters share one program.

The order of operations (vLLM's, and :func:`sample_reference`'s, the numpy oracle the tests
compare against) for a row with logits ``l [V]``:

0. tokens the row's grammar forbids (structured outputs) -> ``-inf``
1. ``l += logit_bias``
2. repetition penalty ``r`` on every token of the prompt or the output: ``l > 0 ? l / r : l * r``
3. ``l -= frequency * count_out + presence * (count_out > 0)`` (``count_out``: occurrences of
   the token in the output so far)
4. greedy rows take ``argmax(l)``; the others divide by the temperature;
   **logprobs** are ``log_softmax`` of this (the temperature ``1`` for greedy rows), before any
   truncation: the model's distribution as the request shaped it
5. min-p keeps tokens with ``p >= min_p * max(p)``; top-k the ``k`` largest; top-p the smallest
   prefix (by descending probability) whose mass reaches ``p``
6. a draw with key ``fold_in(key(seed), counter)`` (``counter``: output tokens so far), so a
   request's k-th token does not depend on which other requests share the batch

Penalties and biases are sparse per row: the host lists the tokens concerned (``adj_*`` arrays,
width ``W`` bucketed to a power of two, ``0`` when no row of the step uses them, so ordinary
steps compile and run exactly as before).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from icarus_jax.errors import IcarusError

MAX_TEMPERATURE = 1e4
MAX_TOP_LOGPROBS = 20  # OpenAI's limit; the step computes this many when any row asks
MAX_BIAS = 100.0       # OpenAI: logit_bias values in [-100, 100]
MAX_PENALTY = 2.0      # OpenAI: presence/frequency penalties in [-2, 2]
#: token id of padding entries in the sparse ``adj_ids`` (out of range: dropped by the scatter)
PAD_ID = 2**30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each next token (see the module docstring for the exact order).

  ``temperature == 0`` is greedy. ``top_k <= 0``, ``top_p >= 1``, ``min_p == 0``, penalties
  ``0`` / ``1`` (repetition) and an empty ``logit_bias`` are off. ``seed`` makes sampling
  reproducible per request (independent of batching and preemption). ``logprobs``: ``None``
  returns none; ``k`` in ``[0, MAX_TOP_LOGPROBS]`` returns the sampled token's logprob and the
  ``k`` most likely tokens' with each token. ``logit_bias``: ``{token id: bias}`` (a mapping or
  pairs; stored as sorted pairs). ``grammar``: a compiled grammar (``grammar.GrammarCompiler``);
  each token is drawn from the tokens it allows (step 0, before everything else), and the
  request ends with ``"stop"`` once the grammar is complete.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  max_tokens: int = 16
  stop_token_ids: tuple[int, ...] = ()
  min_p: float = 0.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  logit_bias: tuple[tuple[int, float], ...] = ()
  logprobs: int | None = None
  grammar: str | None = None  # structured output (``grammar.GrammarCompiler``): masks each token

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
    if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
      raise IcarusError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
    for name in ("presence_penalty", "frequency_penalty"):
      v = getattr(self, name)
      if not _is_real(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
        raise IcarusError(f"{name} must be a number in [-{MAX_PENALTY}, {MAX_PENALTY}], got "
                          f"{v!r}")
    r = self.repetition_penalty
    if not _is_real(r) or not 0 < r <= MAX_TEMPERATURE:
      raise IcarusError(f"repetition_penalty must be a number in (0, {MAX_TEMPERATURE}] (1: off), "
                        f"got {r!r}")
    object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
    if self.grammar is not None and not isinstance(self.grammar, str):
      raise IcarusError(f"grammar must be a compiled grammar string, got "
                        f"{type(self.grammar).__name__}")
    if self.logprobs is not None and (not _is_int(self.logprobs)
                                      or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
      raise IcarusError(f"logprobs must be None or an int in [0, {MAX_TOP_LOGPROBS}] (the number "
                        f"of top alternatives), got {self.logprobs!r}")

  @property
  def uses_history(self) -> bool:
    """Whether a penalty needs the tokens seen so far."""
    return (self.presence_penalty != 0 or self.frequency_penalty != 0
            or self.repetition_penalty != 1)

  def check_vocab(self, vocab_size: int) -> None:
    """Raises if a ``logit_bias`` token is not in ``[0, vocab_size)``."""
    bad = [t for t, _ in self.logit_bias if t >= vocab_size]
    if bad:
      raise IcarusError(f"logit_bias token ids must be in [0, {vocab_size}) for this model, got "
                        f"{bad[:5]}")


def _bias_pairs(bias) -> tuple[tuple[int, float], ...]:
  items = bias.items() if isinstance(bias, Mapping) else bias
  try:
    pairs = [(int(t), float(v)) for t, v in items]
  except (TypeError, ValueError):
    raise IcarusError(f"logit_bias must map token ids (ints) to numbers, got {bias!r}") from None
  for t, v in pairs:
    if not 0 <= t < 2**30:
      raise IcarusError(f"logit_bias token ids must be in [0, 2**30), got {t}")
    if not math.isfinite(v) or not -MAX_BIAS <= v <= MAX_BIAS:
      raise IcarusError(f"logit_bias values must be in [-{MAX_BIAS}, {MAX_BIAS}], got {v!r} for "
                        f"token {t}")
  merged: dict[int, float] = {}
  for t, v in pairs:
    merged[t] = v  # the last one wins, as in a JSON object
  return tuple(sorted(merged.items()))


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) \
      and math.isfinite(x)


GREEDY = SamplingParams()


# ------------------------------------------------------------------------------ host side

def adjustments(sp: SamplingParams, context: Sequence[int], num_output: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
  """The sparse per-token adjustments of one row: ``(ids, out_count, penalized, bias)``, one
  entry per distinct token concerned, or ``None`` when the request uses neither penalties nor a
  bias. ``context``: prompt then output tokens (the last ``num_output`` are the output)."""
  if not sp.uses_history and not sp.logit_bias:
    return None
  ctx = np.asarray(context, np.int64)
  out = ctx[len(ctx) - num_output:] if num_output else ctx[:0]
  seen = np.unique(ctx) if sp.repetition_penalty != 1 else ctx[:0]
  out_ids, out_n = np.unique(out, return_counts=True)
  if not sp.uses_history:
    out_ids, out_n = out_ids[:0], out_n[:0]
  bias_ids = np.array([t for t, _ in sp.logit_bias], np.int64)
  ids = np.union1d(np.union1d(seen, out_ids), bias_ids)
  count = np.zeros(len(ids), np.float32)
  count[np.searchsorted(ids, out_ids)] = out_n
  penalized = np.zeros(len(ids), bool)
  penalized[np.searchsorted(ids, seen)] = True
  bias = np.zeros(len(ids), np.float32)
  if sp.logit_bias:
    bias[np.searchsorted(ids, bias_ids)] = [v for _, v in sp.logit_bias]
  return ids.astype(np.int32), count, penalized, bias


@dataclasses.dataclass(frozen=True)
class SamplingBatch:
  """The rows' sampling parameters, ``B`` rows (padding rows greedy), ``W`` adjustment slots.

  temperature, top_p, min_p, presence, frequency, repetition ``[B]`` float32;
  top_k, counter ``[B]`` int32; seed ``[B]`` uint32;
  adj_ids ``[B, W]`` int32 (``PAD_ID`` pads), adj_count ``[B, W]`` float32,
  adj_penalized ``[B, W]`` bool, adj_bias ``[B, W]`` float32;
  allowed ``[B, M]`` int32: grammar bitmask words (bit ``v % 32`` of word ``v // 32``: token
  ``v`` allowed; ``M = ceil(V / 32)`` when a row has a grammar, else 0; rows without one: all
  bits set).
  """

  temperature: np.ndarray
  top_k: np.ndarray
  top_p: np.ndarray
  min_p: np.ndarray
  seed: np.ndarray
  counter: np.ndarray
  presence: np.ndarray
  frequency: np.ndarray
  repetition: np.ndarray
  adj_ids: np.ndarray
  adj_count: np.ndarray
  adj_penalized: np.ndarray
  adj_bias: np.ndarray
  allowed: np.ndarray


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingBatch))
jax.tree_util.register_dataclass(SamplingBatch, data_fields=list(SAMPLING_FIELDS), meta_fields=[])


def adjustment_width(n: int) -> int:
  """``W`` for rows listing at most ``n`` tokens: 0, or a power of two >= 16."""
  return 0 if n == 0 else max(16, 1 << math.ceil(math.log2(n)))


def pack(params: Sequence[SamplingParams], counters: Sequence[int],
         adjust: Sequence[tuple | None], B: int,
         masks: Sequence[np.ndarray | None] = ()) -> SamplingBatch:
  """Host arrays for ``B`` rows (the first ``len(params)`` real, the rest greedy padding);
  ``masks``: each row's grammar bitmask or None."""
  n = len(params)
  M = max((len(m) for m in masks if m is not None), default=0)
  allowed = np.full((B, M), -1, np.int32)
  for i, m in enumerate(masks):
    if m is not None:
      allowed[i] = m
  W = adjustment_width(max((len(a[0]) for a in adjust if a is not None), default=0))

  def col(vals, pad, dt):
    return np.array(list(vals) + [pad] * (B - n), dt)
  sb = SamplingBatch(
      temperature=col((p.temperature for p in params), 0.0, np.float32),
      top_k=col((p.top_k for p in params), 0, np.int32),
      top_p=col((p.top_p for p in params), 1.0, np.float32),
      min_p=col((p.min_p for p in params), 0.0, np.float32),
      seed=col((p.seed for p in params), 0, np.uint32),
      counter=col(counters, 0, np.int32),
      presence=col((p.presence_penalty for p in params), 0.0, np.float32),
      frequency=col((p.frequency_penalty for p in params), 0.0, np.float32),
      repetition=col((p.repetition_penalty for p in params), 1.0, np.float32),
      adj_ids=np.full((B, W), PAD_ID, np.int32), adj_count=np.zeros((B, W), np.float32),
      adj_penalized=np.zeros((B, W), bool), adj_bias=np.zeros((B, W), np.float32),
      allowed=allowed)
  for i, a in enumerate(adjust):
    if a is not None:
      k = len(a[0])
      sb.adj_ids[i, :k], sb.adj_count[i, :k], sb.adj_penalized[i, :k], sb.adj_bias[i, :k] = a
  return sb


# ------------------------------------------------------------------------------ device side

@dataclasses.dataclass(frozen=True)
class Sampled:
  """What a step returns per row: ``tokens [B]`` int32, ``logprob [B]`` float32 (the sampled
  token's; zeros when the step computed none), ``top_ids`` / ``top_logprobs`` ``[B, K]``
  (``K = MAX_TOP_LOGPROBS`` when any row asked, else 0), most likely first."""

  tokens: jax.Array
  logprob: jax.Array
  top_ids: jax.Array
  top_logprobs: jax.Array


jax.tree_util.register_dataclass(Sampled, data_fields=["tokens", "logprob", "top_ids",
                                                       "top_logprobs"], meta_fields=[])


def grammar_masked(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """Step 0: tokens a row's grammar forbids -> -inf (``allowed [B, M]`` bit words; the identity
  when ``M == 0``)."""
  if allowed.shape[1] == 0:
    return logits
  v = jnp.arange(logits.shape[1])
  bits = (allowed[:, v // 32] >> (v % 32).astype(jnp.int32)) & 1
  return jnp.where(bits != 0, logits, -jnp.inf)


def adjusted_logits(logits: jax.Array, s: SamplingBatch) -> jax.Array:
  """Steps 1-3 of the module docstring (bias, repetition, frequency and presence) on
  ``logits [B, V]`` float32; the identity when the batch lists no adjustments (``W == 0``)."""
  B, V = logits.shape
  if s.adj_ids.shape[1] == 0:
    return logits
  rows = jnp.arange(B)[:, None]
  dense = lambda vals, dt: jnp.zeros((B, V), dt).at[rows, s.adj_ids].set(  # noqa: E731
      vals, mode="drop")
  x = logits + dense(s.adj_bias, jnp.float32)
  r = s.repetition[:, None]
  x = jnp.where(dense(s.adj_penalized, jnp.bool_), jnp.where(x > 0, x / r, x * r), x)
  count = dense(s.adj_count, jnp.float32)
  return x - s.frequency[:, None] * count - s.presence[:, None] * (count > 0)


def _truncate(x: jax.Array, s: SamplingBatch) -> jax.Array:
  """Step 5: min-p, top-k, top-p on tempered logits ``x [B, V]`` (dropped tokens -> -inf)."""
  V = x.shape[-1]
  p = jax.nn.softmax(x, axis=-1)
  x = jnp.where(p >= s.min_p[:, None] * jnp.max(p, axis=-1, keepdims=True), x, -jnp.inf)
  sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
  # top-k: keep values >= the k-th largest.
  k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)
  kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)
  x = jnp.where(x >= kth, x, -jnp.inf)
  # top-p over the (filtered) distribution: smallest prefix with mass >= p.
  sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_x, axis=-1)
  cum = jnp.cumsum(probs, axis=-1)
  cutoff_idx = jnp.sum(cum - probs < s.top_p[:, None], axis=-1) - 1
  cutoff = jnp.take_along_axis(sorted_x, jnp.maximum(cutoff_idx, 0)[:, None], axis=-1)
  return jnp.where(x >= cutoff, x, -jnp.inf)


def sample_rows(logits: jax.Array, s: SamplingBatch, *, num_top: int = 0,
                with_logprobs: bool = False) -> Sampled:
  """Next tokens of ``logits [B, V]`` (float32) under the per-row parameters ``s``.

  ``with_logprobs`` (static): compute the sampled token's logprob and the ``num_top`` (static)
  most likely tokens'; otherwise those outputs are zeros / empty. Steps where every row is
  greedy skip the sorts (``lax.cond``)."""
  x = adjusted_logits(grammar_masked(logits, s.allowed), s)
  greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
  sampling = s.temperature > 0
  t = jnp.where(sampling, s.temperature, 1.0)[:, None]
  tempered = x / t

  def draw(_):
    kept = _truncate(tempered, s)
    keys = jax.vmap(lambda sd, c: jax.random.fold_in(jax.random.key(sd), c))(s.seed, s.counter)
    drawn = jax.vmap(jax.random.categorical)(keys, kept).astype(jnp.int32)
    return jnp.where(sampling, drawn, greedy)

  tokens = jax.lax.cond(jnp.any(sampling), draw, lambda _: greedy, None)
  B = logits.shape[0]
  if not with_logprobs:
    return Sampled(tokens, jnp.zeros((B,), jnp.float32), jnp.zeros((B, 0), jnp.int32),
                   jnp.zeros((B, 0), jnp.float32))
  lp = jax.nn.log_softmax(tempered, axis=-1)
  chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
  top_lp, top_ids = jax.lax.top_k(lp, num_top)
  return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_lp)


#: :func:`sample_rows` jitted: one program per (batch bucket, ``W``, ``M``, logprobs), dispatched
#: right after the model step on its logits (no host sync between them). A separate program
#: rather than part of every step program: fused, it added ~60% to each step program's compile
#: time (84 tiny-model programs: 123 s vs 77 s), and there are many more step buckets than
#: batch buckets.
sample_step = jax.jit(sample_rows, static_argnames=("num_top", "with_logprobs"))


@jax.jit
def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seeds: jax.Array, counters: jax.Array) -> jax.Array:
  """Next tokens ``[B]`` int32 from ``logits [B, V]`` with temperature / top-k / top-p only
  (:func:`sample_rows` with the other parameters off)."""
  B = logits.shape[0]
  z = jnp.zeros((B,), jnp.float32)
  s = SamplingBatch(temperature, top_k, top_p, z, seeds, counters, z, z, z + 1,
                    jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32),
                    jnp.zeros((B, 0), jnp.bool_), jnp.zeros((B, 0), jnp.float32),
                    jnp.zeros((B, 0), jnp.int32))
  return sample_rows(logits, s).tokens


# ------------------------------------------------------------------------------ numpy oracle

def sample_reference(logits: np.ndarray, sp: SamplingParams, context: Sequence[int],
                     num_output: int) -> tuple[np.ndarray, np.ndarray]:
  """The exact distribution a row is drawn from and its logprobs, in float64 numpy, from the
  module docstring's definition alone: ``(probs [V], logprobs [V])`` (greedy: one-hot)."""
  x = np.asarray(logits, np.float64).copy()
  ctx = list(context)
  out = ctx[len(ctx) - num_output:] if num_output else []
  for t, b in sp.logit_bias:
    x[t] += b
  if sp.repetition_penalty != 1:
    for t in set(ctx):
      x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
  for t in set(out):
    c = out.count(t)
    x[t] -= sp.frequency_penalty * c + sp.presence_penalty * (c > 0)
  temp = sp.temperature if sp.temperature > 0 else 1.0
  y = x / temp
  logprobs = y - (np.log(np.exp(y - y.max()).sum()) + y.max())
  if sp.temperature == 0:
    probs = np.zeros_like(x)
    probs[int(np.argmax(x))] = 1.0
    return probs, logprobs
  p = np.exp(logprobs)
  keep = p >= sp.min_p * p.max()
  order = np.argsort(-np.where(keep, y, -np.inf), kind="stable")
  if sp.top_k > 0:
    keep[order[sp.top_k:]] = False
  q = np.where(keep, p, 0.0)
  q /= q.sum()
  cum, final = 0.0, np.zeros_like(keep)
  for i in np.argsort(-q, kind="stable"):
    if not keep[i] or cum >= sp.top_p:
      break
    final[i] = True
    cum += q[i]
  probs = np.where(final, q, 0.0)
  return probs / probs.sum(), logprobs
