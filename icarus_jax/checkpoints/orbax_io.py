"""Orbax checkpoints of our own: a base (config + params) and adapters (metadata + params).

Layout of a base checkpoint directory:   ``model_config.json`` + ``params/`` (Orbax).
Layout of an adapter checkpoint:          ``adapter.json`` + ``params/`` (Orbax).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax

from icarus_jax.model.adapters import Adapter, AdapterConfig
from icarus_jax.model.config import ModelConfig
from icarus_jax.errors import CheckpointError
from icarus_jax.model.params import Params, check_param_shapes


def _ocp():
  """``orbax.checkpoint``, imported on first use: serving processes never pay for it."""
  import orbax.checkpoint as ocp
  return ocp


def _save_tree(path: Path, tree) -> None:
  ocp = _ocp()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path.absolute() / "params", tree, force=True)


def _restore_tree(path: Path, target=None):
  d = path.absolute() / "params"
  if not d.exists():
    raise CheckpointError(f"{path}: missing Orbax 'params' directory")
  ocp = _ocp()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      if target is None:
        return ckptr.restore(d)
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
      return ckptr.restore(d, abstract)
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f"{d}: cannot restore Orbax checkpoint ({type(e).__name__}: {e})") from None


def save_base(path: str | os.PathLike, cfg: ModelConfig, params: Params) -> None:
  """Saves a base model: ``model_config.json`` and Orbax ``params/``."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  cfg.to_json(path / "model_config.json")
  _save_tree(path, params)


def load_base(path: str | os.PathLike) -> tuple[ModelConfig, Params]:
  """Restores ``(config, params)`` saved by ``save_base``; checks every tensor's shape."""
  path = Path(path)
  if not (path / "model_config.json").exists():
    raise CheckpointError(f"{path}: missing model_config.json (not an icarus-jax base checkpoint)")
  cfg = ModelConfig.from_json(path / "model_config.json")
  params = _restore_tree(path)
  check_param_shapes(cfg, params, source=str(path))
  return cfg, params


def save_adapter_orbax(adapter: Adapter, path: str | os.PathLike) -> None:
  """Saves an adapter: ``adapter.json`` (its ``AdapterConfig``) and Orbax ``params/``."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "adapter.json").write_text(json.dumps(dataclasses.asdict(adapter.config), indent=2) + "\n")
  _save_tree(path, adapter.params)


def load_adapter_orbax(path: str | os.PathLike) -> Adapter:
  """Restores an adapter saved by ``save_adapter_orbax``."""
  path = Path(path)
  f = path / "adapter.json"
  if not f.exists():
    raise CheckpointError(f"{path}: missing adapter.json (not an icarus-jax adapter checkpoint)")
  try:
    meta = json.loads(f.read_text())
    acfg = AdapterConfig(**meta)
  except (json.JSONDecodeError, TypeError) as e:
    raise CheckpointError(f"{f}: malformed adapter metadata ({e})") from None
  params = _restore_tree(path)
  params.setdefault("layers", {})
  return Adapter(params, acfg)
