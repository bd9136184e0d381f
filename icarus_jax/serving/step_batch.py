"""One serving step's inputs as a pytree: what the scheduler hands a runner.

The scheduler picks rows (a sequence, its new tokens, where they start); :func:`build` turns
them into fixed-shape host arrays, bucketed to powers of two so the number of compiled programs
stays bounded. Runners read nothing else: the device runner puts the arrays on the mesh and
calls the jitted step; the roofline runner prices the step from the same arrays
(:meth:`StepBatch.row_costs`).

Fields (``B`` rows, ``T`` new tokens, ``N`` pages per row; padding rows are all-invalid with
page table 0, the null page):

  tokens, positions, valid ``[B, T]`` int32/int32/bool  the new tokens whose K/V the step writes
  page_table               ``[B, N]`` int32             pool page of each logical page
  slots                    ``[B]`` int32                adapter slot (0 = base)
  dec_token, dec_pos       ``[B]`` int32                ICaRus decoder row: last token, its position
  last_idx                 ``[B]`` int32                conventional step: index of the row's last new
                                                        token in ``tokens`` (logits taken there)
  sampling                 ``sampling.SamplingBatch``   the rows' sampling parameters (the step
                                                        samples on the device)

:class:`Step` wraps a batch with what only the host needs (how many rows are real, decode or
prefill); only the arrays enter the jitted program, so the compiled step depends on the bucket
``(B, T, N)`` alone, plus the sampling widths (``W`` adjustment slots, ``M`` grammar words:
0 unless a row uses penalties / ``logit_bias`` / a grammar) and whether a row wants logprobs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import numpy as np

from icarus_jax.serving import sampling as sampling_lib
from icarus_jax.serving.page_allocator import NULL_PAGE
from icarus_jax.serving.sampling import GREEDY, SamplingBatch, SamplingParams

ARRAY_FIELDS = ("tokens", "positions", "valid", "page_table", "slots", "dec_token", "dec_pos",
                "last_idx", "sampling")


@dataclasses.dataclass(frozen=True)
class StepRow:
  """One row as the scheduler chooses it."""

  tokens: Sequence[int]      # the sequence's tokens so far (prompt + output)
  start: int                 # position of the first new token
  num_new: int               # new tokens this step (0: a fully cached prompt, decoder row only)
  page_table: Sequence[int]  # pool pages, logical order
  slot: int                  # adapter slot
  sampling: SamplingParams = GREEDY
  counter: int = 0           # output tokens so far (the seeded draw's counter)
  request_id: int = 0
  adjust: tuple | None = None  # ``sampling.adjustments`` of the row (penalties, logit_bias)
  allowed: np.ndarray | None = None  # the row's grammar bitmask (``grammar.Matcher.mask``)


@dataclasses.dataclass(frozen=True)
class StepBatch:
  tokens: np.ndarray
  positions: np.ndarray
  valid: np.ndarray
  page_table: np.ndarray
  slots: np.ndarray
  dec_token: np.ndarray
  dec_pos: np.ndarray
  last_idx: np.ndarray
  sampling: SamplingBatch

  @property
  def shape(self) -> tuple[int, int, int]:
    """``(B, T, N)``: the bucket, i.e. which compiled program runs."""
    return self.tokens.shape + (self.page_table.shape[1],)


jax.tree_util.register_dataclass(StepBatch, data_fields=list(ARRAY_FIELDS), meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Step:
  """The scheduler's rows for one step, bucketed to ``shape = (B, T, N)``, plus host-only facts:
  ``num_rows`` real rows (the rest of ``B`` is padding) and ``decode``. The arrays
  (:attr:`batch`) are packed on first use, so a runner that only prices the step (the
  roofline) never pays for them."""

  rows: tuple[StepRow, ...]
  shape: tuple[int, int, int]
  decode: bool

  @property
  def num_rows(self) -> int:
    return len(self.rows)

  @functools.cached_property
  def batch(self) -> StepBatch:
    return _pack(self.rows, self.shape)

  @functools.cached_property
  def with_logprobs(self) -> bool:
    """Whether any row asked for logprobs (the step then computes them: a separate program)."""
    return any(r.sampling.logprobs is not None for r in self.rows)

  def row_costs(self) -> list[tuple[int, int, int]]:
    """``(context after the step, new tokens, slot)`` of each real row (the roofline's input)."""
    return [(r.start + r.num_new, r.num_new, r.slot) for r in self.rows]


def bucket(n: int, cap: int, lo: int = 1) -> int:
  """The power of two at least ``n`` (and ``lo``), capped at ``cap``."""
  b = max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
  return min(b, cap)


def buckets(cap: int, lo: int = 1) -> list[int]:
  """Every value :func:`bucket` can return for ``cap`` and ``lo``."""
  out, b = [], lo
  while b < cap:
    out.append(b)
    b *= 2
  return out + [cap]


def build(rows: Sequence[StepRow], *, decode: bool, max_batch: int, prefill_chunk: int,
          max_pages: int, min_pages: int = 1) -> Step:
  """Packs ``rows`` into bucketed arrays. Decode steps have ``T = 1``; prefill steps bucket the
  longest row's new tokens (at least 8, at most ``prefill_chunk``); the page table's width is
  the longest row's page count bucketed between ``min_pages`` and ``max_pages``."""
  if not rows or len(rows) > max_batch:
    raise ValueError(f"a step takes 1..{max_batch} rows, got {len(rows)}")
  n = len(rows)
  B = bucket(n, max_batch)
  T = 1 if decode else bucket(max(r.num_new for r in rows), prefill_chunk, lo=min(8, prefill_chunk))
  N = bucket(max(len(r.page_table) for r in rows), max_pages, lo=min_pages)
  for i, r in enumerate(rows):
    if r.num_new > T:
      raise ValueError(f"row {i} has {r.num_new} new tokens; this step takes at most {T}")
  return Step(tuple(rows), (B, T, N), decode)


def every_bucket(*, max_batch: int, prefill_chunk: int, page_size: int, max_pages: int,
                 min_pages: int = 1, lo_pages: int = 1, hi_pages: int | None = None
                 ) -> list[tuple[bool, int, int, int]]:
  """Every ``(decode, B, T, N)`` bucket the scheduler can produce with page buckets in
  ``[lo_pages, hi_pages]`` (bucketed), skipping token buckets no row of ``N`` pages fills."""
  lo_p = bucket(lo_pages, max_pages, lo=min_pages)
  hi_p = bucket(hi_pages or max_pages, max_pages)
  t_lo = min(8, prefill_chunk)
  out = []
  for B in buckets(max_batch):
    for N in buckets(max_pages):
      if not (lo_p <= N <= hi_p and N >= min_pages):
        continue
      for decode, T in [(True, 1)] + [(False, T) for T in buckets(prefill_chunk, lo=t_lo)]:
        new = min(T, N * page_size)
        if not decode and new <= T // 2 and T > t_lo:
          continue  # no row of this bucket fits N pages
        out.append((decode, B, T, N))
  return out


def num_buckets(*, max_batch: int, prefill_chunk: int, max_pages: int, min_pages: int = 1) -> int:
  """Upper bound on distinct step shapes (compiled programs) of an engine."""
  nb = len(buckets(max_batch))
  nt = len(buckets(prefill_chunk, lo=min(8, prefill_chunk)))
  nn = len([N for N in buckets(max_pages) if N >= min_pages])
  return nb * nn * (nt + 1)


def _pack(rows: Sequence[StepRow], shape: tuple[int, int, int]) -> StepBatch:
  B, T, N = shape
  tokens = np.zeros((B, T), np.int32)
  positions = np.zeros((B, T), np.int32)
  valid = np.zeros((B, T), bool)
  table = np.full((B, N), NULL_PAGE, np.int32)
  slots = np.zeros((B,), np.int32)
  dec_token = np.zeros((B,), np.int32)
  dec_pos = np.zeros((B,), np.int32)
  last_idx = np.zeros((B,), np.int32)
  for i, r in enumerate(rows):
    k, start = r.num_new, r.start
    tokens[i, :k] = r.tokens[start:start + k]
    positions[i, :k] = np.arange(start, start + k)
    valid[i, :k] = True
    table[i, :len(r.page_table)] = r.page_table
    slots[i] = r.slot
    last = start + k - 1 if k else start - 1  # position of the sequence's last token
    dec_pos[i] = last
    dec_token[i] = r.tokens[last]
    last_idx[i] = max(k - 1, 0)
    if k:
      positions[i, k:] = last  # padding tokens: harmless positions (they write nowhere)
  sb = sampling_lib.pack([r.sampling for r in rows], [r.counter for r in rows],
                         [r.adjust for r in rows], B, [r.allowed for r in rows])
  return StepBatch(tokens, positions, valid, table, slots, dec_token, dec_pos, last_idx, sb)
