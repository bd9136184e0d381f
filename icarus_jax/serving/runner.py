"""Runners: what executes the steps the scheduler (``engine.Engine``) plans.

The scheduler owns every host-side decision (admission, chunking, page reservation, prefix
cache, preemption, which adapter sits in which device slot); a runner owns what a step costs
and produces. Two implementations share one interface, so one scheduler drives both:

* :class:`DeviceRunner`: the KV pages, the adapter pool's weights, the jitted steps, sampling,
  mesh placement (``shard``; the step is then jitted with explicit ``in_shardings`` /
  ``out_shardings`` from the logical axis rules, the Pallas attention inside ``shard_map``).
* :class:`RooflineRunner`: no arrays; each step advances a virtual clock by the roofline time
  of ``cost_model.RooflineSimulator`` (a projection of the same schedule to real hardware).

Interface (both):
  clock() -> float                         the engine's time (wall or virtual)
  fingerprint: str                         the base's identity (prefix-cache namespace)
  bytes_per_page: int                      KV bytes of one page over all layers
  prepare_adapter(name, adapter) -> Adapter   validate for this runner; the host-tier copy
  has_free_slot; load_adapter(name, adapter) -> slot; unload_adapter(name); slot_of(name)
  copy_page(src, dst)                      copy-on-write of a partially shared page
  execute(step) -> StepResult              one step (``step_batch.Step``; donated pages): each
                                           real row's next token (and logprobs when asked),
                                           sampled on the device under the row's parameters
  wait_until(t)                            idle until the clock reads ``t``
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import zlib
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from icarus_jax.serving import engine_steps
from icarus_jax.serving.adapter_pool import BASE_SLOT, AdapterPool, SlotTable
from icarus_jax.model.adapters import Adapter, check_adapter
from icarus_jax.model.config import ModelConfig
from icarus_jax.serving.cost_model import RooflineSimulator
from icarus_jax.serving.engine_config import ATTENTION_BACKENDS
from icarus_jax.errors import IcarusError
from icarus_jax.model.params import Params, base_fingerprint
from icarus_jax.serving.sampling import MAX_TOP_LOGPROBS, sample_step
from icarus_jax.serving import step_batch
from icarus_jax.serving.step_batch import Step, StepBatch

ATTENTION_FNS = {"reference": engine_steps.paged_attention_reference,
                 "pallas": engine_steps.paged_attention_pallas}
assert tuple(ATTENTION_FNS) == ATTENTION_BACKENDS, "engine_config.ATTENTION_BACKENDS names them"



@dataclasses.dataclass
class StepResult:
  """A step's outcome on the host, for its ``n`` real rows (one device-to-host transfer).

  tokens ``[n]`` int; logprob ``[n]`` float (the sampled token's; ``None`` when no row asked);
  top_ids / top_logprobs ``[n, MAX_TOP_LOGPROBS]`` (``None`` when no row asked).
  """

  tokens: np.ndarray
  logprob: np.ndarray | None = None
  top_ids: np.ndarray | None = None
  top_logprobs: np.ndarray | None = None

  def row(self, i: int, k: int | None) -> tuple[int, "TokenLogprobs | None"]:
    """Row ``i``'s token and, when ``k`` is not None, its logprob entry with ``k`` alternatives."""
    t = int(self.tokens[i])
    if k is None or self.logprob is None:
      return t, None
    top = tuple((int(a), float(b)) for a, b in zip(self.top_ids[i, :k], self.top_logprobs[i, :k]))
    return t, TokenLogprobs(float(self.logprob[i]), top)

  @staticmethod
  def concat(parts: "Sequence[StepResult]") -> "StepResult":
    """The rows of ``parts`` in order (a batch re-run row by row)."""
    if not parts:
      return StepResult(np.zeros((0,), np.int32))
    cat = lambda xs: None if any(x is None for x in xs) else np.concatenate(xs)  # noqa: E731
    return StepResult(np.concatenate([p.tokens for p in parts]), cat([p.logprob for p in parts]),
                      cat([p.top_ids for p in parts]), cat([p.top_logprobs for p in parts]))


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
  """One generated token's logprob and its most likely alternatives ``((id, logprob), ...)``."""

  logprob: float
  top: tuple[tuple[int, float], ...]


class Runner(Protocol):
  fingerprint: str
  bytes_per_page: int

  def clock(self) -> float: ...
  def prepare_adapter(self, name: str, adapter: Adapter) -> Adapter: ...
  @property
  def has_free_slot(self) -> bool: ...
  def load_adapter(self, name: str, adapter: Adapter) -> int: ...
  def unload_adapter(self, name: str) -> None: ...
  def slot_of(self, name: str | None) -> int: ...
  def copy_page(self, src: int, dst: int) -> None: ...
  def execute(self, step: Step) -> StepResult: ...
  def state_lost(self) -> bool: ...
  def wait_until(self, t: float) -> None: ...


def _page_bytes(cfg: ModelConfig, page_size: int, itemsize: int) -> int:
  return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * itemsize


def mesh_shardings(cfg: ModelConfig, base, pool_weights, mesh, rules: dict) -> dict:
  """``{"base", "pool", "pages"}`` NamedShardings on ``mesh`` from the logical ``rules``.

  ``base`` and ``pool_weights`` may be arrays or ``ShapeDtypeStruct`` trees (only their keys
  are read), so an ahead-of-time compile (``icarus_jax.bench.aot``) derives exactly the
  shardings a live runner uses."""
  from icarus_jax.model.sharding import (PAGES_AXES, _spec, base_logical_axes, check_divisible,
                                         pool_logical_axes, shardings)
  check_divisible(cfg, mesh)
  return {"base": shardings(base_logical_axes(cfg, base), mesh, rules),
          "pool": shardings(pool_logical_axes(pool_weights), mesh, rules),
          "pages": NamedSharding(mesh, _spec(PAGES_AXES, rules))}


def rows_split(mesh, B: int) -> bool:
  """Whether a bucket of ``B`` rows is split over the mesh's ``data`` axis (it must divide)."""
  d = mesh.shape["data"]
  return d > 1 and B % d == 0


def mesh_attention(backend: str, mesh, rules: dict, split_rows: bool
                   ) -> engine_steps.ShardedAttention:
  """The step's attention on ``mesh``, for both backends: per device inside ``shard_map``, rows
  over ``data`` when ``split_rows``, kv heads over the axis ``rules["kv_heads"]`` names (when it
  spans more than one device). GSPMD cannot partition the Pallas custom call, and partitions the
  jnp gather by gathering rows; here no device attends for a row it does not own."""
  kv_axis = rules.get("kv_heads")
  kv_axis = kv_axis if kv_axis and mesh.shape[kv_axis] > 1 else None
  return engine_steps.ShardedAttention(ATTENTION_FNS[backend], mesh, head_axis=kv_axis,
                                       row_axis="data" if split_rows else None)


def jit_mesh_step(cfg: ModelConfig, mode: str, backend: str, mesh, rules: dict, sh: dict,
                  split_rows: bool):
  """``engine_steps.serving_step`` jitted for ``mesh`` with explicit in/out shardings (``sh``
  from :func:`mesh_shardings`), the pool donated; batch rows over ``data`` when ``split_rows``.
  The batch's ``sampling`` is None (the model does not read it).
  """
  rows = NamedSharding(mesh, P("data") if split_rows else P())
  batch_sh = StepBatch(*[rows] * (len(step_batch.ARRAY_FIELDS) - 1), None)
  logits_sh = NamedSharding(mesh, P("data" if split_rows else None, None))
  attn = mesh_attention(backend, mesh, rules, split_rows)
  return jax.jit(functools.partial(engine_steps.serving_step, cfg, mode, attn_fn=attn),
                 in_shardings=(sh["base"], sh["pool"], sh["pages"], batch_sh),
                 out_shardings=(logits_sh, sh["pages"]), donate_argnums=(2,))


class DeviceRunner:
  """Pages, adapter pool and jitted steps on the default device or a mesh.

  Args: the frozen base, ``mode`` (``"icarus"``: :func:`engine_steps.icarus_forward`;
  ``"isolated"``: the conventional step), pool sizes, ``attention_backend`` and ``max_batch``
  (sampling pads to the same batch buckets as the step).
  """

  def __init__(self, cfg: ModelConfig, base: Params, *, mode: str, num_pages: int,
               page_size: int, max_adapters: int, max_rank: int, targets: Sequence[str],
               attention_backend: str = "reference", max_batch: int = 8):
    if attention_backend not in ATTENTION_BACKENDS:
      raise IcarusError(f"attention_backend={attention_backend!r} is unknown; accepted: "
                        f"{ATTENTION_BACKENDS}")
    self.cfg, self.base, self.mode = cfg, base, mode
    self.max_batch = max_batch
    self.clock = time.perf_counter
    self.fingerprint = base_fingerprint(cfg, base)
    self.pool = AdapterPool(cfg, capacity=max_adapters, max_rank=max_rank, targets=tuple(targets))
    self.pages = jnp.zeros(engine_steps.pool_shape(cfg, num_pages, page_size), cfg.jnp_dtype)
    self.bytes_per_page = _page_bytes(cfg, page_size, jnp.dtype(cfg.dtype).itemsize)
    self.attention_backend = attention_backend
    self.attn = ATTENTION_FNS[attention_backend]
    self.mesh = None
    self._rules: dict = {}
    self._shardings: dict | None = None
    self._jits: dict = {}

  # ------------------------------------------------------------------ placement
  def shard(self, mesh, rules: dict) -> None:
    """Places base, adapter pool and pages on ``mesh`` by the logical ``rules`` and jits the
    step with those shardings (:func:`mesh_shardings`, :func:`jit_mesh_step`); attention runs
    per device inside ``shard_map`` (``engine_steps.ShardedAttention``)."""
    sh = mesh_shardings(self.cfg, self.base, self.pool.weights, mesh, rules)
    self.base = jax.device_put(self.base, sh["base"])
    self.pool.weights = jax.device_put(self.pool.weights, sh["pool"])
    self.pages = jax.device_put(self.pages, sh["pages"])
    self.mesh, self._shardings, self._jits = mesh, sh, {}
    self._rules = rules

  def sharded_attention(self, split_rows: bool) -> engine_steps.ShardedAttention:
    """The attention of this runner's step on its mesh (:func:`mesh_attention`)."""
    return mesh_attention(self.attention_backend, self.mesh, self._rules, split_rows)

  def _step_fn(self, B: int):
    """The jitted step for batch bucket ``B``: without a mesh the module-level jit; on a mesh
    :func:`jit_mesh_step` (batch rows over ``data`` when ``B`` divides, else replicated)."""
    if self.mesh is None:
      return functools.partial(engine_steps.step, self.cfg, self.mode, attn_fn=self.attn)
    split = rows_split(self.mesh, B)
    if split not in self._jits:
      self._jits[split] = jit_mesh_step(self.cfg, self.mode, self.attention_backend, self.mesh,
                                        self._rules, self._shardings, split)
    return self._jits[split]

  def compiled_steps(self) -> int:
    """Compiled step programs so far (tests: adapters moving between tiers never recompile)."""
    if self.mesh is None:
      return engine_steps.step._cache_size()
    return sum(j._cache_size() for j in self._jits.values())

  # ------------------------------------------------------------------ adapters
  def prepare_adapter(self, name: str, adapter: Adapter) -> Adapter:
    check_adapter(self.cfg, self.base, adapter, require_icarus=(self.mode == "icarus"),
                  fingerprint=self.fingerprint)
    if self.mode == "isolated" and adapter.config.is_icarus:
      raise IcarusError(f"isolated mode serves conventional models; adapter {name!r} is of "
                        f"kind {adapter.kind!r} (use kind='lora')")
    self.pool.check(name, adapter)
    return jax.tree_util.tree_map(np.asarray, adapter)  # the host tier holds it

  @property
  def has_free_slot(self) -> bool:
    return self.pool.has_free_slot

  def load_adapter(self, name: str, adapter: Adapter) -> int:
    slot = self.pool.add(name, adapter)
    self._keep_placement()
    return slot

  def unload_adapter(self, name: str) -> None:
    self.pool.remove(name)
    self._keep_placement()

  def slot_of(self, name: str | None) -> int:
    return BASE_SLOT if name is None else self.pool.slots[name]

  def _keep_placement(self) -> None:
    if self._shardings is not None:  # a no-op unless an update changed the layout
      self.pool.weights = jax.device_put(self.pool.weights, self._shardings["pool"])
      self.pages = jax.device_put(self.pages, self._shardings["pages"])

  # ------------------------------------------------------------------ steps
  def copy_page(self, src: int, dst: int) -> None:
    self.pages = engine_steps.copy_pages(self.pages, jnp.array([src], jnp.int32),
                                         jnp.array([dst], jnp.int32))
    self._keep_placement()

  def state_lost(self) -> bool:
    """True when the KV pool was donated to a program that then failed (its buffers are
    deleted): no request can run again on this runner."""
    return bool(self.pages.is_deleted())

  def execute(self, step: Step) -> StepResult:
    """Runs ``step``: the model program, then each row's sampling on its logits
    (``sampling.sample_step``, dispatched without a host sync), then one transfer of the rows'
    tokens (and logprobs when a row asked) to the host."""
    lp = step.with_logprobs
    b = step.batch
    fn = self._step_fn(b.shape[0])
    logits, self.pages = fn(self.base, self.pool.weights, self.pages,
                            dataclasses.replace(b, sampling=None))
    out = sample_step(logits, b.sampling, num_top=MAX_TOP_LOGPROBS, with_logprobs=lp)
    n = step.num_rows
    if not lp:
      return StepResult(np.asarray(out.tokens)[:n])
    o = jax.device_get(out)
    return StepResult(o.tokens[:n], o.logprob[:n], o.top_ids[:n], o.top_logprobs[:n])

  def wait_until(self, t: float) -> None:
    """Idles until ``clock() >= t`` (nothing to run before then)."""
    time.sleep(max(0.0, t - self.clock()))

  def context_kv(self, ids: Sequence[int], slot: int, *, page_size: int, prefill_chunk: int,
                 max_pages: int) -> np.ndarray:
    """The K/V the serving step writes for ``ids`` with adapter ``slot``, in a scratch pool
    (the live pages are untouched): ``[L, len(ids), 2K, hd]``. See ``Engine.context_kv``."""
    cfg = self.cfg
    n_pages = math.ceil(len(ids) / page_size)
    pages = jnp.zeros(engine_steps.pool_shape(cfg, n_pages + 1, page_size), cfg.jnp_dtype)
    table = list(range(1, n_pages + 1))
    for start in range(0, len(ids), prefill_chunk):
      k = min(prefill_chunk, len(ids) - start)
      st = step_batch.build([step_batch.StepRow(ids, start, k, table, slot)], decode=False,
                            max_batch=1, prefill_chunk=prefill_chunk, max_pages=max_pages)
      attn = self.attn if self.mesh is None else self.sharded_attention(False)
      _, pages = engine_steps.step(cfg, self.mode, self.base, self.pool.weights, pages,
                                   dataclasses.replace(st.batch, sampling=None), attn_fn=attn)
    kv = np.asarray(pages)[:, 1:].transpose(0, 1, 3, 2, 4).reshape(
        cfg.num_layers, n_pages * page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
    return kv[:, :len(ids)]


class RooflineRunner:
  """No arrays: each step advances ``simulator``'s virtual clock by its roofline time.

  Tokens are deterministic stand-ins (the workload fixes output lengths, like ``--ignore-eos``),
  so the schedule equals the device runner's whenever outputs do not feed later prompts.
  """

  def __init__(self, simulator: RooflineSimulator, *, mode: str, page_size: int,
               max_adapters: int):
    self.sim = simulator
    self.mode = mode
    self.clock = simulator.clock
    self.fingerprint = f"simulated:{simulator.cfg.name}"
    self.page_size = page_size
    self.bytes_per_page = int(simulator.kv_bytes_per_token * page_size)
    self._slots = SlotTable(max_adapters)

  def prepare_adapter(self, name: str, adapter: Adapter) -> Adapter:
    del name
    return adapter

  @property
  def has_free_slot(self) -> bool:
    return self._slots.has_free_slot

  def load_adapter(self, name: str, adapter: Adapter) -> int:
    del adapter
    return self._slots.take(name)

  def unload_adapter(self, name: str) -> None:
    self._slots.release(name)

  def slot_of(self, name: str | None) -> int:
    return BASE_SLOT if name is None else self._slots.slots[name]

  def copy_page(self, src: int, dst: int) -> None:
    del src, dst

  def state_lost(self) -> bool:
    return False  # no device state

  def execute(self, step: Step) -> StepResult:
    dt = self.sim.price(step, self.page_size, self.mode == "icarus")
    self.clock.advance(dt)
    self.sim.total_time += dt
    self.sim.steps += 1
    return StepResult(np.array([32 + zlib.crc32(f"{r.request_id}/{r.counter}".encode()) % 95
                                for r in step.rows], np.int32))

  def wait_until(self, t: float) -> None:
    self.clock.advance_to(t)

  def context_kv(self, *args, **kwargs):
    raise IcarusError("context_kv needs the device runner (the roofline runner holds no K/V)")
