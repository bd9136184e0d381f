"""The conventional multi-model system: one engine instance per model (roofline runners).

Each of the N models is a separately fine-tuned model with its own weights and its own KV
slice; nothing is batched across models. Instances placed on the same GPU time-share it: their
steps run one after another on that GPU's virtual clock. GPUs run in parallel, each on its own
clock; a discrete-event loop always advances the GPU that is furthest behind, and a finished
request is handed back only once the global time (the earliest busy GPU's clock) reaches its
finish time, so a workflow's next turn is never sent before its previous turn ended.

``MultiInstance`` offers the engine's serving surface that ``bench.run_workflows`` uses
(``submit``, ``step``, ``has_work``, ``clock``, ``runner.wait_until``, ``stats``, ``snapshot``,
``bytes_per_page``), so every system runs in the same harness. ``SharedDeviceInstances`` is the
same system measured for real: N real engines (each its own weights and KV pool) time-sharing
this process's device on the wall clock, one instance's step at a time.

Memory: ``instance_layout(cfg, hw, n_models, gpus)`` splits each GPU's memory as vLLM's
``gpu_memory_utilization`` accounting would for ``k`` co-located instances: usable memory minus
``k`` copies of the weights and ``k`` activation workspaces, the rest divided evenly into ``k``
KV pools.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from icarus_jax.model.config import ModelConfig
from icarus_jax.serving.cost_model import Hardware, RooflineSimulator, VirtualClock, activation_bytes
from icarus_jax.serving.engine import Engine, EngineStats, RequestOutput
from icarus_jax.errors import IcarusError


@dataclasses.dataclass(frozen=True)
class InstanceLayout:
  """Where ``n_models`` instances go: ``gpus`` GPUs, ``per_gpu[g]`` instances on GPU ``g``,
  ``kv_pages`` pages of ``page_size`` tokens per instance (bytes in ``kv_bytes``)."""

  n_models: int
  gpus: int
  per_gpu: tuple[int, ...]
  kv_pages: int
  kv_bytes: float
  weights_bytes: float
  activation_bytes: float

  def gpu_of(self, model: int) -> int:
    """Instances are spread round-robin over the GPUs."""
    return model % self.gpus


def min_gpus(cfg: ModelConfig, hw: Hardware, n_models: int, *, bytes_per_param: int = 2) -> int:
  """``ceil(N x weights / memory)``: the GPU count at which N model copies fit by weight."""
  w = RooflineSimulator(cfg, hw, bytes_per_param=bytes_per_param).weight_bytes
  return max(1, math.ceil(n_models * w / hw.memory_bytes))


def instance_layout(cfg: ModelConfig, hw: Hardware, n_models: int, gpus: int = 1, *,
                    utilization: float = 0.9, page_size: int = 16,
                    max_tokens_per_step: int = 8192, bytes_per_param: int = 2) -> InstanceLayout:
  """Memory split of ``n_models`` instances over ``gpus`` GPUs (see the module docstring).

  Raises if the busiest GPU cannot hold its instances' weights and workspaces.
  """
  if n_models < 1 or gpus < 1:
    raise IcarusError(f"n_models and gpus must be >= 1, got {n_models}, {gpus}")
  per_gpu = tuple(sum(1 for m in range(n_models) if m % gpus == g) for g in range(gpus))
  k = max(per_gpu)
  sim = RooflineSimulator(cfg, hw, bytes_per_param=bytes_per_param)
  act = activation_bytes(cfg, max_tokens_per_step, bytes_per_param)
  # for k = 1 this is ``kv_budget`` with no adapter slots, operation for operation
  kv = (hw.memory_bytes * utilization - k * sim.weight_bytes - k * act) / k
  if kv <= 0:
    raise IcarusError(f"{k} instances of {cfg.name} do not fit one {hw.name}: weights "
                      f"{k * sim.weight_bytes / 1e9:.4g} GB + workspaces {k * act / 1e9:.4g} GB "
                      f"exceed {utilization:.0%} of {hw.memory_bytes / 1e9:.4g} GB")
  pages = int(kv // (sim.kv_bytes_per_token * page_size))
  return InstanceLayout(n_models, gpus, per_gpu, pages, kv, sim.weight_bytes, act)


class _Instances:
  """What every N-instance system shares: routing a request to its model's instance, request
  ids unique across instances, summed statistics. Subclasses decide time and step order."""

  mode = "multi_instance"

  def __init__(self, instances: dict[str, Engine]):
    if not instances:
      raise IcarusError("an N-instance system needs at least one instance")
    self.instances = dict(instances)
    self.names = list(instances)
    self._done: list[RequestOutput] = []
    self._ids = itertools.count()

  def _route(self, adapter: str | None) -> Engine:
    if adapter not in self.instances:
      raise IcarusError(f"model {adapter!r} is not one of {self.names}")
    return self.instances[adapter]

  def submit(self, prompt, adapter: str | None = None, sampling=None, **kw) -> int:
    """Sends to the instance serving model ``adapter`` (its base: a full model)."""
    eng = self._route(adapter)
    rid = eng.submit(prompt, None, sampling, **kw)
    grid = next(self._ids)  # ids unique across instances
    eng.outputs[rid].request_id = grid
    eng.outputs[rid].adapter = adapter
    return grid

  @property
  def has_work(self) -> bool:
    return bool(self._done) or any(e.has_work for e in self.instances.values())

  @property
  def stats(self) -> EngineStats:
    st = EngineStats()
    for e in self.instances.values():
      for f in dataclasses.fields(EngineStats):
        if f.name != "per_adapter":
          setattr(st, f.name, getattr(st, f.name) + getattr(e.stats, f.name))
    return st

  def bytes_per_page(self) -> int:
    return next(iter(self.instances.values())).bytes_per_page()

  def snapshot(self) -> dict:
    snaps = [e.snapshot() for e in self.instances.values()]
    out = {k: sum(s[k] for s in snaps) for k, v in snaps[0].items()
           if isinstance(v, (int, float)) and k != "bytes_per_page"}
    out["bytes_per_page"] = snaps[0]["bytes_per_page"]
    out["instances"] = len(snaps)
    return out


class _Runner:
  """``runner.wait_until`` of the whole system: idle GPUs catch up to the given time."""

  def __init__(self, owner: "MultiInstance"):
    self._owner = owner

  def wait_until(self, t: float) -> None:
    self._owner._idle.advance_to(t)


class MultiInstance(_Instances):
  """N conventional model instances on ``layout.gpus`` GPUs (virtual clocks).

  ``engine_kw`` are passed to each instance's ``Engine`` (``mode="isolated"``: a full model of
  its own, base weights read by every step of every instance).
  """

  def __init__(self, cfg: ModelConfig, hw: Hardware, names: list[str], layout: InstanceLayout,
               **engine_kw):
    if len(names) != layout.n_models:
      raise IcarusError(f"{len(names)} names for a layout of {layout.n_models} models")
    self.layout = layout
    self._clocks = [VirtualClock() for _ in range(layout.gpus)]
    self._idle = VirtualClock()
    instances: dict[str, Engine] = {}
    self._gpu: dict[str, int] = {}
    for m, name in enumerate(names):
      sim = RooflineSimulator(cfg, hw)
      g = layout.gpu_of(m)
      sim.clock = self._clocks[g]  # instances on one GPU share its clock: their steps serialize
      instances[name] = Engine(cfg, None, mode="isolated", num_pages=layout.kv_pages + 1,
                               simulator=sim, **engine_kw)
      self._gpu[name] = g
    super().__init__(instances)
    self._rr = {g: 0 for g in range(layout.gpus)}
    self.runner = _Runner(self)

  # ------------------------------------------------------------------ time
  def _busy(self) -> list[int]:
    return sorted({self._gpu[n] for n, e in self.instances.items() if e.has_work})

  def clock(self) -> float:
    """Global time: the earliest busy GPU's clock (nothing can happen before it)."""
    busy = self._busy()
    if busy:
      return min(self._clocks[g]() for g in busy)
    return max([self._idle()] + [c() for c in self._clocks])

  # ------------------------------------------------------------------ serving surface
  def submit(self, prompt, adapter: str | None = None, sampling=None, **kw) -> int:
    now = self.clock()
    self._route(adapter)
    self._clocks[self._gpu[adapter]].advance_to(now)
    return super().submit(prompt, adapter, sampling, **kw)

  def step(self) -> list[RequestOutput]:
    """One step of one instance on the GPU furthest behind (round-robin among its busy
    instances); returns the requests whose finish time the global clock has reached."""
    busy = self._busy()
    if busy:
      g = min(busy, key=lambda g: self._clocks[g]())
      names = [n for n in self.names if self._gpu[n] == g and self.instances[n].has_work]
      name = names[self._rr[g] % len(names)]
      self._rr[g] += 1
      self._done += self.instances[name].step()
    now = self.clock()
    ready = [o for o in self._done if o.finish_time <= now]
    self._done = [o for o in self._done if o.finish_time > now]
    return sorted(ready, key=lambda o: o.finish_time)

  def snapshot(self) -> dict:
    return {**super().snapshot(), "gpus": self.layout.gpus}


class SharedDeviceInstances(_Instances):
  """N real engines (``mode="isolated"``, each its own weights and KV pool) time-sharing this
  process's device: the conventional multi-model system, measured on the wall clock.

  ``step`` runs one step of one busy instance, round-robin: nothing is batched across models,
  and an instance waits while another one computes. ``clock`` and ``runner.wait_until`` are the
  instances' own (wall clock; they must share one).
  """

  def __init__(self, instances: dict[str, Engine]):
    super().__init__(instances)
    first = next(iter(self.instances.values()))
    for name, e in self.instances.items():
      if e.mode != "isolated":
        raise IcarusError(f"instance {name!r} runs mode {e.mode!r}; a conventional instance "
                          "is a full model of its own (mode='isolated')")
      if e.clock is not first.clock:
        raise IcarusError("instances must share one clock (the device's wall clock)")
    self.clock = first.clock
    self.runner = first.runner
    self._rr = 0

  def step(self) -> list[RequestOutput]:
    busy = [n for n in self.names if self.instances[n].has_work]
    if not busy:
      return []
    name = busy[self._rr % len(busy)]
    self._rr += 1
    return self.instances[name].step()
