"""The serving engine: one paged KV pool, a prefix cache, many adapters, continuous batching.

    eng = Engine(config, base, mode="icarus", num_pages=512, page_size=16)
    eng.add_adapter(adapter)                      # gate + fingerprint checked
    rid = eng.submit(prompt_ids, adapter="math", sampling=SamplingParams(max_tokens=32))
    for out in eng.run():                         # or eng.step() in your own loop
      print(out.request_id, out.output_tokens)

``mode="icarus"``: every adapter decodes over the base's K/V (one cache for all; prefix cache
keyed by (base fingerprint, tenant) only). ``mode="isolated"``: the conventional multi-model
baseline in the same engine and pool: each adapter is a standard model with its own K/V and the
adapter is part of the prefix-cache key.

Scheduling (one ``step()``): admit waiting requests in FIFO order while pages and batch slots
allow (reusing cached prefixes, evicting LRU unreferenced pages when short); prefill the admitted
ones in chunks; run one decode step for every running request; when a decode needs a page and
none can be freed, preempt the newest running request (its computed pages go to the prefix
cache, it re-enters the queue and recomputes what was evicted). Shapes are bucketed to powers of
two (batch, new tokens, pages per row), so the number of compiled programs is bounded by
``num_buckets()``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import time
from typing import Callable, Hashable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from icarus_jax import engine_steps
from icarus_jax.adapter_pool import BASE_SLOT, AdapterPool
from icarus_jax.adapters import (DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS, Adapter,
                                 check_adapter)
from icarus_jax.config import ModelConfig
from icarus_jax.errors import IcarusError
from icarus_jax.page_allocator import NULL_PAGE, PageAllocator
from icarus_jax.params import Params, base_fingerprint
from icarus_jax.prefix_cache import PrefixCache
from icarus_jax.sampling import SamplingParams, sample

MODES = ("icarus", "isolated")
ATTENTION_FNS = {"reference": engine_steps.paged_attention_reference,
                 "pallas": engine_steps.paged_attention_pallas}
ATTENTION_BACKENDS = tuple(ATTENTION_FNS)


class UnknownAdapterError(IcarusError):
  """A request names an adapter that is not registered (HTTP 404 in the server)."""


class RequestTooLargeError(IcarusError):
  """A request can never fit: longer than the model's context or than the whole KV pool."""


@dataclasses.dataclass
class RequestOutput:
  """What a finished (or streaming) request produced, with its timing (``time.perf_counter``)."""

  request_id: int
  adapter: str | None
  prompt_tokens: list[int]
  output_tokens: list[int]
  finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
  num_cached_tokens: int = 0        # prompt tokens served from the prefix cache at first admission
  arrival_time: float = 0.0
  first_token_time: float | None = None
  token_times: list[float] = dataclasses.field(default_factory=list)
  finish_time: float | None = None
  error: str | None = None

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None


@dataclasses.dataclass(eq=False)
class _Seq:
  rid: int
  adapter: str | None
  slot: int
  ns: Hashable
  prompt: list[int]
  tokens: list[int]
  sampling: SamplingParams
  callback: Callable | None
  out: RequestOutput
  page_table: list[int] = dataclasses.field(default_factory=list)
  num_computed: int = 0
  admitted_once: bool = False
  order: int = 0

  @property
  def num_output(self) -> int:
    return len(self.tokens) - len(self.prompt)


@dataclasses.dataclass
class EngineStats:
  prompt_tokens: int = 0
  cached_prompt_tokens: int = 0
  prefill_tokens_computed: int = 0
  decode_tokens: int = 0
  preemptions: int = 0
  adapter_loads: int = 0        # host -> device slot writes
  adapter_evictions: int = 0    # device slots given to another adapter (LRU)
  isolated_faults: int = 0  # batches that raised and were re-run row by row
  peak_pages_used: int = 0
  steps: int = 0
  per_adapter: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(
      lambda: {"prompt_tokens": 0, "cached_tokens": 0, "prefill_tokens_computed": 0}))

  def hit_rate(self, adapter: str | None = "__all__") -> float:
    if adapter == "__all__":
      return self.cached_prompt_tokens / max(1, self.prompt_tokens)
    d = self.per_adapter[adapter]
    return d["cached_tokens"] / max(1, d["prompt_tokens"])


class _SimulatedPool:
  """Slot bookkeeping only (no arrays) for the simulated engine."""

  def __init__(self, capacity: int):
    self.capacity = capacity
    self.slots: dict[str, int] = {}
    self._free = list(range(capacity, 0, -1))

  @property
  def has_free_slot(self) -> bool:
    return bool(self._free)

  def check(self, name, adapter) -> None:
    del name, adapter

  def add(self, name, adapter) -> int:
    if not self._free:
      raise IcarusError(f"adapter pool is full ({self.capacity} adapters)")
    self.slots[name] = self._free.pop()
    return self.slots[name]

  def remove(self, name) -> None:
    self._free.append(self.slots.pop(name))


def _bucket(n: int, cap: int, lo: int = 1) -> int:
  b = max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
  return min(b, cap)


def _buckets(cap: int, lo: int = 1) -> list[int]:
  out, b = [], lo
  while b < cap:
    out.append(b)
    b *= 2
  return out + [cap]


class Engine:
  """Continuous-batching multi-adapter engine over one shared paged KV pool.

  Args:
    config, base_params: the frozen base.
    mode: ``"icarus"`` (shared cache) or ``"isolated"`` (conventional baseline).
    num_pages: pages in the pool (page 0 is reserved); the KV memory budget.
    page_size: tokens per page.
    max_batch: most requests decoded together.
    prefill_chunk: most new tokens per row in one prefill call (longer prompts are chunked).
    max_adapters, max_rank, targets: the device adapter pool: ``max_adapters`` slots (fixed
      shapes: loading or swapping adapters never recompiles). Any number of adapters can be
      registered: they live in host memory and are written into a device slot when a request
      for them is admitted, evicting the least recently used adapter no running request uses
      (vLLM's ``max_loras`` over ``max_cpu_loras``); when every slot is busy, the request
      waits.
    attention_backend: ``"reference"`` (jnp paged attention that gathers the row's pages) or
      ``"pallas"`` (``kernels_pallas``: pages read in place, streams folded into the GQA group;
      interpret mode on CPU, the GPU or TPU lowering on accelerators).
    tokenizer: optional, for text prompts.
    max_seq_len: longest prompt + output (default: the model's).
  """

  def __init__(self, config: ModelConfig, base_params: Params, *, mode: str = "icarus",
               num_pages: int = 256, page_size: int = 16, max_batch: int = 8,
               prefill_chunk: int = 64, max_adapters: int = 8, max_rank: int = 16,
               targets: Sequence[str] | None = None, attention_backend: str = "reference",
               tokenizer=None, max_seq_len: int | None = None, simulator=None):
    if mode not in MODES:
      raise IcarusError(f"mode={mode!r} is unknown; accepted: {MODES}")
    if attention_backend not in ATTENTION_BACKENDS:
      raise IcarusError(f"attention_backend={attention_backend!r} is unknown; accepted: "
                        f"{ATTENTION_BACKENDS}")
    if page_size < 1 or max_batch < 1 or prefill_chunk < 1:
      raise IcarusError("page_size, max_batch and prefill_chunk must be positive")
    self.cfg = config
    self.base = base_params
    self.mode = mode
    self.page_size = page_size
    self.max_batch = max_batch
    self.prefill_chunk = prefill_chunk
    self.tokenizer = tokenizer
    self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
    self.max_pages_per_seq = math.ceil(self.max_seq_len / page_size)
    self.simulator = simulator
    self.clock = time.perf_counter if simulator is None else simulator.clock
    if targets is None:
      targets = DEFAULT_ICARUS_TARGETS if mode == "icarus" else DEFAULT_LORA_TARGETS
    self.alloc = PageAllocator(num_pages)
    self.cache = PrefixCache(page_size, self.alloc)
    self._page_bytes = (2 * config.num_layers * page_size * config.num_kv_heads * config.head_dim
                        * jnp.dtype(config.dtype).itemsize)
    if simulator is None:
      self.fingerprint = base_fingerprint(config, base_params)
      self.pool = AdapterPool(config, capacity=max_adapters, max_rank=max_rank,
                              targets=tuple(targets))
      self.pages = jnp.zeros((config.num_layers, num_pages, page_size, 2 * config.num_kv_heads,
                              config.head_dim), config.jnp_dtype)
    else:  # discrete-event projection: same scheduler and cache, no arrays, modelled step time
      self.fingerprint = f"simulated:{config.name}"
      self.pool = _SimulatedPool(max_adapters)
      self.pages = None
    self.attention_backend = attention_backend
    self._attn_fn = ATTENTION_FNS[attention_backend]
    self.adapters: dict[str, Adapter] = {}  # every registered adapter (host tier)
    self._resident: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU
    self._pinned: set = set()  # adapters admitted in the current step
    self._adapter_gen: dict[str, int] = {}  # load generation: part of the isolated cache key
    self._gens = itertools.count(1)
    self._draining: set[str] = set()
    self.waiting: collections.deque[_Seq] = collections.deque()
    self.running: list[_Seq] = []
    self.outputs: dict[int, RequestOutput] = {}
    self._ids = itertools.count()
    self._order = itertools.count()
    self.stats = EngineStats()
    self.shapes_seen: set[tuple] = set()
    self.mesh = None  # set by sharding.shard_engine (through set_mesh)
    self._step_attn = self._attn_fn

  # ------------------------------------------------------------------------------ adapters
  def set_mesh(self, mesh, kv_axis: str | None) -> None:
    """Declares that base, pool and pages now live on ``mesh`` (``sharding.shard_engine``).

    Batch metadata is then placed over the ``data`` axis; with the Pallas backend the attention
    runs per device over its KV heads (``engine_steps.ShardedAttention`` on ``kv_axis``), which
    GSPMD could not do for a custom call. The reference backend is partitioned by GSPMD.
    """
    self.mesh = mesh
    self._step_attn = self._attn_fn
    if mesh is not None and kv_axis is not None and self.attention_backend == "pallas" \
        and mesh.shape[kv_axis] > 1:
      self._step_attn = engine_steps.ShardedAttention(self._attn_fn, mesh, kv_axis)

  def add_adapter(self, adapter: Adapter, name: str | None = None) -> None:
    """Registers ``adapter`` under ``name`` (default: its own). Checks gate and fingerprint."""
    name = name or adapter.name
    if name in self.adapters:
      raise IcarusError(f"adapter {name!r} is already registered")
    if self.simulator is None:
      check_adapter(self.cfg, self.base, adapter, require_icarus=(self.mode == "icarus"),
                    fingerprint=self.fingerprint)
      if self.mode == "isolated" and adapter.config.is_icarus:
        raise IcarusError(f"isolated mode serves conventional models; adapter {name!r} is of "
                          f"kind {adapter.kind!r} (use kind='lora')")
      self.pool.check(name, adapter)
      adapter = jax.tree_util.tree_map(np.asarray, adapter)  # the host tier holds it
    self.adapters[name] = adapter
    self._adapter_gen[name] = next(self._gens)
    if self.pool.has_free_slot:  # warm it while slots are free
      self._load(name)

  def _load(self, name: str) -> None:
    self.pool.add(name, self.adapters[name])
    self._resident[name] = None
    self.stats.adapter_loads += 1

  def _make_resident(self, name: str) -> bool:
    """Puts ``name`` in a device slot (LRU eviction of an idle adapter if needed); False if
    every slot is used by a running request."""
    if name in self._resident:
      self._resident.move_to_end(name)
      return True
    if not self.pool.has_free_slot:
      busy = {s.adapter for s in self.running} | self._pinned
      victim = next((n for n in self._resident if n not in busy), None)
      if victim is None:
        return False
      self.pool.remove(victim)
      del self._resident[victim]
      self.stats.adapter_evictions += 1
    self._load(name)
    return True

  @property
  def resident_adapters(self) -> list[str]:
    """Adapters in device slots, least recently used first."""
    return list(self._resident)

  def remove_adapter(self, name: str) -> None:
    """Unregisters ``name``: new requests for it are refused; running ones finish first."""
    if name not in self.adapters or name in self._draining:
      raise UnknownAdapterError(f"adapter {name!r} is not registered")
    self._draining.add(name)
    self._maybe_release_adapter(name)

  def _maybe_release_adapter(self, name):
    if name not in self._draining:
      return
    busy = any(s.adapter == name for s in itertools.chain(self.waiting, self.running))
    if not busy:
      if name in self._resident:
        self.pool.remove(name)
        del self._resident[name]
      del self.adapters[name]
      self._draining.discard(name)
      gen = self._adapter_gen.pop(name)
      if self.mode == "isolated":  # its K/V is now unreachable: give the pages back
        for ns in [ns for ns in self.cache.roots if ns[2:] == (name, gen)]:
          self.cache.drop_namespace(ns)

  @property
  def adapter_names(self) -> list[str]:
    return [n for n in self.adapters if n not in self._draining]

  # ------------------------------------------------------------------------------ requests
  def submit(self, prompt, adapter: str | None = None, sampling: SamplingParams | None = None, *,
             tenant: str | None = None, callback: Callable | None = None) -> int:
    """Queues a request; returns its id. ``prompt``: token ids or text (needs a tokenizer).

    Raises (nothing is queued then): UnknownAdapterError, RequestTooLargeError, IcarusError
    for an empty prompt, out-of-range ids or malformed sampling.
    """
    sampling = sampling or SamplingParams()
    if not isinstance(sampling, SamplingParams):
      raise IcarusError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise IcarusError("text prompt given but the engine has no tokenizer")
      prompt = self.tokenizer.encode(prompt)
    try:
      ids = [int(t) for t in prompt]
    except (TypeError, ValueError):
      raise IcarusError("prompt must be a string or a sequence of int token ids") from None
    if not ids:
      raise IcarusError("prompt is empty")
    bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
    if bad:
      raise IcarusError(f"token ids must be in [0, {self.cfg.vocab_size}); got {bad[:5]}")
    if adapter is not None and (adapter not in self.adapters or adapter in self._draining):
      raise UnknownAdapterError(f"adapter {adapter!r} is not registered; available: "
                                f"{self.adapter_names}")
    if len(ids) >= self.max_seq_len:
      raise RequestTooLargeError(f"prompt has {len(ids)} tokens; the model's context is "
                                 f"{self.max_seq_len} tokens (prompt must leave room for output)")
    total = min(len(ids) + sampling.max_tokens, self.max_seq_len)
    need = math.ceil(total / self.page_size)
    if need > self.alloc.capacity:
      raise RequestTooLargeError(f"request needs {need} KV pages ({total} tokens) but the whole "
                                 f"pool has {self.alloc.capacity}")
    rid = next(self._ids)
    slot = BASE_SLOT  # an adapter's device slot is assigned at admission (_admit)
    # Isolated mode keys the cache by the adapter's identity (name + load generation), so an
    # adapter reloaded under the same name never reads its predecessor's K/V.
    ns = ((self.fingerprint, tenant) if self.mode == "icarus" else
          (self.fingerprint, tenant, adapter, self._adapter_gen.get(adapter, 0)))
    out = RequestOutput(rid, adapter, list(ids), [], arrival_time=self.clock())
    seq = _Seq(rid, adapter, slot, ns, list(ids), list(ids), sampling, callback, out,
               order=next(self._order))
    self.waiting.append(seq)
    self.outputs[rid] = out
    return rid

  def abort(self, rid: int) -> bool:
    """Cancels a request (e.g. the client went away); frees its pages. True if it was live."""
    for s in list(self.waiting):
      if s.rid == rid:
        self.waiting.remove(s)
        self._finish(s, "abort", release=False)
        return True
    for s in list(self.running):
      if s.rid == rid:
        self._finish(s, "abort")
        return True
    return False

  @property
  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  # ------------------------------------------------------------------------------ pages
  def pages_used(self) -> int:
    return self.alloc.capacity - self.alloc.num_free

  def kv_bytes_resident(self) -> int:
    return self.pages_used() * self.bytes_per_page()

  def bytes_per_page(self) -> int:
    return int(self._page_bytes)

  def _ensure_free(self, n: int) -> bool:
    short = n - self.alloc.num_free
    if short > 0:
      if self.cache.num_unreferenced() < short:
        return False
      # Evict a small batch at once (a low watermark) so eviction cost is amortised.
      self.cache.evict(max(short, min(32, self.alloc.capacity // 64)))
    return self.alloc.num_free >= n

  def _note_usage(self):
    self.stats.peak_pages_used = max(self.stats.peak_pages_used, self.pages_used())

  def _release_pages(self, seq: _Seq, computed_tokens: list[int]) -> None:
    """Gives the sequence's computed pages to the prefix cache and drops its references."""
    if seq.page_table:
      self.cache.insert(seq.ns, computed_tokens, seq.page_table, include_partial=True)
      zero = self.alloc.decref(seq.page_table)
      self.alloc.free([p for p in zero if not self.cache.is_cached(p)])
    seq.page_table = []

  # ------------------------------------------------------------------------------ admission
  def _admit(self, seq: _Seq) -> bool:
    """Reserves ``seq``'s pages; its adapter is already in a device slot (``step`` made it
    resident, or passed the request over for this step)."""
    if seq.adapter is not None:
      seq.slot = self.pool.slots[seq.adapter]
    S = seq.tokens
    ps = self.page_size
    limit = len(S) if self.mode == "icarus" else len(S) - 1  # baseline recomputes the last token
    m = self.cache.match(seq.ns, S, limit)
    total_pages = math.ceil(len(S) / ps)
    shared = m.pages
    need = total_pages - len(shared)
    # Hold what we matched so eviction cannot take it, then make room. Keep a watermark of
    # pages for the running requests' next tokens, so admission does not cause preemption.
    self.alloc.incref(shared)
    if m.partial_page is not None:
      self.alloc.incref([m.partial_page])
    watermark = 0 if not self.running else len(self.running) + max(1, self.alloc.capacity // 100)
    if not self._ensure_free(need + watermark):
      self.alloc.decref(shared)
      if m.partial_page is not None:
        self.alloc.decref([m.partial_page])
      return False
    private = self.alloc.allocate(need)
    if m.partial_page is not None:
      if self.pages is not None:  # copy-on-write of the partially matching page
        self.pages = engine_steps.copy_pages(self.pages, jnp.array([m.partial_page], jnp.int32),
                                             jnp.array([private[0]], jnp.int32))
      self.alloc.decref([m.partial_page])
    seq.page_table = list(shared) + private
    hit = m.num_tokens(ps)
    seq.num_computed = hit
    if not seq.admitted_once:
      seq.admitted_once = True
      n_prompt = len(seq.prompt)
      cached = min(hit, n_prompt)
      seq.out.num_cached_tokens = cached
      self.stats.prompt_tokens += n_prompt
      self.stats.cached_prompt_tokens += cached
      pa = self.stats.per_adapter[seq.adapter]
      pa["prompt_tokens"] += n_prompt
      pa["cached_tokens"] += cached
    self._pinned.add(seq.adapter)  # admitted in this step: its slot may not be taken
    self._note_usage()
    return True

  # ------------------------------------------------------------------------------ steps
  def _run_rows(self, rows: list[tuple[_Seq, list[int], int]], decode: bool) -> np.ndarray:
    """One jitted call. ``rows``: (seq, new token ids, first position). Returns logits [n, V]."""
    n = len(rows)
    B = _bucket(n, self.max_batch)
    T = 1 if decode else _bucket(max(len(r[1]) for r in rows), self.prefill_chunk, lo=8)
    N = _bucket(max(len(r[0].page_table) for r in rows), self.max_pages_per_seq)
    tokens = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    valid = np.zeros((B, T), bool)
    table = np.full((B, N), NULL_PAGE, np.int32)
    slots = np.zeros((B,), np.int32)
    dec_token = np.zeros((B,), np.int32)
    dec_pos = np.zeros((B,), np.int32)
    for i, (seq, new, start) in enumerate(rows):
      k = len(new)
      tokens[i, :k] = new
      positions[i, :k] = np.arange(start, start + k)
      valid[i, :k] = True
      table[i, :len(seq.page_table)] = seq.page_table
      slots[i] = seq.slot
      last = start + k - 1 if k else start - 1  # position of the sequence's last token
      dec_pos[i] = last
      dec_token[i] = seq.tokens[last]
      if not decode and k:
        positions[i, k:] = last  # padding tokens: harmless positions
    self.shapes_seen.add((self.mode, decode, B, T, N))
    mesh = getattr(self, "mesh", None)
    if mesh is not None and self.simulator is None:  # batch metadata over the data axis
      from icarus_jax.sharding import place_batch
      tokens, positions, valid, table, slots, dec_token, dec_pos = place_batch(
          mesh, B, tokens, positions, valid, table, slots, dec_token, dec_pos)
    if self.simulator is not None:
      self.simulator.run_step(self, rows, decode, (B, T, N))
      return None
    if self.mode == "icarus":
      logits, self.pages = engine_steps.icarus_step(
          self.cfg, self.base, self.pool.weights, self.pages, tokens, positions, valid, table,
          dec_token, dec_pos, slots, attn_fn=self._step_attn)
    else:
      last_idx = np.array([max(len(r[1]) - 1, 0) for r in rows] + [0] * (B - n), np.int32)
      if mesh is not None:
        (last_idx,) = place_batch(mesh, B, last_idx)
      logits, self.pages = engine_steps.conventional_step(
          self.cfg, self.base, self.pool.weights, self.pages, tokens, positions, valid, table,
          last_idx, slots, attn_fn=self._step_attn)
    return logits[:n]

  def _pick_tokens(self, seqs: list[_Seq], logits) -> list[int]:
    if self.simulator is not None:
      return self.simulator.pick_tokens(seqs)
    n = len(seqs)
    B = _bucket(n, self.max_batch)
    pad = B - n
    sp = [s.sampling for s in seqs]
    f = lambda vals, dt: np.array(vals + [vals[0]] * pad, dt)
    lg = jnp.pad(logits, ((0, pad), (0, 0))) if pad else logits
    toks = np.asarray(sample(lg, f([p.temperature for p in sp], np.float32),
                             f([p.top_k for p in sp], np.int32), f([p.top_p for p in sp], np.float32),
                             f([p.seed for p in sp], np.uint32),
                             f([s.num_output for s in seqs], np.int32)))[:n]
    return [int(t) for t in toks]

  def _sample_and_append(self, seqs: list[_Seq], logits) -> None:
    if not seqs:
      return
    try:
      toks = self._pick_tokens(seqs, logits)
    except Exception as e:  # noqa: BLE001 - find the request(s) at fault, serve the others
      if len(seqs) == 1:
        self._fail(seqs[0], e)
        return
      self.stats.isolated_faults += 1
      keep, toks = [], []
      for i, s in enumerate(seqs):
        try:
          toks += self._pick_tokens([s], None if logits is None else logits[i:i + 1])
          keep.append(s)
        except Exception as e:  # noqa: BLE001
          self._fail(s, e)
      seqs = keep
    now = self.clock()
    for s, t in zip(seqs, toks):
      t = int(t)
      s.tokens.append(t)
      s.out.output_tokens.append(t)
      if s.out.first_token_time is None:
        s.out.first_token_time = now
      s.out.token_times.append(now)
      reason = None
      if t in s.sampling.stop_token_ids:
        reason = "stop"
      elif s.num_output >= s.sampling.max_tokens or len(s.tokens) >= self.max_seq_len:
        reason = "length"
      if s.callback is not None:
        try:
          s.callback(s.rid, t, reason is not None)
        except Exception as e:  # noqa: BLE001 - a consumer's bug fails its own request only
          self._fail(s, e)
          continue
      if reason:
        self._finish(s, reason)

  def _run_rows_isolated(self, rows, decode: bool):
    """:meth:`_run_rows`, and if the batch raises, each row alone: rows that still raise fail
    (their request ends with ``finish_reason="error"``), the others are served. Returns
    ``(rows that ran, their logits)``."""
    try:
      return rows, self._run_rows(rows, decode)
    except Exception as e:  # noqa: BLE001
      if len(rows) == 1:
        self._fail(rows[0][0], e)
        return [], None
    self.stats.isolated_faults += 1
    ok, logits = [], []
    for r in rows:
      try:
        lg = self._run_rows([r], decode)
      except Exception as e:  # noqa: BLE001
        self._fail(r[0], e)
        continue
      ok.append(r)
      logits.append(None if lg is None else lg[0])
    if self.simulator is not None or not ok:
      return ok, None
    return ok, jnp.stack(logits)

  def _fail(self, seq: _Seq, err) -> None:
    """Ends ``seq`` with ``finish_reason="error"`` (its computed pages go to the cache)."""
    msg = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    if seq in self.waiting:
      self.waiting.remove(seq)
      self._finish(seq, "error", release=False, error=msg)
    elif not seq.out.finished:
      self._finish(seq, "error", error=msg)

  def fail(self, rid: int, message: str) -> bool:
    """Ends request ``rid`` with ``finish_reason="error"`` and ``message``; True if it was live."""
    for s in itertools.chain(list(self.waiting), list(self.running)):
      if s.rid == rid:
        self._fail(s, message)
        return True
    return False

  def fail_all(self, message: str) -> list[int]:
    """Ends every live request with an error (last resort: the engine itself is broken)."""
    rids = []
    for s in list(self.running) + list(self.waiting):
      try:
        self._fail(s, message)
      except Exception:  # noqa: BLE001 - still mark it, whatever the bookkeeping says
        s.out.finish_reason, s.out.error = "error", message
        self.running = [x for x in self.running if x is not s]
        self.waiting = collections.deque(x for x in self.waiting if x is not s)
      rids.append(s.rid)
    return rids

  def _finish(self, seq: _Seq, reason: str, *, release: bool = True, error: str | None = None):
    if release:
      self._release_pages(seq, seq.tokens[:seq.num_computed])
    if seq in self.running:
      self.running.remove(seq)
    seq.out.finish_reason = reason
    seq.out.error = error
    seq.out.finish_time = self.clock()
    if seq.adapter is not None:
      self._maybe_release_adapter(seq.adapter)

  def _preempt_newest(self) -> _Seq:
    victim = max(self.running, key=lambda s: s.order)
    self.running.remove(victim)
    self._release_pages(victim, victim.tokens[:victim.num_computed])
    victim.num_computed = 0
    self.waiting.appendleft(victim)
    self.stats.preemptions += 1
    return victim

  def _prefill(self, seqs: list[_Seq]) -> None:
    """Runs the admitted sequences' uncached tokens (chunked) and samples their next token."""
    pending = list(seqs)
    while pending:
      rows, done = [], []
      for s in pending[:self.max_batch]:
        start = s.num_computed
        new = s.tokens[start:start + self.prefill_chunk]
        rows.append((s, new, start))
      rows, logits = self._run_rows_isolated(rows, decode=False)
      if logits is None:
        logits = [None] * len(rows)
      for (s, new, start), lg in zip(rows, logits):
        s.num_computed = start + len(new)
        self.stats.prefill_tokens_computed += len(new)
        self.stats.per_adapter[s.adapter]["prefill_tokens_computed"] += len(new)
        if s.num_computed == len(s.tokens):
          done.append((s, lg))
      pending = [s for s in pending if s.num_computed < len(s.tokens) and not s.out.finished]
      if done:
        for s, _ in done:  # full pages of the prompt become shareable right away
          self.cache.insert(s.ns, s.tokens[:s.num_computed], s.page_table, include_partial=False)
        lg = None if self.simulator is not None else jnp.stack([d[1] for d in done])
        self._sample_and_append([d[0] for d in done], lg)

  def step(self) -> list[RequestOutput]:
    """Admit, prefill, decode once. Returns the requests that finished in this step."""
    self.stats.steps += 1
    self._pinned = set()
    before = {s.rid for s in itertools.chain(self.waiting, self.running)}
    admitted: list[_Seq] = []
    blocked = False
    while self.waiting and not blocked and len(self.running) < self.max_batch:
      # A wave ends where a request shares a page-sized prefix with one admitted in the same
      # wave: it waits until that prefix is computed and cached, then reuses it (fan-out).
      wave: list[_Seq] = []
      no_slot: list[_Seq] = []
      while self.waiting and len(self.running) + len(wave) < self.max_batch:
        seq = self.waiting[0]
        if any(self._shares_page(seq, w) for w in wave):
          break
        if seq.adapter is not None and not self._make_resident(seq.adapter):
          no_slot.append(self.waiting.popleft())  # every slot busy: let the others by
          continue
        if not self._admit(seq):
          blocked = True
          break
        wave.append(self.waiting.popleft())
      self.waiting.extendleft(reversed(no_slot))  # they keep their place at the front
      if not wave:
        break
      self.running.extend(wave)
      self._prefill(wave)
      admitted += wave
    decoding = [s for s in self.running if s.num_computed == len(s.tokens) - 1 and s not in admitted]
    decoding = self._reserve_decode_pages(decoding)
    if decoding:
      rows = [(s, [s.tokens[s.num_computed]], s.num_computed) for s in decoding]
      rows, logits = self._run_rows_isolated(rows, decode=True)
      decoding = [r[0] for r in rows]
      for s in decoding:
        s.num_computed += 1
      self.stats.decode_tokens += len(decoding)
      self._sample_and_append(decoding, logits)
    self._note_usage()
    return [self.outputs[r] for r in before if self.outputs[r].finished]

  def _shares_page(self, a: _Seq, b: _Seq) -> bool:
    """True if waiting request ``a`` shares with ``b`` (admitted in this wave) a full page that
    ``b`` is about to compute, i.e. beyond what was already cached when ``b`` was admitted."""
    if a.ns != b.ns:
      return False
    ps = self.page_size
    L = (b.num_computed // ps + 1) * ps
    return len(a.tokens) >= L and len(b.tokens) >= L and a.tokens[:L] == b.tokens[:L]

  def _reserve_decode_pages(self, decoding: list[_Seq]) -> list[_Seq]:
    """Gives every decoding sequence a page for its next position, preempting when short."""
    ready = []
    for s in sorted(decoding, key=lambda s: s.order):
      if s not in self.running:
        continue  # preempted meanwhile
      while s in self.running and s.num_computed // self.page_size >= len(s.page_table):
        if self._ensure_free(1):
          s.page_table += self.alloc.allocate(1)
        else:
          victim = self._preempt_newest()
          if victim is s:
            break
          if victim in ready:
            ready.remove(victim)
      if s in self.running:
        ready.append(s)
    self._note_usage()
    return ready

  def run(self) -> Iterator[RequestOutput]:
    """Steps until no work is left, yielding requests as they finish."""
    while self.has_work:
      yield from self.step()

  def generate(self, prompts: Sequence, adapters: Sequence[str | None] | None = None,
               sampling: SamplingParams | None = None, *, tenant: str | None = None
               ) -> list[RequestOutput]:
    """Submits all prompts and runs to completion; outputs in submission order."""
    adapters = adapters if adapters is not None else [None] * len(prompts)
    rids = [self.submit(p, a, sampling, tenant=tenant) for p, a in zip(prompts, adapters)]
    for _ in self.run():
      pass
    return [self.outputs[r] for r in rids]

  def snapshot(self) -> dict:
    """Counters and gauges as plain data (a copy): what the async loop, the server's metrics and
    benchmarks read instead of the engine's internals."""
    st = self.stats
    return dict(
        running=len(self.running), waiting=len(self.waiting), pages_used=self.pages_used(),
        pages_free=self.alloc.num_free, pages_capacity=self.alloc.capacity,
        pages_cached_idle=self.cache.num_unreferenced(), pages_evicted=self.cache.evicted_pages,
        bytes_per_page=self.bytes_per_page(), preemptions=st.preemptions, steps=st.steps,
        adapter_loads=st.adapter_loads, adapter_evictions=st.adapter_evictions,
        resident_adapters=len(self._resident),
        prompt_tokens=st.prompt_tokens, cached_prompt_tokens=st.cached_prompt_tokens,
        prefill_tokens_computed=st.prefill_tokens_computed, decode_tokens=st.decode_tokens,
        isolated_faults=st.isolated_faults,
        per_adapter={k: dict(v) for k, v in st.per_adapter.items()},
        adapters=list(self.adapter_names))

  def check_invariants(self) -> None:
    """Asserts the page bookkeeping is consistent (used by tests and debugging).

    Every page's refcount equals the number of running sequences holding it; no page is both
    free and held or cached; free + held-or-cached = capacity.
    """
    held = np.zeros(self.alloc.num_pages, np.int64)
    for s in self.running:
      for p in s.page_table:
        held[p] += 1
    for s in self.waiting:
      assert not s.page_table, f"waiting request {s.rid} holds pages"
    bad = np.nonzero(held != self.alloc.refcount)[0]
    assert bad.size == 0, (f"refcount mismatch on pages {bad[:10].tolist()}: refcount "
                           f"{self.alloc.refcount[bad[:10]].tolist()} vs held {held[bad[:10]].tolist()}")
    used = (held > 0) | np.isin(np.arange(self.alloc.num_pages), list(self.cache.page_to_node))
    for p in np.nonzero(used)[0]:
      assert not self.alloc.is_free(int(p)), f"page {p} is free but in use"
    assert self.alloc.num_free + int(used[1:].sum()) == self.alloc.capacity
    assert self.cache.num_unreferenced() == self.cache.num_evictable(), \
        "an unreferenced cached page sits above a referenced one (not evictable)"

  def context_kv(self, prompt, adapter: str | None = None) -> np.ndarray:
    """The K/V this engine's own step writes for ``prompt`` while serving ``adapter``.

    Runs the jitted serving step (``icarus_step``, or ``conventional_step`` in isolated mode)
    over the prompt in prefill chunks of the engine's bucket shapes, into a scratch pool (the
    live pool and cache are untouched), and returns ``[L, len(prompt), 2K, hd]`` (K and V interleaved
    per kv head). In ICaRus mode the result is bitwise the same for every adapter and the base (the
    encoder stream never sees an adapter); in isolated mode each adapter writes its own K/V.
    Same shapes are used for every adapter, so bitwise comparison is meaningful: K/V may differ
    in the last bits when batch composition or chunking differ (docs/engine.md).
    """
    if self.simulator is not None:
      raise IcarusError("context_kv needs the device runner (not a simulated engine)")
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise IcarusError("text prompt given but the engine has no tokenizer")
      prompt = self.tokenizer.encode(prompt)
    ids = [int(t) for t in prompt]
    if not ids or len(ids) > self.max_seq_len:
      raise IcarusError(f"prompt must have 1..{self.max_seq_len} tokens, got {len(ids)}")
    if adapter is not None and adapter not in self.adapters:
      raise UnknownAdapterError(f"adapter {adapter!r} is not registered")
    if adapter is not None and not self._make_resident(adapter):
      raise IcarusError(f"no device slot free for adapter {adapter!r}: every slot serves a "
                        f"running request")
    slot = BASE_SLOT if adapter is None else self.pool.slots[adapter]
    cfg, ps, chunk = self.cfg, self.page_size, self.prefill_chunk
    n_pages = math.ceil(len(ids) / ps)
    N = _bucket(n_pages, self.max_pages_per_seq)
    pages = jnp.zeros((cfg.num_layers, n_pages + 1, ps, 2 * cfg.num_kv_heads, cfg.head_dim),
                      cfg.jnp_dtype)
    table = np.zeros((1, N), np.int32)
    table[0, :n_pages] = np.arange(1, n_pages + 1)
    for start in range(0, len(ids), chunk):
      new = ids[start:start + chunk]
      k = len(new)
      tokens = np.zeros((1, chunk), np.int32)
      positions = np.full((1, chunk), start + k - 1, np.int32)
      valid = np.zeros((1, chunk), bool)
      tokens[0, :k], positions[0, :k], valid[0, :k] = new, np.arange(start, start + k), True
      slots = np.array([slot], np.int32)
      if self.mode == "icarus":
        _, pages = engine_steps.icarus_step(cfg, self.base, self.pool.weights, pages, tokens,
                                            positions, valid, table, tokens[:, k - 1],
                                            positions[:, k - 1], slots, attn_fn=self._step_attn)
      else:
        _, pages = engine_steps.conventional_step(cfg, self.base, self.pool.weights, pages,
                                                  tokens, positions, valid, table,
                                                  np.array([k - 1], np.int32), slots,
                                                  attn_fn=self._step_attn)
    kv = np.asarray(pages)[:, 1:].reshape(cfg.num_layers, n_pages * ps, 2 * cfg.num_kv_heads,
                                          cfg.head_dim)
    return kv[:, :len(ids)]

  def flush_cache(self) -> int:
    """Evicts every unreferenced cached page; returns how many were freed."""
    return self.cache.flush()

  def num_buckets(self) -> int:
    """Upper bound on distinct step shapes (compiled programs) this engine can produce."""
    nb = len(_buckets(self.max_batch))
    nt = len(_buckets(self.prefill_chunk, lo=min(8, self.prefill_chunk)))
    nn = len(_buckets(self.max_pages_per_seq))
    return nb * nn * (nt + 1)
