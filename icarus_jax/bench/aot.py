"""Compile where users run it, without the device: libtpu ahead of time, and the CUDA lowering.

libtpu (``pip install "jax[tpu]"`` of the project's jax version) compiles for a TPU topology on
a host with no TPU: :func:`tpu_mesh` builds a ``(data, model)`` mesh of compile-only devices from
``jax.experimental.topologies``, every input is a ``ShapeDtypeStruct`` carrying its
``NamedSharding``, and ``jit(...).lower(...).compile()`` runs libtpu's real compiler, Mosaic
included (``jax.export(platforms=["tpu"])`` only lowers and misses Mosaic's layout checks).
Nothing is allocated: an 8B model and a 10k-page pool are shapes only.

What a compiled program is asked (:func:`analyse`):
  * per-device argument / output / alias / temporary bytes (``memory_analysis``): does it fit;
  * ``cost_analysis`` flops and bytes accessed, and the sum of libtpu's per-instruction
    estimated cycles in the optimized HLO (a ``while`` body, the layer scan, is counted once:
    :func:`per_layer` compiles the scan unrolled by 1 and 2 and takes the difference);
  * copies, transposes and collectives (all-gather, all-to-all, all-reduce, collective-permute)
    whose operand or result has the shape of the KV pool or of one device's shard of it: an
    in-place step has none.

The cases (serving step: icarus / isolated x reference / Pallas x decode / prefill buckets;
the kernels at real head layouts; the ICaRus-LoRA training step) are built here once and used by
``tests/test_tpu_aot.py`` and ``benchmarks/tpu_aot.py``. Every step is the project's own: the
serving step is :func:`icarus_jax.serving.runner.jit_mesh_step` with the shardings
:func:`~icarus_jax.serving.runner.mesh_shardings` derives, exactly what ``DeviceRunner.shard``
runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from icarus_jax.model.adapters import DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS
from icarus_jax.model.config import ModelConfig
from icarus_jax.model.params import init_base_params
from icarus_jax.model.sharding import AXES, load_rules
from icarus_jax.serving import engine_steps
from icarus_jax.serving.adapter_pool import AdapterPool
from icarus_jax.serving.runner import jit_mesh_step, mesh_shardings, rows_split
from icarus_jax.serving.step_batch import StepBatch

#: libtpu refuses programs over this many bytes per device (its usable HBM).
HBM_LIMIT = {"v5e": 15.75 * 2**30, "v6e": 31.25 * 2**30}

COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")


def libtpu_missing() -> str | None:
  """None if libtpu is installed, else why the TPU compiles cannot run (for ``pytest.skip``).

  Installed but unusable (no topology) is not "missing": the first compile raises libtpu's own
  error, so a broken install fails the tests instead of skipping them."""
  if importlib.util.find_spec("libtpu") is None:
    return ("libtpu is not installed (pip install -r requirements-aot.txt: jax[tpu] of the "
            "project's jax version)")
  return None


@functools.cache
def topology(name: str):
  """Compile-only TPU devices of ``name`` (``"v5e:2x4"``, ``"v6e:2x4"``; v5e needs 2x2 tiles)."""
  from jax.experimental import topologies
  return topologies.get_topology_desc(topology_name=name, platform="tpu")


def tpu_mesh(name: str, data: int, model: int) -> Mesh:
  """A ``(data, model)`` mesh over the first ``data * model`` devices of topology ``name``."""
  devs = topology(name).devices
  if data * model > len(devs):
    raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices; "
                     f"topology {name} has {len(devs)}")
  return Mesh(np.array(devs[:data * model]).reshape(data, model), AXES)


def chip(topology_name: str) -> str:
  return topology_name.split(":")[0]


def structs(tree, shardings):
  """``ShapeDtypeStruct`` tree with each leaf's sharding (``shardings`` a matching tree or one)."""
  if isinstance(shardings, NamedSharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def base_shapes(cfg: ModelConfig):
  """The base's parameter tree as shapes (nothing allocated)."""
  return jax.eval_shape(lambda: init_base_params(cfg, jax.random.key(0)))


def adapter_pool_shapes(cfg: ModelConfig, mode: str, slots: int, rank: int):
  targets = DEFAULT_ICARUS_TARGETS if mode == "icarus" else DEFAULT_LORA_TARGETS
  return jax.eval_shape(
      lambda: AdapterPool(cfg, capacity=slots, max_rank=rank, targets=targets).weights)


# ----------------------------------------------------------------------------- analysis


def _shape_re(shapes) -> re.Pattern:
  alts = "|".join(",".join(map(str, s)) for s in shapes)
  return re.compile(r"\[(?:" + alts + r")\]")


def hlo_ops_on(hlo: str, ops, shapes) -> list[str]:
  """Optimized-HLO instructions ``op(`` for ``op`` in ``ops`` whose result or operand has one of
  ``shapes`` (any element type and layout)."""
  pat = _shape_re(shapes)
  opre = re.compile(r"\s(" + "|".join(re.escape(o) for o in ops) + r")(-start)?\(")
  return [l.strip()[:300] for l in hlo.splitlines() if opre.search(l) and pat.search(l)]


def estimated_cycles(hlo: str) -> int:
  """Sum of libtpu's per-instruction ``estimated_cycles`` annotations in the optimized HLO
  (instructions inside a ``while`` body counted once, like ``cost_analysis``)."""
  return sum(int(m) for m in re.findall(r'"?estimated_cycles"?\s*[:=]\s*"?(\d+)', hlo))


def pool_shard_shapes(pool_shape: tuple[int, ...], mesh: Mesh, spec: P) -> list[tuple[int, ...]]:
  """The pool's global shape, its flat ``[L * P, ...]`` view, and the per-device shard of both."""
  shard = list(pool_shape)
  for i, ax in enumerate(spec):
    if ax is not None:
      shard[i] //= mesh.shape[ax]
  out = []
  for s in (tuple(pool_shape), tuple(shard)):
    out += [s, (s[0] * s[1],) + s[2:]]
  return out


@dataclasses.dataclass
class Report:
  """What one compile gave. Bytes are per device."""

  case: str
  ok: bool
  error: str = ""
  compile_s: float = 0.0
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  flops: float = 0.0
  bytes_accessed: float = 0.0
  estimated_cycles: int = 0
  pool_copies: list = dataclasses.field(default_factory=list)
  pool_collectives: list = dataclasses.field(default_factory=list)
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def peak_bytes(self) -> int:
    """Live bytes per device: arguments + outputs not aliased to them + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["peak_bytes"] = self.peak_bytes
    return d


def analyse(case: str, lower: Callable[[], Any], *, pool_shapes=(), mesh=None) -> Report:
  """Compiles ``lower()`` (a ``Lowered``) under ``mesh`` and reports; a compile error is a
  report with ``ok=False`` and the compiler's message (never raised)."""
  t0 = time.perf_counter()
  try:
    if mesh is not None:
      with jax.set_mesh(mesh):  # Pallas' TPU lowering reads the device kind from the mesh
        compiled = lower().compile()
    else:
      compiled = lower().compile()
  except Exception as e:  # noqa: BLE001 - the compiler's message is the result
    return Report(case, False, error=f"{type(e).__name__}: {str(e)[:1500]}",
                  compile_s=time.perf_counter() - t0)
  dt = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  ca = compiled.cost_analysis() or {}
  if isinstance(ca, list):
    ca = ca[0] if ca else {}
  hlo = compiled.as_text()
  r = Report(case, True, compile_s=dt, argument_bytes=int(ma.argument_size_in_bytes),
             output_bytes=int(ma.output_size_in_bytes), alias_bytes=int(ma.alias_size_in_bytes),
             temp_bytes=int(ma.temp_size_in_bytes),
             code_bytes=int(ma.generated_code_size_in_bytes),
             flops=float(ca.get("flops", 0.0)), bytes_accessed=float(ca.get("bytes accessed", 0.0)),
             estimated_cycles=estimated_cycles(hlo))
  if pool_shapes:
    r.pool_copies = hlo_ops_on(hlo, ("copy", "transpose"), pool_shapes)
    r.pool_collectives = hlo_ops_on(hlo, COLLECTIVES, pool_shapes)
  return r


# ----------------------------------------------------------------------------- the serving step


@dataclasses.dataclass(frozen=True)
class StepCase:
  """One serving-step program: a model on a mesh, an engine mode and backend, a bucket."""

  cfg: ModelConfig
  topology: str = "v5e:2x4"
  data: int = 2
  model: int = 4
  mode: str = "icarus"            # icarus | isolated
  backend: str = "reference"      # reference | pallas
  B: int = 64
  T: int = 1                      # 1: decode bucket; > 1: prefill bucket
  N: int = 512                    # pages per row
  num_pages: int = 10_000
  page_size: int = 16
  adapter_slots: int = 8
  rank: int = 16
  unroll: int = 1                 # layer-scan unroll (per-layer costs: :func:`per_layer`)

  @property
  def name(self) -> str:
    kind = "decode" if self.T == 1 else "prefill"
    return (f"{self.cfg.name}/{self.topology}/data{self.data}xmodel{self.model}/{self.mode}/"
            f"{self.backend}/{kind}B{self.B}xT{self.T}xN{self.N}/P{self.num_pages}")

  @property
  def pool_shape(self) -> tuple[int, ...]:
    return engine_steps.pool_shape(self.cfg, self.num_pages, self.page_size)


def batch_structs(c: StepCase, rows: NamedSharding | None = None) -> StepBatch:
  """The bucket ``(B, T, N)`` of ``c`` as a ``StepBatch`` of shapes (rows sharded by ``rows``)."""
  def s(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  B, T, N = c.B, c.T, c.N
  return StepBatch(tokens=s((B, T)), positions=s((B, T)), valid=s((B, T), jnp.bool_),
                   page_table=s((B, N)), slots=s((B,)), dec_token=s((B,)), dec_pos=s((B,)),
                   last_idx=s((B,)), sampling=None)  # the model step does not read sampling


def lower_serving_step(c: StepCase):
  """``Lowered`` of the engine's step for case ``c`` (see module docstring)."""
  mesh = tpu_mesh(c.topology, c.data, c.model)
  rules = load_rules()
  base = base_shapes(c.cfg)
  pool = adapter_pool_shapes(c.cfg, c.mode, c.adapter_slots, c.rank)
  sh = mesh_shardings(c.cfg, base, pool, mesh, rules)
  split = rows_split(mesh, c.B)
  batch = batch_structs(c, NamedSharding(mesh, P("data") if split else P()))
  pages = jax.ShapeDtypeStruct(c.pool_shape, c.cfg.jnp_dtype, sharding=sh["pages"])
  with engine_steps.layer_scan_unroll(c.unroll):
    fn = jit_mesh_step(c.cfg, c.mode, c.backend, mesh, rules, sh, split)
    lowered = fn.lower(structs(base, sh["base"]), structs(pool, sh["pool"]), pages, batch)
  return lowered, mesh, sh["pages"].spec


def compile_serving_step(c: StepCase) -> Report:
  def lower():
    return lower_serving_step(c)[0]
  mesh = tpu_mesh(c.topology, c.data, c.model)
  from icarus_jax.model.sharding import PAGES_AXES, _spec
  spec = _spec(PAGES_AXES, load_rules())
  r = analyse(c.name, lower, pool_shapes=pool_shard_shapes(c.pool_shape, mesh, spec), mesh=mesh)
  pool_bytes = int(np.prod(c.pool_shape)) * jnp.dtype(c.cfg.jnp_dtype).itemsize
  r.extra.update(pool_bytes_per_device=pool_bytes // _spec_devices(mesh, spec),
                 hbm_limit=HBM_LIMIT[chip(c.topology)])
  return r


def _spec_devices(mesh: Mesh, spec: P) -> int:
  return int(np.prod([mesh.shape[a] for a in spec if a is not None]))


def per_layer(c: StepCase) -> dict:
  """Per-layer and whole-step costs of ``c``: ``cost_analysis`` and libtpu's estimated cycles
  count the layer scan's body once, so compile with unroll 1 and 2 (the body once and twice) and
  take the difference: ``whole = once + (L - 1) * layer``."""
  r1 = compile_serving_step(dataclasses.replace(c, unroll=1))
  r2 = compile_serving_step(dataclasses.replace(c, unroll=2))
  if not (r1.ok and r2.ok):
    raise RuntimeError(f"{c.name}: {r1.error or r2.error}")
  L = c.cfg.num_layers
  out = {}
  for k in ("flops", "bytes_accessed", "estimated_cycles"):
    layer = getattr(r2, k) - getattr(r1, k)
    out[k] = {"layer": layer, "step": getattr(r1, k) + (L - 1) * layer}
  return out


def max_pages(c: StepCase, r: Report) -> int:
  """Pages that fit per device under libtpu's limit, from a compiled report: the pool is the only
  buffer that grows with pages (temporaries do not: checked by the tests at two pool sizes)."""
  per_page = r.extra["pool_bytes_per_device"] / c.num_pages
  fixed = r.peak_bytes - r.extra["pool_bytes_per_device"]
  return int((HBM_LIMIT[chip(c.topology)] - fixed) // per_page)


# ----------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class KernelCase:
  """The shared Pallas kernel at one head layout and call shape (one pool layer)."""

  label: str
  heads: int
  kv_heads: int
  head_dim: int
  T: int = 2                      # query tokens per row (decode: the streams)
  q_block: int | None = None
  page_size: int = 16
  window: int | None = None
  splits: int = 1
  B: int = 8
  N: int = 64
  num_pages: int = 1024
  dtype: str = "bfloat16"

  @property
  def name(self) -> str:
    return (f"kernel/{self.label}/H{self.heads}K{self.kv_heads}hd{self.head_dim}/T{self.T}"
            f"qb{self.q_block}/ps{self.page_size}/w{self.window}/s{self.splits}/{self.dtype}")

  def args(self, sharding=None):
    from kernels_pallas.reference import page_shape
    dt = jnp.dtype(self.dtype)
    s = lambda shape, d: jax.ShapeDtypeStruct(shape, d, sharding=sharding)  # noqa: E731
    return (s((self.B, self.T, self.heads, self.head_dim), dt),
            s(page_shape(self.num_pages, self.page_size, self.kv_heads, self.head_dim), dt),
            s((self.B, self.N), jnp.int32), s((self.B, self.T), jnp.int32))

  def fn(self, impl: str):
    from kernels_pallas.paged_attention import paged_attention
    return functools.partial(paged_attention, impl=impl, interpret=False, q_block=self.q_block,
                             pages_per_chunk=max(1, 16 // self.page_size) * 2,
                             num_splits=self.splits, sliding_window=self.window)


def compile_kernel_tpu(k: KernelCase, topology_name: str = "v5e:2x2") -> Report:
  mesh = tpu_mesh(topology_name, 1, 1)
  args = k.args(NamedSharding(mesh, P()))
  return analyse(f"{k.name}/tpu-{chip(topology_name)}", lambda: jax.jit(k.fn("tpu")).lower(*args),
                 mesh=mesh)


def export_cuda(name: str, fn, args) -> Report:
  """``jax.export(platforms=["cuda"])``: runs the Triton lowering of every Pallas call on this
  host (deviceless CUDA compilation is not implemented in jax 0.10). No memory numbers."""
  from jax import export
  t0 = time.perf_counter()
  try:
    exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    text = exp.mlir_module()
  except Exception as e:  # noqa: BLE001
    return Report(name, False, error=f"{type(e).__name__}: {str(e)[:1500]}",
                  compile_s=time.perf_counter() - t0)
  r = Report(name, True, compile_s=time.perf_counter() - t0)
  r.extra["triton_calls"] = text.count("__gpu$xla.gpu.triton")
  return r


def export_kernel_cuda(k: KernelCase) -> Report:
  return export_cuda(f"{k.name}/cuda-export", k.fn("gpu"), k.args())


def export_serving_step_cuda(c: StepCase) -> Report:
  """The unsharded serving step (one GPU) exported for CUDA: every Pallas call lowers to Triton."""
  base = base_shapes(c.cfg)
  pool = adapter_pool_shapes(c.cfg, c.mode, c.adapter_slots, c.rank)
  batch = batch_structs(c)
  pages = jax.ShapeDtypeStruct(c.pool_shape, c.cfg.jnp_dtype)
  attn = (engine_steps.PallasAttention(impl="gpu", interpret=False) if c.backend == "pallas"
          else engine_steps.paged_attention_reference)
  fn = functools.partial(engine_steps.serving_step, c.cfg, c.mode, attn_fn=attn)
  return export_cuda(f"{c.name}/cuda-export", fn, (base, pool, pages, batch))


# ----------------------------------------------------------------------------- training


def lower_train_step(cfg: ModelConfig, topology_name: str, data: int, model: int, *,
                     batch: int = 8, seq: int = 512, rank: int = 16):
  """The ICaRus-LoRA training step (``training.objective.train_step``) on the mesh: base
  sharded by its logical axes, the adapter and optimizer state replicated, the batch over
  ``data``."""
  from icarus_jax.model.adapters import init_adapter
  from icarus_jax.training.objective import TrainConfig, make_optimizer, train_step
  mesh = tpu_mesh(topology_name, data, model)
  rules = load_rules()
  base = base_shapes(cfg)
  from icarus_jax.model.sharding import base_logical_axes, shardings
  base_sh = shardings(base_logical_axes(cfg, base), mesh, rules)
  tc = TrainConfig(mode="icarus_lora", rank=rank, total_steps=100)
  tx = make_optimizer(tc)
  # init_trainable's adapter, shapes only (its base fingerprint hashes real weights: stamped here)
  ad = jax.eval_shape(lambda: init_adapter(cfg, jax.random.key(tc.seed), name="aot",
                                           kind=tc.mode, targets=DEFAULT_ICARUS_TARGETS,
                                           rank=rank, alpha=tc.alpha, base_fingerprint_="aot"))
  opt = jax.eval_shape(tx.init, ad.params)
  rep = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, P("data"))
  b = {"inputs": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows),
       "targets": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows),
       "mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=rows)}
  lowered = train_step.lower(cfg, structs(ad, rep), structs(opt, rep),
                             structs(base, base_sh), b, tx)
  return lowered, mesh


def compile_train_step(cfg: ModelConfig, topology_name: str, data: int, model: int,
                       **kw) -> Report:
  def lower():
    return lower_train_step(cfg, topology_name, data, model, **kw)[0]
  mesh = tpu_mesh(topology_name, data, model)
  r = analyse(f"{cfg.name}/{topology_name}/data{data}xmodel{model}/train_icarus_lora", lower,
              mesh=mesh)
  r.extra["hbm_limit"] = HBM_LIMIT[chip(topology_name)]
  return r
