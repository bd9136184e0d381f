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
import os
from typing import Callable, Hashable, Iterator, Sequence

import numpy as np

from icarus_jax.serving import step_batch
from icarus_jax.serving.adapter_pool import BASE_SLOT
from icarus_jax.model.adapters import DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS, Adapter
from icarus_jax.model.config import ModelConfig
from icarus_jax.errors import (EngineStateLostError, IcarusError, RequestTooLargeError,
                               UnknownAdapterError)
from icarus_jax.model.params import Params
from icarus_jax.serving.kv_cache_manager import KVCacheManager
from icarus_jax.serving.prefix_cache import InsertCursor
from icarus_jax.serving.engine_config import EngineConfig
from icarus_jax.serving.grammar import GrammarCompiler, Matcher
from icarus_jax.serving.runner import (DeviceRunner, RooflineRunner, Runner, StepResult,
                                      TokenLogprobs)
from icarus_jax.serving.sampling import SamplingParams, adjustments
from icarus_jax.serving.step_batch import StepRow



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
  #: one entry per output token when the request asked for logprobs (``SamplingParams.logprobs``)
  logprobs: list[TokenLogprobs] | None = None

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
  session: Hashable | None = None
  retain_s: float = 0.0
  priority: int = 0
  cache_cursor: InsertCursor = dataclasses.field(default_factory=InsertCursor)
  prefilling: bool = False  # admitted; its uncached tokens are computed a chunk per step
  matcher: Matcher | None = None  # its grammar's state (structured outputs)

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
  retained_contexts: int = 0   # finished requests whose context was kept for their session
  retention_hits: int = 0      # admissions that found their session's context still retained
  retention_expired: int = 0   # retained contexts released by their TTL
  retention_reclaimed: int = 0  # retained contexts released early because memory ran out
  adapter_disk_reads: int = 0   # adapters read from disk (registration, or after the host
                                # tier dropped them)
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
      registered: they live in host memory (``add_adapter``) or on disk (``register_adapter``)
      and are written into a device slot when a request for them is admitted, evicting the
      least recently used adapter no running request uses (vLLM's ``max_loras`` over
      ``max_cpu_loras``); when every slot is busy, the request waits.
    max_host_adapters: host-memory copies kept of adapters registered by path (LRU; default
      unbounded); the others are read from disk again on their next use.
    attention_backend: ``"reference"`` (jnp paged attention that gathers the row's pages) or
      ``"pallas"`` (``kernels_pallas``: pages read in place, streams folded into the GQA group;
      interpret mode on CPU, the GPU or TPU lowering on accelerators).
    tokenizer: optional, for text prompts.
    max_seq_len: longest prompt + output (default: the model's).
    runner: what executes the steps (``runner.DeviceRunner`` by default); ``simulator`` (a
      ``cost_model.RooflineSimulator``) is shorthand for ``runner.RooflineRunner``: the same
      scheduling with no arrays, on a virtual clock.
    mixed_steps: decode rows ride along the step's first prefill call (one program runs both,
      vLLM-V1 style) instead of a separate decode call after the prefills; decode rows are then
      padded to the prefill chunk's token bucket.
    min_page_bucket: smallest page-count bucket of a step (a power of two): a row reads at
      least this many page slots (masked beyond its context), so fewer programs are compiled
      (``warm_up`` compiles every bucket; each costs about a second on a 135M model on CPU).
    record_schedule: keep ``schedule_log``, the sequence of scheduling decisions (admissions,
      preemptions, steps with their rows), e.g. to compare two runners.
  """

  @classmethod
  def from_config(cls, config: ModelConfig, base_params: Params, engine_config: EngineConfig,
                  **kwargs) -> "Engine":
    """An engine sized by ``engine_config`` (``kwargs``: tokenizer, targets, runner...)."""
    return cls(config, base_params, **dataclasses.asdict(engine_config), **kwargs)

  def __init__(self, config: ModelConfig, base_params: Params, *, mode: str = "icarus",
               num_pages: int = 256, page_size: int = 16, max_batch: int = 8,
               prefill_chunk: int = 64, max_adapters: int = 8, max_rank: int = 16,
               targets: Sequence[str] | None = None, attention_backend: str = "reference",
               tokenizer=None, max_seq_len: int | None = None, simulator=None,
               runner: Runner | None = None, record_schedule: bool = False,
               max_host_adapters: int | None = None, mixed_steps: bool = False,
               min_page_bucket: int = 1):
    # every knob checked in one place (EngineConfig), kept as ``engine.engine_config``
    self.engine_config = EngineConfig(
        mode=mode, num_pages=num_pages, page_size=page_size, max_batch=max_batch,
        prefill_chunk=prefill_chunk, max_adapters=max_adapters, max_rank=max_rank,
        max_seq_len=max_seq_len, attention_backend=attention_backend,
        max_host_adapters=max_host_adapters, mixed_steps=mixed_steps,
        min_page_bucket=min_page_bucket)
    self.cfg = config
    self.mode = mode
    self.page_size = page_size
    self.max_batch = max_batch
    self.prefill_chunk = prefill_chunk
    self.tokenizer = tokenizer
    self._grammar_compiler: GrammarCompiler | None = None
    self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
    self.max_pages_per_seq = math.ceil(self.max_seq_len / page_size)
    self.min_page_bucket = step_batch.bucket(min_page_bucket, self.max_pages_per_seq)
    if targets is None:
      targets = DEFAULT_ICARUS_TARGETS if mode == "icarus" else DEFAULT_LORA_TARGETS
    if runner is None and simulator is not None:
      runner = RooflineRunner(simulator, mode=mode, page_size=page_size, max_adapters=max_adapters)
    if runner is None:
      runner = DeviceRunner(config, base_params, mode=mode, num_pages=num_pages,
                            page_size=page_size, max_adapters=max_adapters, max_rank=max_rank,
                            targets=targets, attention_backend=attention_backend,
                            max_batch=max_batch)
    self.runner = runner
    self.mixed_steps = mixed_steps
    self.clock = runner.clock
    self.fingerprint = runner.fingerprint
    self.attention_backend = attention_backend
    self.adapters: dict[str, Adapter] = {}  # host tier: adapters held in memory
    self._paths: dict[str, tuple[str, Callable]] = {}  # disk tier: name -> (path, loader)
    self._host_lru: collections.OrderedDict[str, None] = collections.OrderedDict()  # disk-backed
    self.max_host_adapters = max_host_adapters
    self._resident: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU
    self._pinned: set = set()  # adapters admitted in the current step
    self._adapter_gen: dict[str, int] = {}  # every registered adapter, in order -> its load
    # generation (part of the isolated cache key)
    self._gens = itertools.count(1)
    self._draining: set[str] = set()
    self.waiting: collections.deque[_Seq] = collections.deque()
    self.running: list[_Seq] = []
    self.outputs: dict[int, RequestOutput] = {}
    self._ids = itertools.count()
    self._order = itertools.count()
    self.stats = EngineStats()
    self.shapes_seen: set[tuple] = set()
    self.schedule_log: list[tuple] | None = [] if record_schedule else None
    # pages, prefix cache, session retention (a workflow's context kept while it waits for a
    # tool): the scheduler asks, it never touches a refcount
    self.kv = KVCacheManager(num_pages, page_size, self.clock, stats=self.stats)

  @property
  def alloc(self):
    """The page allocator (read-only use: gauges, tests)."""
    return self.kv.alloc

  @property
  def cache(self):
    """The prefix cache (read-only use: gauges, tests)."""
    return self.kv.cache

  def _log(self, *event) -> None:
    if self.schedule_log is not None:
      self.schedule_log.append(event)

  # ------------------------------------------------------------------------------ adapters

  def add_adapter(self, adapter: Adapter, name: str | None = None) -> None:
    """Registers ``adapter`` under ``name`` (default: its own). Checks gate and fingerprint."""
    name = name or adapter.name
    if name in self._adapter_gen:
      raise IcarusError(f"adapter {name!r} is already registered")
    adapter = self.runner.prepare_adapter(name, adapter)  # gate, fingerprint, pool fit
    self.adapters[name] = adapter
    self._adapter_gen[name] = next(self._gens)
    if self.runner.has_free_slot:  # warm it while slots are free
      self._load(name)

  def register_adapter(self, path, name: str | None = None, *,
                       loader: Callable[[str, str], Adapter] | None = None) -> None:
    """Registers the adapter stored at ``path`` (disk tier): it is read and checked now (gate,
    fingerprint, pool fit: a bad adapter is refused here, never at request time), then kept in
    host memory only while ``max_host_adapters`` allows and read again on its next use.

    ``loader(path, name) -> Adapter`` defaults to ``peft_io.load_adapter`` for this mode's kind.
    """
    path = str(path)
    if loader is None:
      from icarus_jax.checkpoints.peft_io import load_adapter
      kind = "icarus_lora" if self.mode == "icarus" else "lora"
      loader = lambda p, n: load_adapter(p, kind=kind, name=n)  # noqa: E731
    name = name or os.path.basename(os.path.normpath(path))
    if name in self._adapter_gen:
      raise IcarusError(f"adapter {name!r} is already registered")
    adapter = self.runner.prepare_adapter(name, loader(path, name))
    self.stats.adapter_disk_reads += 1
    self._paths[name] = (path, loader)
    self.adapters[name] = adapter
    self._host_lru[name] = None
    self._adapter_gen[name] = next(self._gens)
    if self.runner.has_free_slot:
      self._load(name)
    self._trim_host_tier()

  def _host_copy(self, name: str) -> Adapter:
    """The adapter's host copy, read from disk if the host tier dropped it."""
    if name not in self.adapters:
      path, loader = self._paths[name]
      self.adapters[name] = self.runner.prepare_adapter(name, loader(path, name))
      self.stats.adapter_disk_reads += 1
      self._log("disk_read", name)
    if name in self._paths:  # disk-backed: most recently used host copy
      self._host_lru[name] = None
      self._host_lru.move_to_end(name)
    return self.adapters[name]

  def _trim_host_tier(self) -> None:
    """Drops the least recently used host copies of disk-backed adapters past the limit."""
    if self.max_host_adapters is None:
      return
    while len(self._host_lru) > self.max_host_adapters:
      victim, _ = self._host_lru.popitem(last=False)
      del self.adapters[victim]

  @property
  def host_adapters(self) -> list[str]:
    """Adapters with a copy in host memory (registered from memory, or read from disk)."""
    return list(self.adapters)

  def _load(self, name: str) -> None:
    self.runner.load_adapter(name, self._host_copy(name))
    self._trim_host_tier()
    self._resident[name] = None
    self.stats.adapter_loads += 1
    self._log("load", name)

  def _make_resident(self, name: str) -> bool:
    """Puts ``name`` in a device slot (LRU eviction of an idle adapter if needed); False if
    every slot is used by a running request."""
    if name in self._resident:
      self._resident.move_to_end(name)
      return True
    if not self.runner.has_free_slot:
      busy = {s.adapter for s in self.running} | self._pinned
      victim = next((n for n in self._resident if n not in busy), None)
      if victim is None:
        return False
      self.runner.unload_adapter(victim)
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
    if name not in self._adapter_gen or name in self._draining:
      raise UnknownAdapterError(f"adapter {name!r} is not registered")
    self._draining.add(name)
    self._maybe_release_adapter(name)

  def _maybe_release_adapter(self, name):
    if name not in self._draining:
      return
    busy = any(s.adapter == name for s in itertools.chain(self.waiting, self.running))
    if not busy:
      if name in self._resident:
        self.runner.unload_adapter(name)
        del self._resident[name]
      self.adapters.pop(name, None)
      self._paths.pop(name, None)
      self._host_lru.pop(name, None)
      self._draining.discard(name)
      gen = self._adapter_gen.pop(name)
      if self.mode == "isolated":  # its K/V is now unreachable: give the pages back
        self.kv.drop_namespaces(lambda ns: ns[2:] != (name, gen))

  @property
  def adapter_names(self) -> list[str]:
    return [n for n in self._adapter_gen if n not in self._draining]

  # ------------------------------------------------------------------------------ requests
  def submit(self, prompt, adapter: str | None = None, sampling: SamplingParams | None = None, *,
             tenant: str | None = None, callback: Callable | None = None,
             session: Hashable | None = None, retain_s: float = 0.0, priority: int = 0) -> int:
    """Queues a request; returns its id. ``prompt``: token ids or text (needs a tokenizer).

    Workflow-aware serving: ``session`` names the workflow (agent run) the request belongs to.
    With ``retain_s > 0``, when the request finishes its context (prompt + output K/V) is kept
    resident for the session for up to ``retain_s`` seconds of engine time: LRU eviction takes
    other pages first, and the next request of the session that is admitted takes it over
    (Continuum-style TTL pinning across a tool call). Only a decode that needs a page or
    another session's continuing turn (``priority > 0``) may reclaim it earlier, oldest first,
    or any request while nothing is running (retention never idles the engine).
    ``priority``: higher is admitted first (FIFO within a priority), e.g. 1 for a workflow's
    continuing turns so they do not queue behind new workflows.

    Raises (nothing is queued then): UnknownAdapterError, RequestTooLargeError, IcarusError
    for an empty prompt, out-of-range ids or malformed sampling.
    """
    if not (isinstance(retain_s, (int, float)) and 0 <= retain_s < math.inf):
      raise IcarusError(f"retain_s must be a finite number >= 0, got {retain_s!r}")
    if not isinstance(priority, int):
      raise IcarusError(f"priority must be an int, got {priority!r}")
    sampling = sampling or SamplingParams()
    if not isinstance(sampling, SamplingParams):
      raise IcarusError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    sampling.check_vocab(self.cfg.vocab_size)
    matcher = (self.grammar_compiler.matcher(sampling.grammar) if sampling.grammar is not None
               else None)
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise IcarusError("text prompt given but the engine has no tokenizer")
      prompt = self.tokenizer.encode(prompt)
    try:
      ids = list(map(int, prompt))
    except (TypeError, ValueError):
      raise IcarusError("prompt must be a string or a sequence of int token ids") from None
    if not ids:
      raise IcarusError("prompt is empty")
    if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
      bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
      raise IcarusError(f"token ids must be in [0, {self.cfg.vocab_size}); got {bad[:5]}")
    if adapter is not None and (adapter not in self._adapter_gen or adapter in self._draining):
      raise UnknownAdapterError(f"adapter {adapter!r} is not registered; available: "
                                f"{self.adapter_names}")
    if len(ids) >= self.max_seq_len:
      raise RequestTooLargeError(f"prompt has {len(ids)} tokens; the model's context is "
                                 f"{self.max_seq_len} tokens (prompt must leave room for output)")
    total = min(len(ids) + sampling.max_tokens, self.max_seq_len)
    need = math.ceil(total / self.page_size)
    if need > self.kv.capacity:
      raise RequestTooLargeError(f"request needs {need} KV pages ({total} tokens) but the whole "
                                 f"pool has {self.kv.capacity}")
    rid = next(self._ids)
    slot = BASE_SLOT  # an adapter's device slot is assigned at admission (_admit)
    # Isolated mode keys the cache by the adapter's identity (name + load generation), so an
    # adapter reloaded under the same name never reads its predecessor's K/V.
    ns = ((self.fingerprint, tenant) if self.mode == "icarus" else
          (self.fingerprint, tenant, adapter, self._adapter_gen.get(adapter, 0)))
    out = RequestOutput(rid, adapter, list(ids), [], arrival_time=self.clock(),
                        logprobs=None if sampling.logprobs is None else [])
    seq = _Seq(rid, adapter, slot, ns, list(ids), list(ids), sampling, callback, out,
               order=next(self._order), session=session, retain_s=float(retain_s),
               priority=priority, matcher=matcher)
    # FIFO within a priority: after every waiting request of the same or a higher priority
    at = len(self.waiting)
    while at > 0 and self.waiting[at - 1].priority < priority:
      at -= 1
    self.waiting.insert(at, seq)
    self.outputs[rid] = out
    return rid

  def abort(self, rid: int, reason: str = "abort") -> bool:
    """Cancels a request (e.g. the client went away); frees its pages. True if it was live.
    ``reason``: its ``finish_reason`` ("abort", or "stop" when the caller matched a stop
    string), so what is recorded is what the client saw."""
    if reason not in ("abort", "stop"):
      raise IcarusError(f"abort reason must be 'abort' or 'stop', got {reason!r}")
    for s in list(self.waiting):
      if s.rid == rid:
        self.waiting.remove(s)
        self._finish(s, reason, release=False)
        return True
    for s in list(self.running):
      if s.rid == rid:
        self._finish(s, reason)
        return True
    return False

  @property
  def grammar_compiler(self) -> GrammarCompiler:
    """Compiles structured-output grammars for this engine's tokenizer (built on first use)."""
    if self._grammar_compiler is None:
      if self.tokenizer is None:
        raise IcarusError("structured outputs need the engine's tokenizer (Engine(tokenizer=...))")
      self._grammar_compiler = GrammarCompiler(self.tokenizer, self.cfg.vocab_size)
    return self._grammar_compiler

  @property
  def max_request_tokens(self) -> int:
    """Most tokens (prompt + output) one request can hold: the context, or the whole KV pool
    if that is smaller (``submit`` refuses more)."""
    return min(self.max_seq_len, self.kv.capacity * self.page_size)

  @property
  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  # ------------------------------------------------------------------------------ pages
  def pages_used(self) -> int:
    return self.kv.pages_used()

  def kv_bytes_resident(self) -> int:
    return self.pages_used() * self.bytes_per_page()

  def bytes_per_page(self) -> int:
    return int(self.runner.bytes_per_page)

  @property
  def retained_sessions(self) -> list:
    """Sessions whose context is currently retained (oldest first)."""
    return self.kv.retained_sessions

  def _note_usage(self):
    self.stats.peak_pages_used = max(self.stats.peak_pages_used, self.pages_used())

  def _release_pages(self, seq: _Seq, computed_tokens: list[int], retain: bool = False) -> None:
    """Gives the sequence's computed pages to the prefix cache and drops its references
    (``retain``: the session keeps the cached ones, see ``submit``)."""
    kept = self.kv.release(seq.ns, computed_tokens, seq.page_table,
                           retain_for=(seq.session, seq.retain_s) if retain else None)
    if kept:
      self._log("retain", seq.rid, kept)
    seq.page_table = []

  # ------------------------------------------------------------------------------ admission
  def _admit(self, seq: _Seq, idle: bool = False) -> bool:
    """Reserves ``seq``'s pages; its adapter is already in a device slot (``step`` made it
    resident, or passed the request over for this step)."""
    seq.slot = self.runner.slot_of(seq.adapter)
    S = seq.tokens
    limit = len(S) if self.mode == "icarus" else len(S) - 1  # baseline recomputes the last token
    # Keep a watermark of pages for the running requests' next tokens, so admission does not
    # cause preemption. A continuing turn may reclaim retained contexts, and so may any request
    # when the engine would otherwise idle (``idle``: nothing running or admitted in this step).
    watermark = 0 if not self.running else len(self.running) + max(1, self.kv.capacity // 100)
    res = self.kv.reserve(seq.ns, S, limit, session=seq.session, watermark=watermark,
                          may_reclaim=seq.priority > 0 or idle)
    if res is None:
      return False
    if res.copy is not None:
      self.runner.copy_page(*res.copy)  # copy-on-write of the partial match
      self.kv.copied(res)
    seq.page_table = list(res.page_table)
    seq.cache_cursor = res.cursor
    hit = res.cached_tokens
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
    self._log("admit", seq.rid, hit)
    self._note_usage()
    return True

  # ------------------------------------------------------------------------------ steps
  def _run_rows(self, rows: list[tuple[_Seq, list[int], int]], decode: bool) -> StepResult:
    """One runner step. ``rows``: (seq, new token ids, first position). Returns each row's
    sampled next token (kept only by rows whose last token ran)."""
    ps = self.page_size

    def row(seq: _Seq, new: list[int], start: int) -> StepRow:
      # A row reads only the pages of positions < start + len(new): a chunk early in a long
      # prompt runs in a small page bucket instead of the prompt's full one.
      end = start + len(new)
      completes = end == len(seq.tokens)  # its sampled token is kept
      return StepRow(seq.tokens, start, len(new), seq.page_table[:max(1, -(-end // ps))],
                     seq.slot, seq.sampling, seq.num_output, seq.rid,
                     adjustments(seq.sampling, seq.tokens, seq.num_output) if completes else None,
                     seq.matcher.mask() if completes and seq.matcher is not None else None)
    step = step_batch.build(
        [row(*r) for r in rows],
        decode=decode, max_batch=self.max_batch, prefill_chunk=self.prefill_chunk,
        max_pages=self.max_pages_per_seq, min_pages=self.min_page_bucket)
    self.shapes_seen.add((self.mode, decode) + step.shape)
    self._log("step", decode, tuple((seq.rid, start, len(new)) for seq, new, start in rows))
    return self.runner.execute(step)

  def _append_tokens(self, seqs: list[_Seq], result: StepResult,
                     keep: list[int] | None = None) -> None:
    """Appends row ``i``'s sampled token (``result``) to ``seqs[i]`` for ``i`` in ``keep``
    (default: all rows), with its logprobs when the request asked; stop checks, callbacks."""
    kept = range(len(seqs)) if keep is None else keep
    now = self.clock()
    for i in kept:
      s = seqs[i]
      t, lp = result.row(i, s.sampling.logprobs)
      s.tokens.append(t)
      s.out.output_tokens.append(t)
      if s.out.logprobs is not None:
        s.out.logprobs.append(lp)
      if s.out.first_token_time is None:
        s.out.first_token_time = now
      s.out.token_times.append(now)
      reason = None
      if s.matcher is not None:
        try:
          s.matcher.consume(t)
        except IcarusError as e:
          self._fail(s, e)
          continue
      if t in s.sampling.stop_token_ids or (s.matcher is not None and s.matcher.done):
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
    ``(rows that ran, their StepResult)``."""
    try:
      return rows, self._run_rows(rows, decode)
    except Exception as e:  # noqa: BLE001
      self._raise_if_state_lost(e)
      if len(rows) == 1:
        self._fail(rows[0][0], e)
        return [], StepResult.concat([])
    self.stats.isolated_faults += 1
    ok, parts = [], []
    for r in rows:
      try:
        res = self._run_rows([r], decode)
      except Exception as e:  # noqa: BLE001
        self._raise_if_state_lost(e)
        self._fail(r[0], e)
        continue
      ok.append(r)
      parts.append(res)
    return ok, StepResult.concat(parts)

  @property
  def state_lost(self) -> bool:
    """True once a failed step took the donated KV pool with it (see ``EngineStateLostError``)."""
    return self.runner.state_lost()

  def _raise_if_state_lost(self, err: BaseException) -> None:
    """A fault after the pool was donated leaves nothing to re-run: say so (the async engine
    then dies, answering everyone) instead of failing every later request one by one."""
    if self.state_lost:
      raise EngineStateLostError(
          f"a step failed after the KV pool was handed to the device ({type(err).__name__}: "
          f"{err}); the pool and every request's K/V are lost, restart the engine") from err

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
      keep = (seq.session is not None and seq.retain_s > 0 and reason in ("stop", "length"))
      self._release_pages(seq, seq.tokens[:seq.num_computed], retain=keep)
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
    victim.prefilling = False
    self.waiting.appendleft(victim)
    self.stats.preemptions += 1
    self._log("preempt", victim.rid)
    return victim

  def _prefill(self, seqs: list[_Seq], ride: Sequence[_Seq] = ()) -> None:
    """One prefill call: the next chunk (at most ``prefill_chunk`` tokens) of every prefilling
    sequence in ``seqs`` (at most ``max_batch`` rows); a sequence whose last token ran samples its
    next token. The rest of a long prompt runs in later steps, between decode steps, so running
    requests keep their token rate while a long prompt arrives (chunked prefill).

    ``ride``: decoding sequences (pages reserved) whose one new token joins the call (mixed
    step): a decode row is a prefill row with one token that completes it.
    """
    ride = list(ride)
    riding = set(map(id, ride))
    rows, done = [], []
    for s in (ride + list(seqs))[:self.max_batch]:
      start = s.num_computed
      rows.append((s, s.tokens[start:start + self.prefill_chunk], start))
    if not rows:
      return
    rows, result = self._run_rows_isolated(rows, decode=False)
    done = []  # indices of the rows whose last prompt token was computed in this call
    for i, (s, new, start) in enumerate(rows):
      s.num_computed = start + len(new)
      if id(s) in riding:
        self.stats.decode_tokens += 1
      else:
        self.stats.prefill_tokens_computed += len(new)
        self.stats.per_adapter[s.adapter]["prefill_tokens_computed"] += len(new)
      if s.num_computed == len(s.tokens):
        s.prefilling = False
        done.append(i)
      elif id(s) not in riding and s.num_computed >= self.page_size:
        # the full pages computed so far are shareable now (the next step's admissions reuse
        # them instead of waiting for the whole prompt)
        self.kv.cache_computed(s.ns, s.tokens[:s.num_computed], s.page_table, s.cache_cursor)
    if done:
      for i in done:  # full pages of the prompt become shareable right away
        s = rows[i][0]
        self.kv.cache_computed(s.ns, s.tokens, s.page_table, s.cache_cursor)  # all computed
      # every row was sampled (per row and stateless); only the finished ones keep their token
      self._append_tokens([r[0] for r in rows], result, keep=done)

  def step(self) -> list[RequestOutput]:
    """Admit, run one prefill chunk of every prefilling request, decode once. Returns the
    requests that finished in this step."""
    self.stats.steps += 1
    self._pinned = set()
    self.kv.expire()
    before = {s.rid for s in itertools.chain(self.waiting, self.running)}
    admitted: list[_Seq] = []
    ride: list[_Seq] = []
    if self.mixed_steps:  # decodes first get their pages, then ride along the prefill call
      ride = self._reserve_decode_pages(
          [s for s in self.running if not s.prefilling and s.num_computed == len(s.tokens) - 1])
    prefilling = [s for s in self.running if s.prefilling]
    no_slot: list[_Seq] = []
    while self.waiting and len(self.running) < self.max_batch:
      # A request that shares a page-sized prefix with one still prefilling (admitted now or
      # in an earlier step) waits until that prefix is computed and cached, then reuses it
      # (fan-out); admission is FIFO, so the requests behind it wait too.
      seq = self.waiting[0]
      if any(self._shares_page(seq, w) for w in prefilling):
        break
      try:
        resident = seq.adapter is None or self._make_resident(seq.adapter)
      except Exception as e:  # noqa: BLE001 - e.g. its file vanished: this request fails alone
        self._fail(seq, f"cannot load adapter {seq.adapter!r}: {type(e).__name__}: {e}")
        continue
      if not resident:
        no_slot.append(self.waiting.popleft())  # every slot busy: let the others by
        continue
      if not self._admit(seq, idle=not self.running and not admitted):
        break
      self.waiting.popleft()
      seq.prefilling = True
      self.running.append(seq)
      prefilling.append(seq)
      admitted.append(seq)
    self.waiting.extendleft(reversed(no_slot))  # they keep their place at the front
    ride = [s for s in ride if s in self.running]  # admission never preempts, but be exact
    prefilling = [s for s in prefilling if s in self.running and not s.out.finished]
    if prefilling:
      self._prefill(prefilling, ride)
    if self.mixed_steps:
      decoding = [s for s in ride if s in self.running] if not prefilling else []
    else:
      decoding = [s for s in self.running if not s.prefilling and s not in prefilling
                  and s.num_computed == len(s.tokens) - 1]  # one token per request per step
      decoding = self._reserve_decode_pages(decoding)
    if decoding:
      rows = [(s, [s.tokens[s.num_computed]], s.num_computed) for s in decoding]
      rows, result = self._run_rows_isolated(rows, decode=True)
      decoding = [r[0] for r in rows]
      for s in decoding:
        s.num_computed += 1
      self.stats.decode_tokens += len(decoding)
      self._append_tokens(decoding, result)
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
        page = self.kv.extend(may_reclaim=True)
        if page is not None:
          s.page_table.append(page)
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
        pages_free=self.kv.num_free, pages_capacity=self.kv.capacity,
        pages_cached_idle=self.cache.num_unreferenced(), pages_evicted=self.cache.evicted_pages,
        bytes_per_page=self.bytes_per_page(), preemptions=st.preemptions, steps=st.steps,
        adapter_loads=st.adapter_loads, adapter_evictions=st.adapter_evictions,
        adapter_disk_reads=st.adapter_disk_reads, host_adapters=len(self.adapters),
        resident_adapters=len(self._resident),
        prompt_tokens=st.prompt_tokens, cached_prompt_tokens=st.cached_prompt_tokens,
        prefill_tokens_computed=st.prefill_tokens_computed, decode_tokens=st.decode_tokens,
        isolated_faults=st.isolated_faults, retained_sessions=len(self.kv.retained_sessions),
        retained_contexts=st.retained_contexts, retention_hits=st.retention_hits,
        retention_expired=st.retention_expired, retention_reclaimed=st.retention_reclaimed,
        per_adapter={k: dict(v) for k, v in st.per_adapter.items()},
        adapters=list(self.adapter_names))

  def check_invariants(self) -> None:
    """Asserts the page bookkeeping is consistent (used by tests and debugging).

    Every page's refcount equals the number of running sequences and retained session
    contexts holding it; no page is both
    free and held or cached; free + held-or-cached = capacity.
    """
    for s in self.waiting:
      assert not s.page_table, f"waiting request {s.rid} holds pages"
    self.kv.check_invariants(s.page_table for s in self.running)

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
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise IcarusError("text prompt given but the engine has no tokenizer")
      prompt = self.tokenizer.encode(prompt)
    ids = [int(t) for t in prompt]
    if not ids or len(ids) > self.max_seq_len:
      raise IcarusError(f"prompt must have 1..{self.max_seq_len} tokens, got {len(ids)}")
    if adapter is not None and adapter not in self._adapter_gen:
      raise UnknownAdapterError(f"adapter {adapter!r} is not registered")
    if adapter is not None and not self._make_resident(adapter):
      raise IcarusError(f"no device slot free for adapter {adapter!r}: every slot serves a "
                        f"running request")
    return self.runner.context_kv(ids, self.runner.slot_of(adapter), page_size=self.page_size,
                                  prefill_chunk=self.prefill_chunk,
                                  max_pages=self.max_pages_per_seq)

  def flush_cache(self) -> int:
    """Evicts every unreferenced cached page; returns how many were freed."""
    return self.kv.flush()

  def warm_up(self, max_context: int | None = None, min_context: int = 1) -> int:
    """Compiles every step program this engine can run for sequences of ``min_context`` to
    ``max_context`` tokens (default: 1 to ``max_seq_len``): each (batch, new tokens, pages)
    bucket, decode and prefill, the sampler of each batch bucket and the page copy;
    so that no compile stalls a measured run. Requests with penalties, ``logit_bias``, a
    grammar or logprobs run programs of their own, compiled on first use. Runs on an idle engine
    with an empty prefix cache (its garbage K/V lands in free pages, which an owner overwrites
    before reading). Returns the number of step shapes."""
    if self.has_work or self.cache.num_cached_pages:
      raise IcarusError("warm_up needs an idle engine with an empty prefix cache")
    ps, cap_pages = self.page_size, self.max_pages_per_seq
    hi = min(max_context or self.max_seq_len, self.max_seq_len)
    if not 1 <= min_context <= hi:
      raise ValueError(f"warm_up: need 1 <= min_context <= max_context (capped at max_seq_len="
                       f"{self.max_seq_len}); got min_context={min_context}, "
                       f"max_context={max_context}")
    lo_p = step_batch.bucket(max(1, -(-min_context // ps)), cap_pages, lo=self.min_page_bucket)
    hi_p = step_batch.bucket(-(-hi // ps), cap_pages)
    page_buckets = [P for P in step_batch.buckets(cap_pages) if lo_p <= P <= hi_p]
    t_lo = min(8, self.prefill_chunk)
    token_buckets = step_batch.buckets(self.prefill_chunk, lo=t_lo)
    pages = [1 + i % (self.alloc.num_pages - 1) for i in range(cap_pages)]
    shapes = 0
    for B in step_batch.buckets(self.max_batch):
      for P in page_buckets:
        for decode, T in [(True, 1)] + [(False, T) for T in token_buckets]:
          new = min(T, P * ps)
          if not decode and new <= T // 2 and T > t_lo:
            continue  # no row of this bucket fits P pages
          rows = [StepRow([1] * (P * ps), P * ps - new, new, pages[:P], BASE_SLOT)] * B
          step = step_batch.build(rows, decode=decode, max_batch=self.max_batch,
                                  prefill_chunk=self.prefill_chunk, max_pages=cap_pages,
                                  min_pages=self.min_page_bucket)
          self.shapes_seen.add((self.mode, decode) + step.shape)
          self.runner.execute(step)
          shapes += 1
    if self.alloc.num_pages > 2:
      self.runner.copy_page(1, 2)  # the copy-on-write of a partial prefix hit
    return shapes

  def num_buckets(self) -> int:
    """Upper bound on distinct step shapes (compiled programs) this engine can produce."""
    nb = len(step_batch.buckets(self.max_batch))
    nt = len(step_batch.buckets(self.prefill_chunk, lo=min(8, self.prefill_chunk)))
    nn = len([P for P in step_batch.buckets(self.max_pages_per_seq)
              if P >= self.min_page_bucket])
    return nb * nn * (nt + 1)
