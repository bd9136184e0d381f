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

One ``step()``: ``Scheduler.schedule()`` plans it (decode rows, then prefill chunks in the token
budget; admissions, preemptions, page copies), the engine runs the plan's copies and calls on
the runner (which samples on the device), and ``Scheduler.update`` applies each call's tokens.
The parts: ``scheduler`` (queues and policy), ``request`` (state), ``kv_cache_manager`` (pages,
prefix cache, retention), ``adapter_manager`` (adapter tiers and slots), ``runner`` (device or
roofline execution). Shapes are bucketed to powers of two (batch, new tokens, pages per row), so
the number of compiled programs is bounded by ``num_buckets()``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
from typing import Callable, Hashable, Iterator, Mapping, Sequence

import numpy as np

from icarus_jax.errors import IcarusError, RequestTooLargeError, UnknownAdapterError
from icarus_jax.model.adapters import DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS, Adapter
from icarus_jax.model.config import ModelConfig
from icarus_jax.model.params import Params
from icarus_jax.serving import step_batch
from icarus_jax.serving.adapter_manager import AdapterManager
from icarus_jax.serving.adapter_pool import BASE_SLOT
from icarus_jax.serving.engine_config import EngineConfig
from icarus_jax.serving.engine_stats import EngineStats
from icarus_jax.serving.grammar import GrammarCompiler
from icarus_jax.serving.kv_cache_manager import KVCacheManager
from icarus_jax.serving.request import Request, RequestOutput, RequestStatus
from icarus_jax.serving.runner import DeviceRunner, RooflineRunner, Runner
from icarus_jax.serving.sampling import SamplingParams
from icarus_jax.serving.plan_executor import PlanExecutor
from icarus_jax.serving.scheduler import Scheduler
from icarus_jax.serving.step_batch import StepRow

__all__ = ["Engine", "EngineStats", "RequestOutput", "RequestStatus"]


class Engine:
  """Continuous-batching multi-adapter engine over one shared paged KV pool.

  Args:
    config, base_params: the frozen base.
    mode: ``"icarus"`` (shared cache) or ``"isolated"`` (conventional baseline).
    num_pages: pages in the pool (page 0 is reserved); the KV memory budget.
    page_size: tokens per page.
    max_batch: most requests decoded together.
    prefill_chunk: most new tokens per row in one prefill call (longer prompts are chunked).
    max_num_batched_tokens: most tokens one step computes: every decode row first, then prefill
      chunks in what is left (default ``max_batch * prefill_chunk``). Smaller keeps running
      requests' token gaps short while a long prompt arrives, at the cost of its TTFT.
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
               prefill_chunk: int = 64, max_num_batched_tokens: int | None = None,
               max_adapters: int = 8, max_rank: int = 16,
               targets: Sequence[str] | None = None, attention_backend: str = "reference",
               tokenizer=None, max_seq_len: int | None = None, simulator=None,
               runner: Runner | None = None, record_schedule: bool = False,
               max_host_adapters: int | None = None, mixed_steps: bool = False,
               min_page_bucket: int = 1):
    # every knob checked in one place (EngineConfig), kept as ``engine.engine_config``
    self.engine_config = EngineConfig(
        mode=mode, num_pages=num_pages, page_size=page_size, max_batch=max_batch,
        prefill_chunk=prefill_chunk, max_num_batched_tokens=max_num_batched_tokens,
        max_adapters=max_adapters, max_rank=max_rank,
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
    self.outputs: dict[int, RequestOutput] = {}
    self._ids = itertools.count()
    self._order = itertools.count()
    self.stats = EngineStats()
    self.shapes_seen: set[tuple] = set()
    self.schedule_log: list[tuple] | None = [] if record_schedule else None
    # pages, prefix cache, session retention (a workflow's context kept while it waits for a
    # tool): the scheduler asks, it never touches a refcount
    self.kv = KVCacheManager(num_pages, page_size, self.clock, stats=self.stats)
    self.adapter_manager = AdapterManager(runner, mode=mode, stats=self.stats, log=self._log,
                                          max_host_adapters=max_host_adapters)
    self.scheduler = Scheduler(
        self.kv, self.adapter_manager, self.stats, page_size=page_size, max_batch=max_batch,
        prefill_chunk=prefill_chunk, max_num_batched_tokens=max_num_batched_tokens,
        max_seq_len=self.max_seq_len, mixed=mixed_steps, clock=self.clock, log=self._log)
    self.executor = PlanExecutor(
        runner, self.scheduler, self.kv, self.stats, slot_of=self.adapter_manager.slot_of,
        page_size=page_size, max_batch=max_batch, prefill_chunk=prefill_chunk,
        max_pages=self.max_pages_per_seq, min_pages=self.min_page_bucket,
        on_shape=lambda decode, shape: self.shapes_seen.add((mode, decode) + shape))

  @property
  def alloc(self):
    """The page allocator (read-only use: gauges, tests)."""
    return self.kv.alloc

  @property
  def cache(self):
    """The prefix cache (read-only use: gauges, tests)."""
    return self.kv.cache

  @property
  def running(self) -> list[Request]:
    """Admitted requests (prefilling or decoding), in admission order (read-only use)."""
    return list(self.scheduler.running)

  @property
  def waiting(self) -> list[Request]:
    """Queued requests, in admission order (read-only use)."""
    return list(self.scheduler.waiting)

  def _log(self, *event) -> None:
    if self.schedule_log is not None:
      self.schedule_log.append(event)

  # ------------------------------------------------------------------------------ adapters

  def add_adapter(self, adapter: Adapter, name: str | None = None) -> None:
    """Registers ``adapter`` under ``name`` (default: its own). Checks gate and fingerprint."""
    self.adapter_manager.add(adapter, name)

  def register_adapter(self, path, name: str | None = None, *,
                       loader: Callable[[str, str], Adapter] | None = None) -> None:
    """Registers the adapter stored at ``path`` (disk tier): it is read and checked now (gate,
    fingerprint, pool fit: a bad adapter is refused here, never at request time), then kept in
    host memory only while ``max_host_adapters`` allows and read again on its next use.

    ``loader(path, name) -> Adapter`` defaults to ``peft_io.load_adapter`` for this mode's kind.
    """
    self.adapter_manager.register(path, name, loader=loader)

  def remove_adapter(self, name: str) -> None:
    """Unregisters ``name``: new requests for it are refused; running ones finish first."""
    self.adapter_manager.remove(name)
    self.scheduler.release_adapter_if_drained(name)

  @property
  def adapters(self) -> Mapping[str, Adapter]:
    """Host copies of the adapters, by name (read-only)."""
    return types.MappingProxyType(self.adapter_manager.host_copies)

  @property
  def host_adapters(self) -> list[str]:
    """Adapters with a copy in host memory (registered from memory, or read from disk)."""
    return self.adapter_manager.host_names

  @property
  def resident_adapters(self) -> list[str]:
    """Adapters in device slots, least recently used first."""
    return self.adapter_manager.resident_names

  @property
  def adapter_names(self) -> list[str]:
    return self.adapter_manager.names

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
    self.adapter_manager.check_servable(adapter)
    if len(ids) >= self.max_seq_len:
      raise RequestTooLargeError(f"prompt has {len(ids)} tokens; the model's context is "
                                 f"{self.max_seq_len} tokens (prompt must leave room for output)")
    total = min(len(ids) + sampling.max_tokens, self.max_seq_len)
    need = math.ceil(total / self.page_size)
    if need > self.kv.capacity:
      raise RequestTooLargeError(f"request needs {need} KV pages ({total} tokens) but the whole "
                                 f"pool has {self.kv.capacity}")
    rid = next(self._ids)
    # Isolated mode keys the cache by the adapter's identity (name + load generation), so an
    # adapter reloaded under the same name never reads its predecessor's K/V.
    ns = ((self.fingerprint, tenant) if self.mode == "icarus" else
          (self.fingerprint, tenant, adapter, self.adapter_manager.generation(adapter)))
    out = RequestOutput(rid, adapter, list(ids), [], arrival_time=self.clock(),
                        logprobs=None if sampling.logprobs is None else [])
    self.scheduler.add(Request(rid, adapter, ns, list(ids), list(ids), sampling, callback, out,
                               order=next(self._order), session=session,
                               retain_s=float(retain_s), priority=priority, matcher=matcher))
    self.outputs[rid] = out
    return rid

  def abort(self, rid: int, reason: str = "abort") -> bool:
    """Cancels a request (e.g. the client went away); frees its pages. True if it was live.
    ``reason``: its ``finish_reason`` ("abort", or "stop" when the caller matched a stop
    string), so what is recorded is what the client saw."""
    if reason not in ("abort", "stop"):
      raise IcarusError(f"abort reason must be 'abort' or 'stop', got {reason!r}")
    req = self.scheduler.requests.get(rid)
    if req is None:
      return False
    self.scheduler.finish(req, reason)
    return True

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
    return bool(self.scheduler.requests)

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

  # ------------------------------------------------------------------------------ steps
  def step(self) -> list[RequestOutput]:
    """Plans one step, runs its page copies and runner calls, applies the sampled tokens.
    Returns the requests that finished in this step."""
    live = list(self.scheduler.requests)
    self.executor.execute(self.scheduler.schedule())
    return [self.outputs[r] for r in live if self.outputs[r].finished]

  @property
  def state_lost(self) -> bool:
    """True once a failed step took the donated KV pool with it (see ``EngineStateLostError``)."""
    return self.runner.state_lost()

  def fail(self, rid: int, message: str) -> bool:
    """Ends request ``rid`` with ``finish_reason="error"`` and ``message``; True if it was live."""
    req = self.scheduler.requests.get(rid)
    if req is None:
      return False
    self.scheduler.fail(req, message)
    return True

  def fail_all(self, message: str) -> list[int]:
    """Ends every live request with an error (last resort: the engine itself is broken)."""
    rids = list(self.scheduler.requests)
    for rid in rids:
      req = self.scheduler.requests.get(rid)
      if req is None:
        continue
      try:
        self.scheduler.fail(req, message)
      except Exception:  # noqa: BLE001 - still mark it, whatever the bookkeeping says
        self.scheduler.forget(req, message)
    return rids

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
        running=len(self.scheduler.running), waiting=len(self.scheduler.waiting), pages_used=self.pages_used(),
        pages_free=self.kv.num_free, pages_capacity=self.kv.capacity,
        pages_cached_idle=self.cache.num_unreferenced(), pages_evicted=self.cache.evicted_pages,
        bytes_per_page=self.bytes_per_page(), preemptions=st.preemptions, steps=st.steps,
        adapter_loads=st.adapter_loads, adapter_evictions=st.adapter_evictions,
        adapter_disk_reads=st.adapter_disk_reads, host_adapters=len(self.host_adapters),
        resident_adapters=len(self.resident_adapters),
        prompt_tokens=st.prompt_tokens, cached_prompt_tokens=st.cached_prompt_tokens,
        prefill_tokens_computed=st.prefill_tokens_computed, decode_tokens=st.decode_tokens,
        isolated_faults=st.isolated_faults, retained_sessions=len(self.kv.retained_sessions),
        retained_contexts=st.retained_contexts, retention_hits=st.retention_hits,
        retention_expired=st.retention_expired, retention_reclaimed=st.retention_reclaimed,
        per_adapter={k: dict(v) for k, v in st.per_adapter.items()},
        adapters=list(self.adapter_names))

  def check_invariants(self) -> None:
    """Asserts the request states and the page bookkeeping are consistent (tests, debugging):
    every page's refcount equals the number of running requests and retained session contexts
    holding it; no page is both free and held or cached; free + held-or-cached = capacity."""
    self.scheduler.check_invariants()

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
    if adapter is not None and self.adapter_manager.generation(adapter) == 0:
      raise UnknownAdapterError(f"adapter {adapter!r} is not registered")
    slot = self.adapter_manager.acquire(adapter, {r.adapter for r in self.scheduler.running})
    if slot is None:
      raise IcarusError(f"no device slot free for adapter {adapter!r}: every slot serves a "
                        f"running request")
    return self.runner.context_kv(ids, slot, page_size=self.page_size,
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
    pages = [1 + i % (self.alloc.num_pages - 1) for i in range(cap_pages)]
    shapes = step_batch.every_bucket(
        max_batch=self.max_batch, prefill_chunk=self.prefill_chunk, page_size=ps,
        max_pages=cap_pages, min_pages=self.min_page_bucket,
        lo_pages=max(1, -(-min_context // ps)), hi_pages=-(-hi // ps))
    for decode, B, T, P in shapes:
      new = min(T, P * ps)
      rows = [StepRow([1] * (P * ps), P * ps - new, new, pages[:P], BASE_SLOT)] * B
      step = step_batch.build(rows, decode=decode, max_batch=self.max_batch,
                              prefill_chunk=self.prefill_chunk, max_pages=cap_pages,
                              min_pages=self.min_page_bucket)
      self.shapes_seen.add((self.mode, decode) + step.shape)
      self.runner.execute(step)
    if self.alloc.num_pages > 2:
      self.runner.copy_page(1, 2)  # the copy-on-write of a partial prefix hit
    return len(shapes)

  def num_buckets(self) -> int:
    """Upper bound on distinct step shapes (compiled programs) this engine can produce."""
    return step_batch.num_buckets(max_batch=self.max_batch, prefill_chunk=self.prefill_chunk,
                                  max_pages=self.max_pages_per_seq,
                                  min_pages=self.min_page_bucket)
