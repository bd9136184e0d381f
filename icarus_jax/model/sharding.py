"""Device meshes and shardings: logical axis rules (``configs/sharding/*.json``) mapped onto a
``jax.sharding.Mesh`` with named axes ``data`` and ``model``.

    mesh = make_mesh("data:2,model:4")
    engine = shard_engine(engine, mesh)     # base, adapter pool and KV pages placed sharded

Base weights are sharded over ``model`` on heads / MLP / vocab; adapter pools like the weights
they modify; KV pages on their head axis; batch metadata over ``data`` when it divides. The
jitted steps then run SPMD (GSPMD inserts the collectives); the KV pool stays donated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from icarus_jax.model.config import CONFIGS_DIR, ModelConfig
from icarus_jax.errors import IcarusError
from icarus_jax.model.params import logical_axes, lora_axes

AXES = ("data", "model")


def load_rules(path: str | os.PathLike | None = None) -> dict[str, str | None]:
  p = Path(path) if path else CONFIGS_DIR / "sharding" / "default.json"
  try:
    rules = json.loads(p.read_text())["rules"]
  except (OSError, json.JSONDecodeError, KeyError) as e:
    raise IcarusError(f"cannot read sharding rules {p}: {e}") from None
  bad = {k: v for k, v in rules.items() if v is not None and v not in AXES}
  if bad:
    raise IcarusError(f"{p}: rules map to unknown mesh axes {bad}; mesh axes are {AXES}")
  return rules


def parse_mesh_spec(spec: str) -> dict[str, int]:
  """``"data:2,model:4"`` -> ``{"data": 2, "model": 4}`` (missing axes are 1)."""
  out = {"data": 1, "model": 1}
  for part in filter(None, (s.strip() for s in spec.split(","))):
    name, _, size = part.partition(":")
    if name not in AXES or not size.isdigit() or int(size) < 1:
      raise IcarusError(f"bad mesh spec {spec!r}: expected comma-separated axis:size with axes "
                        f"{AXES}, e.g. 'data:2,model:4'")
    out[name] = int(size)
  return out


def make_mesh(spec: str, devices=None) -> Mesh:
  """A ``(data, model)`` mesh over the first ``data * model`` devices."""
  shape = parse_mesh_spec(spec)
  devices = list(devices if devices is not None else jax.devices())
  n = shape["data"] * shape["model"]
  if n > len(devices):
    raise IcarusError(f"mesh {spec!r} needs {n} devices, but only {len(devices)} are visible "
                      f"({jax.default_backend()}); on CPU set "
                      f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
  return Mesh(np.array(devices[:n]).reshape(shape["data"], shape["model"]), AXES)


def check_divisible(cfg: ModelConfig, mesh: Mesh) -> None:
  m = mesh.shape["model"]
  for name, v in (("num_kv_heads", cfg.num_kv_heads), ("num_heads", cfg.num_heads),
                  ("mlp_dim", cfg.mlp_dim), ("vocab_size", cfg.vocab_size)):
    if v % m:
      raise IcarusError(f"{name}={v} is not divisible by the mesh's model axis ({m}); choose a "
                        f"model axis that divides it (KV heads are sharded over 'model')")


def _spec(axes, rules) -> P:
  return P(*[rules.get(a) if a is not None else None for a in axes])


def base_logical_axes(cfg: ModelConfig, params) -> dict:
  """Logical axes of ``params`` (the declared ones, :data:`~icarus_jax.model.params.WEIGHTS`)."""
  axes = logical_axes(cfg)
  return {k: ({n: axes["layers"][n] for n in v} if k == "layers" else axes[k])
          for k, v in params.items()}


def pool_logical_axes(pool_weights) -> dict:
  """Adapter pool axes: each LoRA factor sharded like the weight it modifies."""
  def pooled(axes):  # the slot axis follows the layer axis (or leads)
    return axes[:1] + ("adapters",) + axes[1:] if axes[0] == "layers" else ("adapters", *axes)

  out = {"layers": {t: {f: pooled(a) for f, a in lora_axes(t).items()}
                    for t in pool_weights["layers"]}}
  if "lm_head" in pool_weights:
    out["lm_head"] = {f: pooled(a) for f, a in lora_axes("lm_head").items()}
  return out


PAGES_AXES = ("layers", "pages", "kv_heads", "page_slots", "head_dim")  # engine_steps.pool_shape


def shardings(tree_axes, mesh: Mesh, rules=None):
  rules = rules or load_rules()
  return jax.tree_util.tree_map(lambda axes: NamedSharding(mesh, _spec(axes, rules)), tree_axes,
                                is_leaf=lambda x: isinstance(x, tuple))


def shard_base(cfg: ModelConfig, params, mesh: Mesh, rules=None):
  check_divisible(cfg, mesh)
  return jax.device_put(params, shardings(base_logical_axes(cfg, params), mesh, rules))


def shard_engine(engine, mesh: Mesh, rules=None):
  """Places an ``Engine``'s base, adapter pool and KV pages on ``mesh`` (its device runner's
  ``shard``: the step is then jitted with explicit shardings). Returns the engine."""
  engine.runner.shard(mesh, rules or load_rules())
  return engine


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """``jax.distributed.initialize`` for multi-host runs (explicit flags or cluster auto-detect).

  Returns True if the distributed runtime was initialised.
  """
  if coordinator is None and num_processes is None:
    if not any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                                         "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
      return False
    jax.distributed.initialize()
    return True
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  return True
