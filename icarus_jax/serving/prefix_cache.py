"""Prefix cache: a page-granular radix tree over token ids, mapping prefixes to KV pages.

Each node is one page: its ``tokens`` (1..page_size of them; fewer only in a leaf, for the
last, partially filled page of a finished sequence) and the pool page holding their K/V.
Trees are kept per *namespace*: ``(base fingerprint, tenant salt)`` in ICaRus mode, plus the
adapter name in isolated mode. The adapter is never part of an ICaRus key: that is the point.

Matching walks full pages exactly; at the end it may match a prefix of one more node's tokens
(partial hit), which the engine copies into a fresh page before writing (copy-on-write), so
cached pages are never written. Nodes whose page no running sequence uses are evictable, leaves
first, least recently used first.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import Hashable

import numpy as np

from icarus_jax.serving.page_allocator import PageAllocator


@dataclasses.dataclass(eq=False)
class Node:
  tokens: tuple[int, ...]
  page: int
  parent: "Node | None"
  namespace: Hashable
  children: dict[tuple[int, ...], "Node"] = dataclasses.field(default_factory=dict)
  last_access: int = 0


@dataclasses.dataclass
class Match:
  """Result of a lookup: full cached ``pages`` (shared read-only), then optionally a partial
  page ``partial_page`` whose first ``partial_tokens`` tokens match (to be copied)."""

  pages: list[int]
  nodes: list[Node]
  partial_page: int | None = None
  partial_tokens: int = 0
  partial_node: Node | None = None

  def num_tokens(self, page_size: int) -> int:
    return len(self.pages) * page_size + self.partial_tokens


@dataclasses.dataclass
class InsertCursor:
  """Where a sequence's last ``insert`` stopped: the first ``pages`` entries of its page table
  are in the tree, the last of them at ``node``. A later ``insert`` of the same (grown) token
  list resumes there instead of walking the whole context again. Checked before use: a cursor
  whose page is no longer cached at ``node`` (the sequence was preempted, the page evicted)
  is ignored."""

  node: Node | None = None
  pages: int = 0


class PrefixCache:

  def __init__(self, page_size: int, allocator: PageAllocator):
    self.page_size = page_size
    self.alloc = allocator
    self.roots: dict[Hashable, Node] = {}
    self.page_to_node: dict[int, Node] = {}
    # Kept in step with the tree so that eviction and its accounting never scan every cached
    # page: the childless nodes (eviction candidates) and a cached-page mask over the pool.
    self._leaves: set[Node] = set()
    self._cached = np.zeros(allocator.num_pages, bool)
    self._clock = itertools.count(1)
    self.evicted_pages = 0

  def _root(self, ns: Hashable) -> Node:
    r = self.roots.get(ns)
    if r is None:
      r = self.roots[ns] = Node((), -1, None, ns)
    return r

  @property
  def num_cached_pages(self) -> int:
    return len(self.page_to_node)

  # --------------------------------------------------------------------------------------
  def match(self, ns: Hashable, tokens, max_tokens: int | None = None) -> Match:
    """Longest cached prefix of ``tokens`` (at most ``max_tokens`` of them)."""
    ps = self.page_size
    limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
    node = self.roots.get(ns)
    m = Match([], [])
    if node is None or limit <= 0:
      return m
    now = next(self._clock)
    i = 0
    while i + ps <= limit:
      child = node.children.get(tuple(tokens[i:i + ps]))
      if child is None or len(child.tokens) != ps:
        break
      child.last_access = now
      m.pages.append(child.page)
      m.nodes.append(child)
      node = child
      i += ps
    rest = tuple(tokens[i:limit])
    if rest:
      best, best_n = None, 0
      for key, child in node.children.items():
        n = 0
        for a, b in zip(key, rest):
          if a != b:
            break
          n += 1
        if n > best_n:
          best, best_n = child, n
      if best is not None:
        best.last_access = now
        m.partial_page, m.partial_tokens, m.partial_node = best.page, best_n, best
    return m

  def insert(self, ns: Hashable, tokens, pages: list[int], *, include_partial: bool,
             cursor: InsertCursor | None = None) -> int:
    """Records that ``pages`` hold the K/V of ``tokens`` (page j holds tokens[j*ps:(j+1)*ps]).

    Full pages always; the trailing partial page only with ``include_partial`` (its owner will
    not write it again). Pages already cached under the same tokens are left as they are.
    ``cursor`` (owned by one sequence, whose ``tokens`` only grow) skips the pages a previous
    call already recorded and is advanced; the skipped nodes keep their access time, which
    only matters once they are unreferenced, and the owner's final insert (without a cursor,
    when it releases its pages) refreshes them.
    Returns the number of newly cached pages.
    """
    ps = self.page_size
    node = self._root(ns)
    start = 0
    if (cursor is not None and 0 < cursor.pages <= len(pages) and cursor.node is not None
        and cursor.node.namespace == ns
        and self.page_to_node.get(pages[cursor.pages - 1]) is cursor.node):
      node, start = cursor.node, cursor.pages
    now = next(self._clock)
    added = 0
    for j in range(start, len(pages)):
      page = pages[j]
      chunk = tuple(tokens[j * ps:(j + 1) * ps])
      if not chunk:
        break
      if len(chunk) < ps and not include_partial:
        break
      child = node.children.get(chunk)
      if child is None:
        if page in self.page_to_node:  # page already cached elsewhere (cannot happen for owners)
          break
        child = Node(chunk, page, node, ns, last_access=now)
        node.children[chunk] = child
        self.page_to_node[page] = child
        self._cached[page] = True
        self._leaves.add(child)
        self._leaves.discard(node)
        added += 1
      else:
        child.last_access = now
        if child.page != page:
          # Another sequence cached these tokens first (computed concurrently). Stop here: a
          # node's ancestors must be pages its referencing sequences also hold, so that every
          # unreferenced cached page is evictable (``num_unreferenced`` is then exact).
          break
      if len(chunk) < ps:
        break
      node = child
      if cursor is not None:
        cursor.node, cursor.pages = child, j + 1
    return added

  def is_cached(self, page: int) -> bool:
    return page in self.page_to_node

  # --------------------------------------------------------------------------------------
  def num_unreferenced(self) -> int:
    """Cached pages no running sequence references: exactly what eviction can free, because
    ``insert`` never hangs a sequence's page below a node that sequence does not hold."""
    return int(np.count_nonzero(self._cached & (self.alloc.refcount == 0)))

  def num_evictable(self) -> int:
    """Cached pages that eviction can free now: nodes whose whole subtree is unreferenced."""
    total = 0

    def walk(nd: Node) -> bool:  # returns: subtree fully unreferenced
      nonlocal total
      ok = True
      for c in nd.children.values():
        ok &= walk(c)
      if nd.parent is None:
        return ok
      if ok and self.alloc.refcount[nd.page] == 0:
        total += 1
        return True
      return False

    for r in self.roots.values():
      walk(r)
    return total

  def check_invariants(self) -> None:
    """Asserts the leaf set and the cached-page mask agree with a walk of the trees."""
    nodes = []

    def walk(nd: Node) -> None:
      for c in nd.children.values():
        assert c.parent is nd, "child with a foreign parent"
        nodes.append(c)
        walk(c)

    for r in self.roots.values():
      walk(r)
    assert {id(n) for n in nodes} == {id(n) for n in self.page_to_node.values()}, \
        "page_to_node differs from the trees"
    assert self._leaves == {n for n in nodes if not n.children}, "leaf set out of date"
    mask = np.zeros_like(self._cached)
    mask[[n.page for n in nodes]] = True
    assert (mask == self._cached).all(), "cached-page mask out of date"

  def evict(self, n: int) -> int:
    """Frees up to ``n`` unreferenced cached pages, LRU leaves first. Returns pages freed."""
    if n <= 0:
      return 0
    rc = self.alloc.refcount
    heap = [(nd.last_access, id(nd), nd) for nd in self._leaves if rc[nd.page] == 0]
    heapq.heapify(heap)
    freed = 0
    while heap and freed < n:
      _, _, nd = heapq.heappop(heap)
      parent = nd.parent
      self._remove(nd)
      self.alloc.free([nd.page])
      freed += 1
      if parent.parent is not None and not parent.children and rc[parent.page] == 0:
        heapq.heappush(heap, (parent.last_access, id(parent), parent))
    self.evicted_pages += freed
    return freed

  def _remove(self, nd: Node) -> None:
    parent = nd.parent
    del parent.children[nd.tokens]
    del self.page_to_node[nd.page]
    self._cached[nd.page] = False
    self._leaves.discard(nd)
    if not parent.children and parent.parent is not None:
      self._leaves.add(parent)

  def drop_namespace(self, ns: Hashable) -> int:
    """Forgets every unreferenced page cached under ``ns`` (e.g. an unloaded adapter's K/V in
    isolated mode), deepest first; pages some sequence still holds stay. Returns pages freed."""
    root = self.roots.get(ns)
    if root is None:
      return 0
    rc = self.alloc.refcount
    freed = []

    def walk(nd: Node) -> None:
      for c in list(nd.children.values()):
        walk(c)
      if nd.parent is not None and not nd.children and rc[nd.page] == 0:
        self._remove(nd)
        freed.append(nd.page)

    walk(root)
    self.alloc.free(freed)
    if not root.children:
      del self.roots[ns]
    return len(freed)

  def flush(self) -> int:
    """Evicts every unreferenced cached page; returns how many."""
    return self.evict(len(self.page_to_node))
