"""Counting XLA compilations in a window: the check that a timed benchmark measures serving, not
the compiler.

    with CompileWatch() as w:
      run_workflows(...)
    assert w.count == 0, w.seconds

Counts JAX's backend-compile events (``/jax/core/compile/backend_compile_duration``: one per
program XLA compiles, cache hits excluded) on any thread while the window is open.
"""

from __future__ import annotations

import threading

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileWatch:
  """Context manager: ``count`` programs compiled and ``seconds`` spent compiling inside it."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.programs: list[str] = []  # what was compiled (JAX's function names, where given)
    self._lock = threading.Lock()

  def _listen(self, event: str, duration: float, **kw) -> None:
    if event == BACKEND_COMPILE_EVENT:
      with self._lock:
        self.count += 1
        self.seconds += float(duration)
        self.programs.append(str(kw.get("fun_name", "?")))

  def __enter__(self) -> "CompileWatch":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)
