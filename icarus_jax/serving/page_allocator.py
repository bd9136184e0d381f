"""Host-side bookkeeping of the paged KV pool: free list and reference counts.

Page 0 is reserved as the *null page*: it pads page tables (padding rows, unused logical pages)
and is never handed out; padding tokens write nowhere. A real page is only ever written by the
sequence that owns it.
A page's reference count is the number of running sequences whose page table holds it. A page
with count 0 is either free or held by the prefix cache (then it is evictable).
"""

from __future__ import annotations

import numpy as np

from icarus_jax.errors import IcarusError

NULL_PAGE = 0


class PageAllocator:

  def __init__(self, num_pages: int):
    if num_pages < 2:
      raise IcarusError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
    self.num_pages = num_pages
    self.refcount = np.zeros(num_pages, np.int32)
    self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
    self._is_free = np.ones(num_pages, bool)
    self._is_free[NULL_PAGE] = False

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def capacity(self) -> int:
    """Pages that can ever be allocated (all but the null page)."""
    return self.num_pages - 1

  def allocate(self, n: int) -> list[int]:
    """``n`` fresh pages with refcount 1. Raises if fewer are free (callers evict first)."""
    if n > len(self._free):
      raise IcarusError(f"out of KV pages: asked for {n}, {len(self._free)} free")
    pages = [self._free.pop() for _ in range(n)]
    for p in pages:
      self._is_free[p] = False
      self.refcount[p] = 1
    return pages

  def incref(self, pages) -> None:
    for p in pages:
      if self._is_free[p] or p == NULL_PAGE:
        raise AssertionError(f"incref of free/null page {p}")
      self.refcount[p] += 1

  def decref(self, pages) -> list[int]:
    """Drops one reference from each page; returns those that reached zero."""
    zero = []
    for p in pages:
      self.refcount[p] -= 1
      if self.refcount[p] < 0:
        raise AssertionError(f"refcount of page {p} went negative")
      if self.refcount[p] == 0:
        zero.append(p)
    return zero

  def free(self, pages) -> None:
    """Returns pages with refcount 0 to the free list."""
    for p in pages:
      if self.refcount[p] != 0 or self._is_free[p] or p == NULL_PAGE:
        raise AssertionError(f"cannot free page {p} (refcount {self.refcount[p]})")
      self._is_free[p] = True
      self._free.append(p)

  def is_free(self, p: int) -> bool:
    return bool(self._is_free[p])
