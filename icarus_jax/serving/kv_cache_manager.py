"""The KV pages of one pool, as the scheduler sees them: reserve, extend, cache, release.

:class:`KVCacheManager` owns the page allocator (``page_allocator.PageAllocator``: free list and
refcounts), the prefix cache (``prefix_cache.PrefixCache``: a radix tree per namespace) and the
contexts retained for workflow sessions. The scheduler (``scheduler.Scheduler``) never touches a
refcount: it asks

* :meth:`reserve` for a sequence's pages: the longest cached prefix in its namespace (shared,
  refcounted), a copy-on-write of a partially matched page, private pages for the rest, while
  keeping a watermark free for the running requests' next tokens;
* :meth:`extend` for one more page (a decode crossing a page boundary);
* :meth:`cache_computed` to make the full pages computed so far shareable (chunked prefill);
* :meth:`release` to hand a finished or preempted sequence's pages to the cache, optionally
  keeping them for its session until a deadline (:meth:`expire` drops late ones);
* :meth:`check_invariants` with the page tables it holds.

Invariants (checked by :meth:`check_invariants`, after every step in the tests): each page's
refcount equals the number of page tables and retained contexts holding it; no page is both
free and held or cached; free + held-or-cached = capacity; every unreferenced cached page is
evictable (no referenced page below it in the tree).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np

from icarus_jax.serving.page_allocator import PageAllocator
from icarus_jax.serving.prefix_cache import InsertCursor, PrefixCache


@dataclasses.dataclass
class RetentionStats:
  """Counters of session retention (the engine passes its ``EngineStats``, which has them)."""

  retained_contexts: int = 0    # contexts retained for a session
  retention_hits: int = 0       # reservations that took over their session's retained context
  retention_expired: int = 0    # released by their deadline
  retention_reclaimed: int = 0  # released early because memory ran out


@dataclasses.dataclass(frozen=True)
class Reservation:
  """A sequence's pages after :meth:`KVCacheManager.reserve`.

  page_table: shared cached pages, then private ones; cached_tokens: tokens whose K/V is
  already there; cursor: where a later cache insert continues; copy: ``(src, dst)`` pages the
  runner must copy before the first step (copy-on-write of a partially matched page), or None.
  """

  page_table: list[int]
  cached_tokens: int
  cursor: InsertCursor
  copy: tuple[int, int] | None


class KVCacheManager:
  """``num_pages`` pages of ``page_size`` tokens (page 0 is the null page); ``clock`` gives the
  time retention deadlines are compared with; ``stats``: where the retention counters go (any
  object with :class:`RetentionStats`' fields)."""

  def __init__(self, num_pages: int, page_size: int, clock: Callable[[], float], stats=None):
    self.page_size = page_size
    self.alloc = PageAllocator(num_pages)
    self.cache = PrefixCache(page_size, self.alloc)
    self.clock = clock
    # session -> (pages held for it, expiry time), insertion order = oldest first
    self._retained: dict[Hashable, tuple[list[int], float]] = {}
    self.stats = stats if stats is not None else RetentionStats()

  # ------------------------------------------------------------------ gauges
  @property
  def capacity(self) -> int:
    return self.alloc.capacity

  @property
  def num_free(self) -> int:
    return self.alloc.num_free

  def pages_used(self) -> int:
    return self.alloc.capacity - self.alloc.num_free

  @property
  def retained_sessions(self) -> list:
    """Sessions whose context is currently retained (oldest first)."""
    return list(self._retained)

  # ------------------------------------------------------------------ memory
  def ensure_free(self, n: int, *, may_reclaim: bool = False) -> bool:
    """Makes ``n`` pages free by evicting unreferenced cached pages (LRU); with
    ``may_reclaim``, releases retained session contexts (oldest first) when that is not enough."""
    short = n - self.alloc.num_free
    if short > 0 and may_reclaim:
      while self._retained and self.cache.num_unreferenced() < short:
        self._release_retained(next(iter(self._retained)))
        self.stats.retention_reclaimed += 1
    if short > 0:
      if self.cache.num_unreferenced() < short:
        return False
      # Evict a small batch at once (a low watermark) so eviction cost is amortised.
      self.cache.evict(max(short, min(32, self.alloc.capacity // 64)))
    return self.alloc.num_free >= n

  def reserve(self, ns: Hashable, tokens: Sequence[int], limit: int, *,
              session: Hashable | None = None, watermark: int = 0,
              may_reclaim: bool = False) -> Reservation | None:
    """Pages for a sequence of ``tokens`` in namespace ``ns``, reusing the cached prefix of its
    first ``limit`` tokens; None (nothing held) when ``watermark`` more pages cannot stay free.
    A retained context of ``session`` is taken over (its pages become the sequence's)."""
    ps = self.page_size
    m = self.cache.match(ns, tokens, limit)
    shared = list(m.pages)
    need = math.ceil(len(tokens) / ps) - len(shared)
    # Hold what we matched so eviction cannot take it, then make room.
    self.alloc.incref(shared)
    if m.partial_page is not None:
      self.alloc.incref([m.partial_page])
    if session is not None and session in self._retained:
      self._release_retained(session)
      self.stats.retention_hits += 1
    if not self.ensure_free(need + watermark, may_reclaim=may_reclaim):
      self.alloc.decref(shared)
      if m.partial_page is not None:
        self.alloc.decref([m.partial_page])
      return None
    private = self.alloc.allocate(need)
    copy = None
    if m.partial_page is not None:
      copy = (m.partial_page, private[0])
    # the matched full pages are in the tree already: a later insert starts after them
    cursor = InsertCursor(m.nodes[-1] if m.nodes else None, len(m.nodes))
    return Reservation(shared + private, m.num_tokens(ps), cursor, copy)

  def copied(self, res: Reservation) -> None:
    """The runner copied ``res.copy``: the partially matched source page may go."""
    if res.copy is not None:
      self.alloc.decref([res.copy[0]])

  def extend(self, *, may_reclaim: bool = True) -> int | None:
    """One more private page, or None when none can be freed (the caller preempts)."""
    if not self.ensure_free(1, may_reclaim=may_reclaim):
      return None
    return self.alloc.allocate(1)[0]

  def cache_computed(self, ns: Hashable, tokens: Sequence[int], page_table: Sequence[int],
                     cursor: InsertCursor) -> None:
    """Makes the full pages of ``tokens`` (all computed) shareable now."""
    self.cache.insert(ns, tokens, page_table, include_partial=False, cursor=cursor)

  def release(self, ns: Hashable, computed: Sequence[int], page_table: Sequence[int], *,
              retain_for: tuple[Hashable, float] | None = None) -> int:
    """Gives a sequence's computed pages to the cache and drops its references. ``retain_for``
    ``(session, seconds)``: the session keeps the cached ones until then. Returns the number of
    pages retained."""
    if not page_table:
      return 0
    # No cursor: the whole path is walked so that every node's access time is refreshed.
    self.cache.insert(ns, computed, page_table, include_partial=True)
    kept = 0
    if retain_for is not None:
      kept = self._retain(ns, computed, *retain_for)
    zero = self.alloc.decref(page_table)
    self.alloc.free([p for p in zero if not self.cache.is_cached(p)])
    return kept

  def _retain(self, ns: Hashable, computed: Sequence[int], session: Hashable,
              seconds: float) -> int:
    if session in self._retained:
      self._release_retained(session)
    m = self.cache.match(ns, computed)
    pages = list(m.pages) + ([m.partial_page] if m.partial_page is not None else [])
    if pages:
      self.alloc.incref(pages)
      self._retained[session] = (pages, self.clock() + seconds)
      self.stats.retained_contexts += 1
    return len(pages)

  def _release_retained(self, session: Hashable) -> None:
    pages, _ = self._retained.pop(session)
    zero = self.alloc.decref(pages)
    self.alloc.free([p for p in zero if not self.cache.is_cached(p)])

  def expire(self) -> None:
    """Releases the retained contexts whose deadline has passed."""
    now = self.clock()
    for session in [k for k, (_, exp) in self._retained.items() if exp <= now]:
      self._release_retained(session)
      self.stats.retention_expired += 1

  def drop_namespaces(self, keep: Callable[[Hashable], bool]) -> None:
    """Drops every cached page of the namespaces ``keep`` rejects (e.g. an unloaded adapter's
    isolated cache)."""
    for ns in [ns for ns in self.cache.roots if not keep(ns)]:
      self.cache.drop_namespace(ns)

  def flush(self) -> int:
    """Evicts every unreferenced cached page; returns how many were freed."""
    return self.cache.flush()

  # ------------------------------------------------------------------ checks
  def check_invariants(self, page_tables: Iterable[Sequence[int]]) -> None:
    """Asserts the bookkeeping against the page tables the scheduler holds (module docstring)."""
    held = np.zeros(self.alloc.num_pages, np.int64)
    for table in page_tables:
      for p in table:
        held[p] += 1
    for pages, _ in self._retained.values():
      for p in pages:
        held[p] += 1
    bad = np.nonzero(held != self.alloc.refcount)[0]
    assert bad.size == 0, (f"refcount mismatch on pages {bad[:10].tolist()}: refcount "
                           f"{self.alloc.refcount[bad[:10]].tolist()} vs held "
                           f"{held[bad[:10]].tolist()}")
    used = (held > 0) | np.isin(np.arange(self.alloc.num_pages), list(self.cache.page_to_node))
    for p in np.nonzero(used)[0]:
      assert not self.alloc.is_free(int(p)), f"page {p} is free but in use"
    assert self.alloc.num_free + int(used[1:].sum()) == self.alloc.capacity
    self.cache.check_invariants()
    assert self.cache.num_unreferenced() == self.cache.num_evictable(), \
        "an unreferenced cached page sits above a referenced one (not evictable)"
