"""Runs one ``SchedulerOutput`` on a runner: page copies, then each call, faults isolated.

The executor turns a call's scheduled rows into a bucketed ``step_batch.Step`` (each row reads
only the pages its positions reach, samples with its own parameters, penalties and grammar
mask), executes it, and hands the sampled tokens to ``Scheduler.update``. When a call raises
before the KV pool was donated, each row runs alone: rows that still raise end their own request
with ``finish_reason="error"``, the others are served. A fault after donation leaves nothing to
re-run: ``EngineStateLostError`` (the async engine then dies and answers everyone).
"""

from __future__ import annotations

from typing import Callable

from icarus_jax.errors import EngineStateLostError
from icarus_jax.serving import step_batch
from icarus_jax.serving.engine_stats import EngineStats
from icarus_jax.serving.kv_cache_manager import KVCacheManager
from icarus_jax.serving.runner import Runner, StepResult
from icarus_jax.serving.sampling import adjustments
from icarus_jax.serving.scheduler import ScheduledCall, ScheduledRow, Scheduler, SchedulerOutput
from icarus_jax.serving.step_batch import StepRow


class PlanExecutor:
  """Executes plans on ``runner`` for ``scheduler`` (shapes: the engine's buckets).

  ``slot_of(adapter) -> int``: the adapter's device slot; ``on_shape(decode, shape)``: told the
  bucket of every call (the engine's ``shapes_seen``)."""

  def __init__(self, runner: Runner, scheduler: Scheduler, kv: KVCacheManager,
               stats: EngineStats, *, slot_of: Callable[[str | None], int], page_size: int,
               max_batch: int, prefill_chunk: int, max_pages: int, min_pages: int,
               on_shape: Callable[[bool, tuple], None]):
    self.runner, self.scheduler, self.kv, self.stats = runner, scheduler, kv, stats
    self.slot_of, self.on_shape = slot_of, on_shape
    self.page_size, self.max_batch, self.prefill_chunk = page_size, max_batch, prefill_chunk
    self.max_pages, self.min_pages = max_pages, min_pages

  def execute(self, plan: SchedulerOutput) -> None:
    for res in plan.page_copies:
      self.runner.copy_page(*res.copy)  # copy-on-write of a partial prefix hit
      self.kv.copied(res)
    for call in plan.calls:
      rows = [x for x in call.rows if x.req.status.live]  # a fault may have ended one
      if rows:
        ran, result = self._run_isolated(call, rows)
        self.scheduler.update(call, ran, result)

  def _run(self, call: ScheduledCall, rows: list[ScheduledRow]) -> StepResult:
    """One runner call over ``rows``; returns each row's sampled next token (kept only by the
    rows that complete their request's tokens)."""
    ps = self.page_size

    def row(x: ScheduledRow) -> StepRow:
      # A row reads only the pages of positions < start + num_new: a chunk early in a long
      # prompt runs in a small page bucket instead of the prompt's full one.
      r, end = x.req, x.start + x.num_new
      return StepRow(r.tokens, x.start, x.num_new, r.page_table[:max(1, -(-end // ps))],
                     self.slot_of(r.adapter), r.sampling, r.num_output, r.rid,
                     adjustments(r.sampling, r.tokens, r.num_output) if x.completes else None,
                     r.matcher.mask() if x.completes and r.matcher is not None else None)
    step = step_batch.build(
        [row(x) for x in rows], decode=call.decode, max_batch=self.max_batch,
        prefill_chunk=self.prefill_chunk, max_pages=self.max_pages, min_pages=self.min_pages)
    self.on_shape(call.decode, step.shape)
    return self.runner.execute(step)

  def _run_isolated(self, call: ScheduledCall, rows: list[ScheduledRow]
                    ) -> tuple[list[ScheduledRow], StepResult]:
    """:meth:`_run`, and if the call raises, each row alone. Returns ``(rows that ran, their
    StepResult)``."""
    try:
      return rows, self._run(call, rows)
    except Exception as e:  # noqa: BLE001
      self._raise_if_state_lost(e)
      if len(rows) == 1:
        self.scheduler.fail(rows[0].req, e)
        return [], StepResult.concat([])
    self.stats.isolated_faults += 1
    ok, parts = [], []
    for x in rows:
      try:
        res = self._run(call, [x])
      except Exception as e:  # noqa: BLE001
        self._raise_if_state_lost(e)
        self.scheduler.fail(x.req, e)
        continue
      ok.append(x)
      parts.append(res)
    return ok, StepResult.concat(parts)

  def _raise_if_state_lost(self, err: BaseException) -> None:
    if self.runner.state_lost():
      raise EngineStateLostError(
          f"a step failed after the KV pool was handed to the device ({type(err).__name__}: "
          f"{err}); the pool and every request's K/V are lost, restart the engine") from err
