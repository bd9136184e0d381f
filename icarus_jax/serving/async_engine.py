"""The engine on a background thread, driven from asyncio: what a server needs.

The :class:`~icarus_jax.serving.engine.Engine` is single-threaded by design. ``AsyncEngine`` owns one
thread that alternates between running queued commands (submit, abort, add/remove adapter, any
callable) and ``engine.step()``. Handlers on the asyncio loop call :meth:`submit`, which raises
the engine's own errors (unknown adapter, prompt too long...) in the caller, and then iterate the
request's events: one ``("token", id, TokenLogprobs | None)`` per sampled token (the entry when
the request asked for logprobs) and a final ``("done", RequestOutput)``.

Invariants: every submitted request gets exactly one ``done`` event (finished, aborted, or failed
when a step raised); the engine's ``outputs`` entry is dropped once delivered, so a long-running
server does not grow; ``snapshot()`` is a copy of the counters taken on the engine thread after
each step (safe to read from any thread).

Faults: the engine isolates a request that makes a step raise (it fails that request only, see
``Engine._run_isolated``); if a step still raises, every live request fails with the error
and serving continues, unless the step failed after the KV pool was donated to the device
(``Engine.state_lost``): then nothing can be re-run and the thread dies with
:class:`~icarus_jax.errors.EngineStateLostError` (fail fast, never lie). If anything escapes the loop (a ``BaseException``, a bug in this class),
the thread is *dead*: every waiting client gets a ``done`` event with ``finish_reason="error"``,
queued and later commands raise :class:`EngineDeadError`, ``alive`` is False and ``dead_reason``
says why (the server turns ``/health`` to 503 and refuses new requests). Nothing is left
waiting forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
import traceback
from typing import Any, Callable

from icarus_jax.serving.engine import Engine, RequestOutput
from icarus_jax.errors import EngineStateLostError, IcarusError
from icarus_jax.serving.sampling import SamplingParams

log = logging.getLogger("icarus_jax.serving.async_engine")


class EngineDeadError(IcarusError):
  """The engine thread has stopped (crashed or shut down); the request was not queued."""


@dataclasses.dataclass
class _Stream:
  loop: asyncio.AbstractEventLoop
  queue: asyncio.Queue


class AsyncEngine:
  """Runs ``engine`` on a daemon thread; thread-safe submit/abort/call from any thread."""

  def __init__(self, engine: Engine, *, idle_wait_s: float = 0.02):
    self.engine = engine
    self.idle_wait_s = idle_wait_s
    self._cmds: queue.Queue = queue.Queue()
    self._streams: dict[int, _Stream] = {}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="icarus-engine", daemon=True)
    self._snapshot: dict[str, Any] = {}
    self._on_finish: list[Callable[[RequestOutput], None]] = []
    self.step_errors = 0
    self.dead_reason: str | None = None
    self._lock = threading.Lock()  # orders call() against the thread's final drain
    self._take_snapshot()

  # ------------------------------------------------------------------ lifecycle
  def start(self) -> "AsyncEngine":
    self._thread.start()
    return self

  def shutdown(self, timeout: float = 10.0) -> None:
    self._stop.set()
    self._cmds.put(None)
    self._thread.join(timeout)

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and self.dead_reason is None

  def on_finish(self, fn: Callable[[RequestOutput], None]) -> None:
    """``fn(output)`` runs on the engine thread for every finished request (metrics)."""
    self._on_finish.append(fn)

  # ------------------------------------------------------------------ commands
  def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
    """Runs ``fn(engine)`` on the engine thread between steps; a Future of its result."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    with self._lock:
      if self.dead_reason is not None:
        fut.set_exception(EngineDeadError(self.dead_reason))
      else:
        self._cmds.put((fn, fut))
    return fut

  async def acall(self, fn: Callable[[Engine], Any]) -> Any:
    return await asyncio.wrap_future(self.call(fn))

  async def submit(self, prompt: list[int], adapter: str | None, sampling: SamplingParams, *,
                   tenant: str | None = None) -> tuple[int, asyncio.Queue]:
    """Queues a request; returns ``(request_id, event queue)``. Engine errors raise here."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def do(engine: Engine) -> int:
      rid = engine.submit(prompt, adapter, sampling, tenant=tenant, callback=self._on_token)
      self._streams[rid] = _Stream(loop, q)
      return rid

    rid = await self.acall(do)
    return rid, q

  def abort(self, rid: int, reason: str = "abort") -> None:
    """Cancels ``rid`` if it is still live (its pages are freed on the engine thread);
    ``reason`` as in ``Engine.abort``."""
    def do(engine: Engine):
      if engine.abort(rid, reason):
        self._deliver_done(rid)
    self.call(do)

  def snapshot(self) -> dict[str, Any]:
    return dict(self._snapshot)

  # ------------------------------------------------------------------ engine thread
  def _on_token(self, rid: int, token: int, done: bool) -> None:
    st = self._streams.get(rid)
    if st is not None:
      lps = self.engine.outputs[rid].logprobs  # on the engine thread: this token's entry is last
      st.loop.call_soon_threadsafe(st.queue.put_nowait,
                                   ("token", token, lps[-1] if lps else None))

  def _deliver_done(self, rid: int) -> None:
    out = self.engine.outputs.pop(rid, None)
    st = self._streams.pop(rid, None)
    if out is None:
      return
    for fn in self._on_finish:
      try:
        fn(out)
      except Exception:  # a metrics bug must not stop serving
        log.exception("on_finish hook failed")
    if st is not None:
      st.loop.call_soon_threadsafe(st.queue.put_nowait, ("done", out))

  def _run_commands(self, block: bool) -> None:
    try:
      item = self._cmds.get(timeout=self.idle_wait_s) if block else self._cmds.get_nowait()
    except queue.Empty:
      return
    while item is not None:
      fn, fut = item
      if fut.set_running_or_notify_cancel():
        try:
          fut.set_result(fn(self.engine))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
          fut.set_exception(e)
      try:
        item = self._cmds.get_nowait()
      except queue.Empty:
        item = None

  def _fail_all(self, message: str) -> None:
    """Every live request ends with ``message``; every registered stream gets its ``done``."""
    try:
      self.engine.fail_all(message)
    except Exception:  # noqa: BLE001 - the streams below still get their answer
      log.exception("fail_all failed")
    for rid in list(self._streams):
      if rid not in self.engine.outputs:  # no engine record left: answer anyway
        self.engine.outputs[rid] = RequestOutput(rid, None, [], [], finish_reason="error",
                                                 error=message)
      self._deliver_done(rid)

  def _loop(self) -> None:
    reason = "server shutting down"
    try:
      self._serve()
    except BaseException as e:  # noqa: BLE001 - supervised: record, answer everyone, stop
      reason = f"engine thread died: {type(e).__name__}: {e}"
      log.critical("%s\n%s", reason, traceback.format_exc())
    finally:
      with self._lock:
        self.dead_reason = reason
      self._fail_all(reason)
      self._drain_commands(reason)
      try:
        self._take_snapshot()
      except Exception:  # noqa: BLE001 - the engine may be what broke
        self._snapshot = {**self._snapshot, "dead_reason": reason}

  def _drain_commands(self, reason: str) -> None:
    while True:
      try:
        item = self._cmds.get_nowait()
      except queue.Empty:
        return
      if item is not None and item[1].set_running_or_notify_cancel():
        item[1].set_exception(EngineDeadError(reason))

  def _serve(self) -> None:
    eng = self.engine
    while not self._stop.is_set():
      self._run_commands(block=not eng.has_work)
      if self._stop.is_set():
        break
      if eng.has_work:
        try:
          finished = eng.step()
        except EngineStateLostError:
          raise  # the pool is gone: die (``_loop`` answers everyone, /health turns 503)
        except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
          if eng.state_lost:
            raise EngineStateLostError(f"engine step failed after the KV pool was donated: "
                                       f"{type(e).__name__}: {e}") from e
          self.step_errors += 1
          log.error("engine step failed: %s", traceback.format_exc())
          self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
          finished = []
        for out in finished:
          self._deliver_done(out.request_id)
      self._take_snapshot()

  def _take_snapshot(self) -> None:
    self._snapshot = dict(self.engine.snapshot(), time=time.time(),
                          step_errors=self.step_errors, dead_reason=self.dead_reason)
