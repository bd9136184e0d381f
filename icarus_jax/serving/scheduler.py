"""One plan per step: which rows run, with how many tokens, under a token budget.

``Scheduler.schedule()`` decides everything a step does before any of it runs, and returns a
``SchedulerOutput``: the runner calls (rows with their new tokens), the page copies the calls
need first, the admissions and preemptions. The engine executes the plan and hands each call's
sampled tokens back through ``update``, which appends them, checks stops and finishes requests.
The scheduler never sees logits, never touches the runner's arrays and never touches a refcount
(``KVCacheManager`` and ``AdapterManager`` answer it).

Policy (vLLM v1's, with ICaRus's prefix sharing):

1. Decode first: every request with its last token still to compute gets a row of one token
   and, if it crosses a page boundary, a page; when none can be had, the newest running request
   is preempted (its computed pages go to the prefix cache; it re-enters the queue at the front
   and recomputes what was evicted).
2. Then prefill chunks in the token budget left (``max_num_batched_tokens``): requests already
   prefilling, oldest first, then waiting requests admitted in priority-then-FIFO order while
   the batch, the budget, the pages (a watermark stays free for the running requests' next
   tokens) and the adapter slots allow. A chunk is at most ``prefill_chunk`` tokens. A request
   sharing a not-yet-computed page-sized prefix with one still prefilling waits for that prefix
   to be cached, then reuses it (fan-out); admission stops there (FIFO).
3. Mixed steps (``mixed``): decode rows ride the prefill call (one program runs both); else the
   decode rows run as a call of their own after the prefill call.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable

from icarus_jax.errors import IcarusError
from icarus_jax.serving.adapter_manager import AdapterManager
from icarus_jax.serving.engine_stats import EngineStats
from icarus_jax.serving.kv_cache_manager import KVCacheManager, Reservation
from icarus_jax.serving.request import Request, RequestStatus
from icarus_jax.serving.runner import StepResult


@dataclasses.dataclass(frozen=True)
class ScheduledRow:
  """One row of a runner call: ``req.tokens[start:start + num_new]`` are computed."""
  req: Request
  start: int
  num_new: int

  @property
  def new_tokens(self) -> list[int]:
    return self.req.tokens[self.start:self.start + self.num_new]

  @property
  def completes(self) -> bool:
    """Its last token is the request's last: the token it samples is kept."""
    return self.start + self.num_new == len(self.req.tokens)


@dataclasses.dataclass(frozen=True)
class ScheduledCall:
  """One runner call. ``decode``: every row has one token (the decode program)."""
  decode: bool
  rows: tuple[ScheduledRow, ...]


@dataclasses.dataclass
class SchedulerOutput:
  """What one step does, decided before any of it runs."""
  calls: list[ScheduledCall]
  page_copies: list[Reservation]  # copy-on-write of partial prefix hits, before the calls
  admitted: list[int]
  preempted: list[int]
  num_batched_tokens: int


class Scheduler:
  """Request queues and the per-step plan (see the module docstring).

  Args:
    kv: the pool's pages, prefix cache and retention.
    adapters: adapter tiers and device slots.
    stats: the engine's counters.
    page_size, max_batch, prefill_chunk: the engine's shapes.
    max_num_batched_tokens: most tokens (decode rows + prefill chunks) in one step; None: only
      ``max_batch`` and ``prefill_chunk`` bound it.
    max_seq_len: a request ends with "length" when its tokens reach it.
    mixed: decode rows ride the prefill call.
    clock: the engine's clock; log: ``log(*event)``, the schedule log.
  """

  def __init__(self, kv: KVCacheManager, adapters: AdapterManager, stats: EngineStats, *,
               page_size: int, max_batch: int, prefill_chunk: int,
               max_num_batched_tokens: int | None, max_seq_len: int, mixed: bool,
               clock: Callable[[], float], log: Callable[..., None]):
    self.kv, self.adapters, self.stats = kv, adapters, stats
    self.page_size, self.max_batch, self.prefill_chunk = page_size, max_batch, prefill_chunk
    self.token_budget = max_num_batched_tokens or max_batch * prefill_chunk
    self.max_seq_len, self.mixed, self.clock, self._log = max_seq_len, mixed, clock, log
    self.requests: dict[int, Request] = {}  # live requests by id
    self.waiting: collections.deque[Request] = collections.deque()
    self.running: list[Request] = []  # admitted (prefilling or decoding), in admission order

  # ------------------------------------------------------------------ intake and endings
  def add(self, req: Request) -> None:
    """Queues ``req``: after every waiting request of the same or a higher priority."""
    at = len(self.waiting)
    while at > 0 and self.waiting[at - 1].priority < req.priority:
      at -= 1
    self.waiting.insert(at, req)
    self.requests[req.rid] = req

  def finish(self, req: Request, reason: str, error: str | None = None) -> None:
    """Ends ``req`` (``reason``: its ``finish_reason``); its computed pages go to the prefix
    cache (kept for its session when it asked and ended normally)."""
    if not req.status.live:
      return
    if req.status is RequestStatus.WAITING:
      self.waiting.remove(req)
    else:
      keep = req.session is not None and req.retain_s > 0 and reason in ("stop", "length")
      self._release_pages(req, retain=keep)
      self.running.remove(req)
    req.status = RequestStatus.FINISHED
    del self.requests[req.rid]
    req.out.finish_reason, req.out.error, req.out.finish_time = reason, error, self.clock()
    if req.adapter is not None:
      self.release_adapter_if_drained(req.adapter)

  def forget(self, req: Request, error: str) -> None:
    """Last resort when ``finish`` itself raised: marks ``req`` failed and drops it from every
    queue, whatever its pages' bookkeeping says."""
    req.status = RequestStatus.FINISHED
    req.out.finish_reason, req.out.error = "error", error
    self.requests.pop(req.rid, None)
    self.running = [r for r in self.running if r is not req]
    self.waiting = collections.deque(r for r in self.waiting if r is not req)

  def fail(self, req: Request, err) -> None:
    """Ends ``req`` with ``finish_reason="error"``."""
    self.finish(req, "error", err if isinstance(err, str) else f"{type(err).__name__}: {err}")

  def release_adapter_if_drained(self, name: str) -> None:
    in_use = any(r.adapter == name for r in self.requests.values())
    gen = self.adapters.release_if_drained(name, in_use)
    if gen is not None and self.adapters.mode == "isolated":
      # its K/V is unreachable now: give the pages back
      self.kv.drop_namespaces(lambda ns: ns[2:] != (name, gen))

  def _release_pages(self, req: Request, retain: bool = False) -> None:
    kept = self.kv.release(req.ns, req.tokens[:req.num_computed], req.page_table,
                           retain_for=(req.session, req.retain_s) if retain else None)
    if kept:
      self._log("retain", req.rid, kept)
    req.page_table = []

  def _preempt_newest(self) -> Request:
    victim = max(self.running, key=lambda r: r.order)
    self.running.remove(victim)
    self._release_pages(victim)
    victim.num_computed = 0
    victim.status = RequestStatus.WAITING
    self.waiting.appendleft(victim)
    self.stats.preemptions += 1
    self._log("preempt", victim.rid)
    return victim

  def note_usage(self) -> None:
    self.stats.peak_pages_used = max(self.stats.peak_pages_used, self.kv.pages_used())

  # ------------------------------------------------------------------ the plan
  def schedule(self) -> SchedulerOutput:
    """Decides this step (see the module docstring). Admissions and preemptions take effect
    now (pages are reserved, adapters put in slots); the calls and copies are the caller's."""
    self.stats.steps += 1
    self.adapters.begin_step()
    self.kv.expire()
    preempted: list[int] = []
    decoding = self._reserve_decode_pages(
        [r for r in self.running if r.ready_to_decode], preempted)
    budget = self.token_budget - len(decoding)
    prefilling = [r for r in self.running if r.prefilling]
    copies: list[Reservation] = []
    admitted = self._admit(prefilling, budget, copies)
    rows: list[ScheduledRow] = []
    for r in prefilling:
      if len(rows) + (len(decoding) if self.mixed else 0) >= self.max_batch or budget <= 0:
        break
      n = min(self.prefill_chunk, len(r.tokens) - r.num_computed, budget)
      rows.append(ScheduledRow(r, r.num_computed, n))
      budget -= n
    ride = [ScheduledRow(r, r.num_computed, 1) for r in decoding]
    calls = []
    if rows and self.mixed:
      calls.append(ScheduledCall(False, tuple(ride + rows)))
    else:
      if rows:
        calls.append(ScheduledCall(False, tuple(rows)))
      if ride:
        calls.append(ScheduledCall(True, tuple(ride)))
    for c in calls:
      self._log("step", c.decode, tuple((x.req.rid, x.start, x.num_new) for x in c.rows))
    self.note_usage()
    return SchedulerOutput(calls, copies, admitted, preempted,
                           sum(x.num_new for c in calls for x in c.rows))

  def _reserve_decode_pages(self, decoding: list[Request], preempted: list[int]
                            ) -> list[Request]:
    """Gives every decoding request a page for its next position, preempting when short."""
    ready: list[Request] = []
    for r in sorted(decoding, key=lambda r: r.order):
      if r.status is not RequestStatus.DECODING:
        continue  # preempted meanwhile
      while (r.status is RequestStatus.DECODING
             and r.num_computed // self.page_size >= len(r.page_table)):
        page = self.kv.extend(may_reclaim=True)
        if page is not None:
          r.page_table.append(page)
          continue
        victim = self._preempt_newest()
        preempted.append(victim.rid)
        if victim in ready:
          ready.remove(victim)
      if r.status is RequestStatus.DECODING:
        ready.append(r)
    return ready

  def _admit(self, prefilling: list[Request], budget: int, copies: list[Reservation]
             ) -> list[int]:
    """Admits waiting requests (appended to ``prefilling``) while batch, budget, pages and
    adapter slots allow; returns their ids."""
    admitted: list[int] = []
    no_slot: list[Request] = []
    while self.waiting and len(self.running) < self.max_batch and budget > 0:
      req = self.waiting[0]
      if any(self._shares_page(req, p) for p in prefilling):
        break
      busy = {r.adapter for r in self.running}
      try:
        slot = self.adapters.acquire(req.adapter, busy)
      except Exception as e:  # noqa: BLE001 - e.g. its file vanished: this request fails alone
        self.fail(req, f"cannot load adapter {req.adapter!r}: {type(e).__name__}: {e}")
        continue
      if slot is None:
        no_slot.append(self.waiting.popleft())  # every slot busy: let the others by
        continue
      if not self._reserve(req, idle=not self.running, copies=copies):
        break
      self.waiting.popleft()
      req.status = RequestStatus.PREFILLING
      self.running.append(req)
      prefilling.append(req)
      admitted.append(req.rid)
      budget -= min(self.prefill_chunk, len(req.tokens) - req.num_computed)
    self.waiting.extendleft(reversed(no_slot))  # they keep their place at the front
    return admitted

  def _reserve(self, req: Request, idle: bool, copies: list[Reservation]) -> bool:
    """Reserves ``req``'s pages (cached prefix shared); its adapter already has a slot."""
    S = req.tokens
    icarus = self.adapters.mode == "icarus"
    limit = len(S) if icarus else len(S) - 1  # the baseline recomputes the last token
    # Keep a watermark of pages for the running requests' next tokens, so admission does not
    # cause preemption. A continuing turn may reclaim retained contexts, and so may any request
    # when the engine would otherwise idle (``idle``: nothing running or admitted in this step).
    watermark = 0 if not self.running else len(self.running) + max(1, self.kv.capacity // 100)
    res = self.kv.reserve(req.ns, S, limit, session=req.session, watermark=watermark,
                          may_reclaim=req.priority > 0 or idle)
    if res is None:
      return False
    if res.copy is not None:
      copies.append(res)
    req.page_table = list(res.page_table)
    req.cache_cursor = res.cursor
    req.num_computed = hit = res.cached_tokens
    if not req.admitted_once:
      req.admitted_once = True
      n_prompt = len(req.prompt)
      cached = min(hit, n_prompt)
      req.out.num_cached_tokens = cached
      self.stats.prompt_tokens += n_prompt
      self.stats.cached_prompt_tokens += cached
      pa = self.stats.per_adapter[req.adapter]
      pa["prompt_tokens"] += n_prompt
      pa["cached_tokens"] += cached
    self.adapters.pin(req.adapter)  # admitted in this step: its slot may not be taken
    self._log("admit", req.rid, hit)
    self.note_usage()
    return True

  def _shares_page(self, a: Request, b: Request) -> bool:
    """True if waiting request ``a`` shares with prefilling ``b`` a full page that ``b`` is
    about to compute, i.e. beyond what was already cached when ``b`` was admitted."""
    if a.ns != b.ns:
      return False
    L = (b.num_computed // self.page_size + 1) * self.page_size
    return len(a.tokens) >= L and len(b.tokens) >= L and a.tokens[:L] == b.tokens[:L]

  # ------------------------------------------------------------------ results
  def update(self, call: ScheduledCall, rows: Iterable[ScheduledRow], result: StepResult
             ) -> None:
    """Applies a call's outcome: ``rows`` are the rows that ran (a row that raised alone was
    failed by the caller), ``result`` their sampled tokens in that order. A prefill row's
    full pages become shareable at once; a row that completes its request's tokens appends
    its sampled token (stop checks, callback)."""
    rows = list(rows)
    for x in rows:
      r = x.req
      r.num_computed = x.start + x.num_new
      if call.decode or (self.mixed and r.status is RequestStatus.DECODING):
        self.stats.decode_tokens += 1
      else:
        self.stats.prefill_tokens_computed += x.num_new
        self.stats.per_adapter[r.adapter]["prefill_tokens_computed"] += x.num_new
      if call.decode:
        continue
      if x.completes:
        r.status = RequestStatus.DECODING
        self.kv.cache_computed(r.ns, r.tokens, r.page_table, r.cache_cursor)
      elif r.num_computed >= self.page_size:
        # the full pages computed so far are shareable now (the next step's admissions reuse
        # them instead of waiting for the whole prompt)
        self.kv.cache_computed(r.ns, r.tokens[:r.num_computed], r.page_table, r.cache_cursor)
    now = self.clock()
    for i, x in enumerate(rows):
      if x.completes and x.req.status is RequestStatus.DECODING:
        self._append(x.req, *result.row(i, x.req.sampling.logprobs), now)
    self.note_usage()

  def _append(self, r: Request, token: int, logprobs, now: float) -> None:
    r.tokens.append(token)
    r.out.output_tokens.append(token)
    if r.out.logprobs is not None:
      r.out.logprobs.append(logprobs)
    if r.out.first_token_time is None:
      r.out.first_token_time = now
    r.out.token_times.append(now)
    if r.matcher is not None:
      try:
        r.matcher.consume(token)
      except IcarusError as e:
        self.fail(r, e)
        return
    reason = None
    if token in r.sampling.stop_token_ids or (r.matcher is not None and r.matcher.done):
      reason = "stop"
    elif r.num_output >= r.sampling.max_tokens or len(r.tokens) >= self.max_seq_len:
      reason = "length"
    if r.callback is not None:
      try:
        r.callback(r.rid, token, reason is not None)
      except Exception as e:  # noqa: BLE001 - a consumer's bug fails its own request only
        self.fail(r, e)
        return
    if reason:
      self.finish(r, reason)

  def check_invariants(self) -> None:
    """Asserts the queues agree with the statuses and the page bookkeeping is consistent."""
    for r in self.waiting:
      assert r.status is RequestStatus.WAITING and not r.page_table, r.rid
    for r in self.running:
      assert r.status in (RequestStatus.PREFILLING, RequestStatus.DECODING), r.rid
    assert len(self.waiting) + len(self.running) == len(self.requests)
    self.kv.check_invariants(r.page_table for r in self.running)
