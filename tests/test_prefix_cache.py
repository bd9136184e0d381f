"""Direct unit tests of the host-side bookkeeping: the page allocator and the prefix cache.

The oracle is hand-worked expectations on tiny trees (page size 4), not the engine.
"""

import pytest

from icarus_jax.errors import IcarusError
from icarus_jax.serving.page_allocator import NULL_PAGE, PageAllocator
from icarus_jax.serving.prefix_cache import PrefixCache

PS = 4


def make(num_pages=16):
  alloc = PageAllocator(num_pages)
  return alloc, PrefixCache(PS, alloc)


def own(alloc, cache, ns, tokens):
  """A sequence computes ``tokens`` on fresh pages, caches them and finishes (drops its refs)."""
  pages = alloc.allocate(-(-len(tokens) // PS))
  cache.insert(ns, tokens, pages, include_partial=True)
  zero = alloc.decref(pages)
  alloc.free([p for p in zero if not cache.is_cached(p)])
  return pages


# ------------------------------------------------------------------- allocator

def test_allocator_hands_out_pages_never_the_null_page_and_refuses_misuse():
  alloc = PageAllocator(5)
  assert alloc.capacity == 4 and alloc.num_free == 4
  pages = alloc.allocate(4)
  assert sorted(pages) == [1, 2, 3, 4] and NULL_PAGE not in pages
  with pytest.raises(IcarusError, match="out of KV pages: asked for 1, 0 free"):
    alloc.allocate(1)
  alloc.incref([pages[0]])
  assert alloc.decref([pages[0]]) == []          # 2 -> 1: not zero yet
  assert alloc.decref([pages[0]]) == [pages[0]]  # 1 -> 0
  alloc.free([pages[0]])
  with pytest.raises(AssertionError, match="cannot free page"):
    alloc.free([pages[0]])                        # double free
  with pytest.raises(AssertionError, match="went negative"):
    alloc.decref([pages[0]])
  with pytest.raises(AssertionError, match="cannot free page"):
    alloc.free([pages[1]])                        # still referenced
  with pytest.raises(AssertionError, match="incref of free/null page"):
    alloc.incref([NULL_PAGE])
  with pytest.raises(IcarusError, match="num_pages must be >= 2"):
    PageAllocator(1)


# ------------------------------------------------------------------- match / insert

def test_match_full_pages_then_a_partial_page():
  alloc, cache = make()
  assert cache.num_unreferenced() == 0 and cache.num_evictable() == 0 and cache.evict(0) == 0
  toks = list(range(10))                          # pages: [0..3] [4..7] [8, 9]
  pages = own(alloc, cache, "ns", toks)
  m = cache.match("ns", toks)
  assert m.pages == pages[:2] and m.partial_page == pages[2] and m.partial_tokens == 2
  assert m.num_tokens(PS) == 10
  m = cache.match("ns", toks[:6] + [99, 98])      # diverges inside page 2
  assert m.pages == pages[:1] and m.partial_page == pages[1] and m.partial_tokens == 2
  m = cache.match("ns", toks, max_tokens=7)       # a limit cuts the match
  assert m.num_tokens(PS) == 7 and m.pages == pages[:1] and m.partial_tokens == 3
  assert cache.match("other", toks).num_tokens(PS) == 0  # namespaces never share
  assert cache.match("ns", [5, 5, 5]).num_tokens(PS) == 0


def test_insert_without_partial_keeps_the_last_page_private():
  alloc, cache = make()
  pages = alloc.allocate(3)
  assert cache.insert("ns", list(range(10)), pages, include_partial=False) == 2
  assert cache.is_cached(pages[0]) and cache.is_cached(pages[1]) and not cache.is_cached(pages[2])


def test_insert_stops_where_another_page_already_caches_the_tokens():
  alloc, cache = make()
  first = own(alloc, cache, "ns", list(range(8)))
  other = alloc.allocate(2)  # computed concurrently, same tokens
  assert cache.insert("ns", list(range(8)), other, include_partial=True) == 0
  assert not cache.is_cached(other[0]) and cache.match("ns", list(range(8))).pages == first


# ------------------------------------------------------------------- eviction

def test_eviction_is_lru_and_leaves_first():
  alloc, cache = make()
  a = own(alloc, cache, "ns", [1, 1, 1, 1, 2, 2, 2, 2])   # chain a0 -> a1
  b = own(alloc, cache, "ns", [3, 3, 3, 3])               # single node, newer
  cache.match("ns", [1, 1, 1, 1, 2, 2, 2, 2])             # touch a: b is now least recent
  assert cache.evict(1) == 1
  assert not cache.is_cached(b[0]) and cache.is_cached(a[0]) and cache.is_cached(a[1])
  assert cache.evict(1) == 1                              # a's leaf before its parent
  assert cache.is_cached(a[0]) and not cache.is_cached(a[1])
  assert cache.evict(5) == 1 and cache.num_cached_pages == 0
  assert alloc.num_free == alloc.capacity


def test_referenced_pages_and_their_ancestors_are_never_evicted():
  alloc, cache = make()
  a = own(alloc, cache, "ns", list(range(12)))            # a0 -> a1 -> a2
  alloc.incref([a[0], a[1]])                              # a running sequence holds a0, a1
  assert cache.num_unreferenced() == 1 and cache.num_evictable() == 1
  assert cache.evict(3) == 1                              # only the leaf a2
  assert cache.is_cached(a[0]) and cache.is_cached(a[1])
  alloc.decref([a[0], a[1]])
  assert cache.flush() == 2


def test_tenants_under_eviction_pressure_keep_separate_trees():
  alloc, cache = make(num_pages=7)
  t1 = own(alloc, cache, ("fp", "t1"), list(range(8)))
  t2 = own(alloc, cache, ("fp", "t2"), list(range(8)))    # same tokens, other tenant
  assert set(t1).isdisjoint(t2)
  cache.match(("fp", "t2"), list(range(8)))               # t2 recently used
  cache.evict(2)                                          # pressure: t1's chain goes
  assert cache.match(("fp", "t1"), list(range(8))).num_tokens(PS) == 0
  assert cache.match(("fp", "t2"), list(range(8))).pages == t2


def test_drop_namespace_frees_only_that_namespace_and_keeps_held_pages():
  alloc, cache = make()
  a = own(alloc, cache, "a", list(range(8)))
  b = own(alloc, cache, "b", list(range(8)))
  alloc.incref([a[0]])                                    # still read by a running sequence
  assert cache.drop_namespace("a") == 1                   # a[1] freed, a[0] kept
  assert cache.is_cached(a[0]) and not cache.is_cached(a[1]) and alloc.is_free(a[1])
  assert cache.match("a", list(range(8))).pages == [a[0]]  # the held page stays reachable
  assert cache.match("b", list(range(8))).pages == b
  assert cache.drop_namespace("missing") == 0


def _full_scan_eviction(cache, alloc, n):
  """Oracle: the pages LRU eviction frees, found by scanning every cached node each time (what
  ``evict`` did before it kept a leaf set)."""
  nodes = {nd.page: (nd.last_access, id(nd), nd.parent.page if nd.parent.parent else None)
           for nd in cache.page_to_node.values()}
  children = {}
  for p, (_, _, parent) in nodes.items():
    if parent is not None:
      children[parent] = children.get(parent, 0) + 1
  freed = []
  while len(freed) < n:
    cand = [(la, i, p) for p, (la, i, _) in nodes.items()
            if not children.get(p) and alloc.refcount[p] == 0]
    if not cand:
      break
    _, _, p = min(cand)
    parent = nodes.pop(p)[2]
    if parent is not None:
      children[parent] -= 1
    freed.append(p)
  return freed


def test_random_operations_keep_the_leaf_set_and_evict_like_a_full_scan():
  """Random inserts, matches, holds, releases, evictions and namespace drops on a tight pool:
  after every operation the incremental leaf set and cached-page mask match a tree walk, the
  unreferenced count matches the walk's evictable count, and every eviction frees exactly the
  pages a full LRU scan picks."""
  import random
  rng = random.Random(0)
  alloc, cache = make(num_pages=40)
  held = []                                    # pages a pretend running sequence references
  for _ in range(1500):
    op = rng.random()
    ns = rng.choice(["a", "b"])
    toks = [rng.randrange(3) for _ in range(rng.randrange(1, 17))]
    if op < 0.35:
      need = -(-len(toks) // PS)
      if need > alloc.num_free:
        want = need - alloc.num_free
        expect = _full_scan_eviction(cache, alloc, want)
        assert cache.evict(want) == len(expect)
        assert all(not cache.is_cached(p) and alloc.is_free(p) for p in expect)
      if need <= alloc.num_free:
        pages = own(alloc, cache, ns, toks)
        assert all(alloc.is_free(p) or cache.is_cached(p) for p in pages)
    elif op < 0.55:
      m = cache.match(ns, toks)
      if m.pages and rng.random() < 0.5:
        alloc.incref(m.pages)
        held.append(m.pages)
    elif op < 0.75 and held:
      alloc.decref(held.pop(rng.randrange(len(held))))
    elif op < 0.9:
      k = rng.randrange(1, 6)
      expect = _full_scan_eviction(cache, alloc, k)
      assert cache.evict(k) == len(expect)
      assert all(not cache.is_cached(p) for p in expect)
    elif op < 0.93:
      cache.drop_namespace(ns)
    cache.check_invariants()
    assert cache.num_unreferenced() == cache.num_evictable()


def _tree(cache):
  """Every cached path as (namespace, tokens..., page) tuples: a hashable picture of the trees."""
  out = set()

  def walk(nd, path):
    for c in nd.children.values():
      out.add((nd.namespace,) + path + c.tokens + (c.page,))
      walk(c, path + c.tokens)

  for r in cache.roots.values():
    walk(r, ())
  return out


def test_insert_cursor_resumes_where_it_stopped_and_ignores_a_stale_cursor():
  from icarus_jax.serving.prefix_cache import InsertCursor
  alloc_a, a = make(32)
  alloc_b, b = make(32)
  tokens = list(range(100, 126))  # 6 full pages + 2 tokens
  pages_a = alloc_a.allocate(7)
  pages_b = alloc_b.allocate(7)
  assert pages_a == pages_b
  cur = InsertCursor()
  for n in (5, 9, 9, 16, 23, 26):  # the sequence grows; each insert records its full pages
    a.insert("ns", tokens[:n], pages_a, include_partial=False, cursor=cur)
    b.insert("ns", tokens[:n], pages_b, include_partial=False)
    assert _tree(a) == _tree(b)
    assert cur.pages == n // PS and a.page_to_node[pages_a[cur.pages - 1]] is cur.node
  a.check_invariants()
  # Preempted: its pages are dropped and evicted; the cursor now points at a removed node.
  alloc_a.decref(pages_a)
  assert a.evict(100) == 6
  assert cur.node.page not in a.page_to_node
  pages2 = alloc_a.allocate(7)
  added = a.insert("ns", tokens, pages2, include_partial=True, cursor=cur)
  assert added == 7  # walked from the root, not from the stale node
  assert {n.page for n in a.page_to_node.values()} == set(pages2)
  a.check_invariants()
  # A cursor from another namespace is ignored too.
  other = InsertCursor(a.page_to_node[pages2[0]], 1)
  assert a.insert("other", tokens[:8], alloc_a.allocate(2), include_partial=False,
                  cursor=other) == 2
  assert len(a.roots["other"].children) == 1
