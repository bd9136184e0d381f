"""N engine replicas behind a routing policy, one device each (roofline runners): the projection
twin of the Ray Serve application (``serving/ray_app.py``), with the same policies
(``serving/routing.py``) in the loop.

Each replica is a full engine (every adapter registered, its own KV pool) with its own virtual
clock; replicas run in parallel. As in ``multi_instance.MultiInstance``, a discrete-event loop
always steps the replica furthest behind, and a finished request is handed back only once the
global time (the earliest busy replica's clock) reaches its finish time. ``ReplicaSet`` offers
the serving surface ``bench.run_workflows`` uses, so routed replicas run in the same harness as
one engine.
"""

from __future__ import annotations

from icarus_jax.bench.multi_instance import _Instances, _Runner
from icarus_jax.errors import IcarusError
from icarus_jax.serving.cost_model import Hardware, RooflineSimulator, VirtualClock
from icarus_jax.serving.engine import Engine, RequestOutput
from icarus_jax.serving.routing import ContextAffinity, ModelAffinity, PowerOfTwo, token_keys

POLICIES = ("context", "model", "pow2")


class ReplicaSet(_Instances):
  """``n`` replicas of one engine configuration (``engine_kw``: mode, num_pages, ...) on ``n``
  devices of ``hw``, requests routed by ``policy`` (``POLICIES``)."""

  def __init__(self, cfg, hw: Hardware, n: int, policy: str, adapters, *, imbalance: int = 4,
               seed: int = 0, **engine_kw):
    if policy not in POLICIES:
      raise IcarusError(f"policy={policy!r} is unknown; accepted: {POLICIES}")
    if n < 1:
      raise IcarusError(f"a replica set needs n >= 1 replicas, got {n}")
    self.policy_name = policy
    self.policy = {"context": lambda: ContextAffinity(imbalance=imbalance),
                   "model": ModelAffinity, "pow2": lambda: PowerOfTwo(seed)}[policy]()
    self._clocks = [VirtualClock() for _ in range(n)]
    self._idle = VirtualClock()
    replicas = {}
    for i in range(n):
      sim = RooflineSimulator(cfg, hw)
      sim.clock = self._clocks[i]
      e = Engine(cfg, None, simulator=sim, **engine_kw)
      for a in adapters:
        e.add_adapter(a)
      replicas[i] = e
    super().__init__(replicas)
    self.replicas: list[Engine] = list(replicas.values())
    self.mode = self.replicas[0].mode
    self._include_model = self.mode == "isolated"  # its cache is per model
    self.requests_per_replica = [0] * n
    self.runner = _Runner(self)

  # ------------------------------------------------------------------ time
  def _busy(self) -> list[int]:
    return [i for i, e in enumerate(self.replicas) if e.has_work]

  def clock(self) -> float:
    busy = self._busy()
    if busy:
      return min(self._clocks[i]() for i in busy)
    return max([self._idle()] + [c() for c in self._clocks])

  # ------------------------------------------------------------------ serving surface
  def _key(self, prompt, adapter):
    if self.policy_name == "context":
      salt = f"model={adapter}|" if self._include_model else ""
      return token_keys(prompt, self.replicas[0].page_size, salt)
    return adapter

  def submit(self, prompt, adapter: str | None = None, sampling=None, **kw) -> int:
    now = self.clock()
    loads = {i: len(e.running) + len(e.waiting) for i, e in enumerate(self.replicas)}
    key = self._key(prompt, adapter)
    i = self.policy.rank(key, loads)[0]
    self.policy.record(key, i)
    self._clocks[i].advance_to(now)
    rid = self.replicas[i].submit(prompt, adapter, sampling, **kw)
    gid = next(self._ids)  # ids unique across replicas
    self.replicas[i].outputs[rid].request_id = gid
    self.requests_per_replica[i] += 1
    return gid

  def step(self) -> list[RequestOutput]:
    busy = self._busy()
    if busy:
      i = min(busy, key=lambda i: self._clocks[i]())
      self._done += self.replicas[i].step()
    now = self.clock()
    ready = [o for o in self._done if o.finish_time <= now]
    self._done = [o for o in self._done if o.finish_time > now]
    return sorted(ready, key=lambda o: o.finish_time)

  def snapshot(self) -> dict:
    out = super().snapshot()
    out["replicas"] = out.pop("instances")
    counts = self.requests_per_replica
    out["load_imbalance"] = max(counts) / (sum(counts) / len(counts)) if sum(counts) else 1.0
    return out
