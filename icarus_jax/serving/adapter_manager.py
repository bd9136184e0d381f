"""Which adapters exist and where each one is: disk, host memory, or a device slot.

Three tiers, as vLLM's ``max_loras`` over ``max_cpu_loras``: every registered adapter is known
here (with its load generation, part of the isolated-mode cache key); adapters registered by path
keep a host copy only while ``max_host_adapters`` allows (LRU) and are read from disk again on
their next use; ``acquire`` puts one in a device slot for a request, evicting the least recently
used adapter that no running request (and no request admitted in this step) uses. Removal drains:
new requests are refused at once, the slot and the copies go when the last request using the
adapter is gone.

The manager owns the runner's adapter slots: the scheduler asks ``acquire(name) -> slot | None``
and never touches the runner's pool.
"""

from __future__ import annotations

import collections
import itertools
import os
from typing import Callable, Iterable

from icarus_jax.errors import IcarusError, UnknownAdapterError
from icarus_jax.model.adapters import Adapter
from icarus_jax.serving.engine_stats import EngineStats


class AdapterManager:
  """Registry, host and disk tiers, and device slots of the engine's adapters.

  Args:
    runner: what holds the device slots (``prepare_adapter``, ``load_adapter``,
      ``unload_adapter``, ``has_free_slot``, ``slot_of``).
    mode: ``"icarus"`` or ``"isolated"`` (the adapter kind read from disk).
    stats: the engine's counters (loads, evictions, disk reads).
    log: ``log(*event)``, the engine's schedule log.
    max_host_adapters: host copies kept of disk-backed adapters (None: unbounded).
  """

  def __init__(self, runner, *, mode: str, stats: EngineStats,
               log: Callable[..., None] = lambda *e: None, max_host_adapters: int | None = None):
    self.runner = runner
    self.mode = mode
    self.stats = stats
    self._log = log
    self.max_host_adapters = max_host_adapters
    self._host: dict[str, Adapter] = {}  # host tier: adapters held in memory
    self._paths: dict[str, tuple[str, Callable]] = {}  # disk tier: name -> (path, loader)
    self._host_lru: collections.OrderedDict[str, None] = collections.OrderedDict()  # disk-backed
    self._resident: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU
    self._pinned: set = set()  # acquired in the current step: their slots may not be taken
    self._gen: dict[str, int] = {}  # every registered adapter, in order -> its load generation
    self._gens = itertools.count(1)
    self._draining: set[str] = set()

  # ------------------------------------------------------------------ registry
  def add(self, adapter: Adapter, name: str | None = None) -> str:
    """Registers ``adapter`` (held in memory); gate, fingerprint and pool fit are checked."""
    name = name or adapter.name
    self._check_new(name)
    self._host[name] = self.runner.prepare_adapter(name, adapter)
    self._gen[name] = next(self._gens)
    if self.runner.has_free_slot:  # warm it while slots are free
      self._load(name)
    return name

  def register(self, path, name: str | None = None, *,
               loader: Callable[[str, str], Adapter] | None = None) -> str:
    """Registers the adapter stored at ``path`` (read and checked now; see ``Engine``)."""
    path = str(path)
    if loader is None:
      from icarus_jax.checkpoints.peft_io import load_adapter
      kind = "icarus_lora" if self.mode == "icarus" else "lora"
      loader = lambda p, n: load_adapter(p, kind=kind, name=n)  # noqa: E731
    name = name or os.path.basename(os.path.normpath(path))
    self._check_new(name)
    adapter = self.runner.prepare_adapter(name, loader(path, name))
    self.stats.adapter_disk_reads += 1
    self._paths[name] = (path, loader)
    self._host[name] = adapter
    self._host_lru[name] = None
    self._gen[name] = next(self._gens)
    if self.runner.has_free_slot:
      self._load(name)
    self._trim_host_tier()
    return name

  def _check_new(self, name: str) -> None:
    if name in self._gen:
      raise IcarusError(f"adapter {name!r} is already registered")

  def is_servable(self, name: str | None) -> bool:
    """True for the base (None) and for registered adapters that are not being removed."""
    return name is None or (name in self._gen and name not in self._draining)

  def check_servable(self, name: str | None) -> None:
    if not self.is_servable(name):
      raise UnknownAdapterError(f"adapter {name!r} is not registered; available: {self.names}")

  def generation(self, name: str | None) -> int:
    """The adapter's load generation (0 for the base): a name registered again gets a new one."""
    return self._gen.get(name, 0)

  @property
  def names(self) -> list[str]:
    """Servable adapters, in registration order."""
    return [n for n in self._gen if n not in self._draining]

  @property
  def host_names(self) -> list[str]:
    """Adapters with a copy in host memory (registered from memory, or read from disk)."""
    return list(self._host)

  @property
  def host_copies(self) -> dict[str, Adapter]:
    """The host tier itself (name -> adapter); callers only read it."""
    return self._host

  @property
  def resident_names(self) -> list[str]:
    """Adapters in device slots, least recently used first."""
    return list(self._resident)

  # ------------------------------------------------------------------ device slots
  def begin_step(self) -> None:
    """A new scheduling step: adapters pinned by the last one may be evicted again."""
    self._pinned = set()

  def acquire(self, name: str | None, busy: Iterable[str | None]) -> int | None:
    """The device slot serving ``name`` for a request admitted in this step: loaded now if
    needed (evicting the least recently used adapter not in ``busy`` nor acquired in this
    step, see ``pin``), or None if every slot serves a busy adapter. Raises what the disk read raises."""
    if name is None:
      return self.runner.slot_of(None)
    if name not in self._resident:
      if not self.runner.has_free_slot:
        busy = set(busy) | self._pinned
        victim = next((n for n in self._resident if n not in busy), None)
        if victim is None:
          return None
        self.runner.unload_adapter(victim)
        del self._resident[victim]
        self.stats.adapter_evictions += 1
      self._load(name)
    self._resident.move_to_end(name)
    return self.runner.slot_of(name)

  def pin(self, name: str | None) -> None:
    """A request for ``name`` was admitted in this step: its slot may not be taken by another
    admission of the same step."""
    self._pinned.add(name)

  def slot_of(self, name: str | None) -> int:
    return self.runner.slot_of(name)

  def _load(self, name: str) -> None:
    self.runner.load_adapter(name, self._host_copy(name))
    self._trim_host_tier()
    self._resident[name] = None
    self.stats.adapter_loads += 1
    self._log("load", name)

  def _host_copy(self, name: str) -> Adapter:
    """The adapter's host copy, read from disk if the host tier dropped it."""
    if name not in self._host:
      path, loader = self._paths[name]
      self._host[name] = self.runner.prepare_adapter(name, loader(path, name))
      self.stats.adapter_disk_reads += 1
      self._log("disk_read", name)
    if name in self._paths:  # disk-backed: most recently used host copy
      self._host_lru[name] = None
      self._host_lru.move_to_end(name)
    return self._host[name]

  def _trim_host_tier(self) -> None:
    """Drops the least recently used host copies of disk-backed adapters past the limit."""
    if self.max_host_adapters is None:
      return
    while len(self._host_lru) > self.max_host_adapters:
      victim, _ = self._host_lru.popitem(last=False)
      del self._host[victim]

  # ------------------------------------------------------------------ removal
  def remove(self, name: str) -> None:
    """Refuses new requests for ``name`` from now on; call ``release_if_drained`` as requests
    using it end (and once now)."""
    if name not in self._gen or name in self._draining:
      raise UnknownAdapterError(f"adapter {name!r} is not registered")
    self._draining.add(name)

  def release_if_drained(self, name: str | None, in_use: bool) -> int | None:
    """If ``name`` is being removed and no request uses it (``in_use`` False), frees its slot
    and copies and returns its generation (the caller drops its cached K/V); else None."""
    if name not in self._draining or in_use:
      return None
    if name in self._resident:
      self.runner.unload_adapter(name)
      del self._resident[name]
    self._host.pop(name, None)
    self._paths.pop(name, None)
    self._host_lru.pop(name, None)
    self._draining.discard(name)
    return self._gen.pop(name)
