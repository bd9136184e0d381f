"""Hugging Face checkpoints: load and save Llama / Qwen2 / Qwen3 / Mistral safetensors directories.

A directory holds ``config.json`` and either one ``model.safetensors``, several ``*.safetensors``
files, or shards listed in ``model.safetensors.index.json``. Every problem raises
``CheckpointError`` naming the file and tensor involved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from icarus_jax.model.config import ModelConfig
from icarus_jax.errors import CheckpointError, ConfigError
from icarus_jax.model.params import Params, param_shapes

# our layer name -> (HF module path inside ``model.layers.{i}.``, is a [out, in] matrix)
LAYER_MAP = {
    "attn_norm": ("input_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "o": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}
TOP_MAP = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
INDEX_FILE = "model.safetensors.index.json"


def hf_layer_name(name: str, layer: int) -> str:
  return f"model.layers.{layer}.{LAYER_MAP[name][0]}"


class _TensorSource:
  """Lazily opens the safetensors files of a directory and finds tensors by HF name."""

  def __init__(self, path: Path):
    from safetensors import safe_open  # local import keeps module import cheap
    self._safe_open = safe_open
    self._handles: dict[Path, object] = {}
    self.path = path
    index = path / INDEX_FILE
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed index ({e!r}); expected {{'weight_map': "
                              f"{{tensor: file}}}}") from None
      self.where = {k: path / v for k, v in weight_map.items()}
      for f in sorted(set(self.where.values())):
        if not f.exists():
          raise CheckpointError(f"{index} lists shard {f.name}, which does not exist")
    else:
      files = sorted(path.glob("*.safetensors"))
      if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
      self.where = {}
      for f in files:
        for k in self._open(f).keys():
          self.where[k] = f

  def _open(self, f: Path):
    h = self._handles.get(f)
    if h is not None:
      return h
    try:
      h = self._safe_open(str(f), framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
      raise CheckpointError(f"{f}: cannot read safetensors file ({type(e).__name__}: {e}); the file "
                            f"may be truncated or not a safetensors file") from None
    self._handles[f] = h
    return h

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    f = self.where.get(name)
    if f is None:
      raise CheckpointError(f"{self.path}: missing tensor {name!r} (expected shape {shape})")
    try:
      arr = self._open(f).get_tensor(name)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"{f}: cannot read tensor {name!r} ({type(e).__name__}: {e}); the file "
                            f"may be truncated") from None
    if tuple(arr.shape) != tuple(shape):
      raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
    return arr


def load_hf(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[ModelConfig, Params]:
  """Loads a Hugging Face checkpoint directory into ``(ModelConfig, base_params)``.

  Args:
    path: directory with ``config.json`` and safetensors weights (a ``.gguf`` file is handed to
      ``icarus_jax.checkpoints.gguf_io.load_gguf``).
    dtype: parameter dtype (``float32``/``bfloat16``/``float16``); default: the checkpoint's.
  Raises:
    CheckpointError: missing directory/config/tensor, wrong shape, unreadable or truncated file.
    ConfigError: unknown architecture or malformed config.json.
  """
  path = Path(path)
  from icarus_jax.checkpoints.gguf_io import is_gguf, load_gguf
  if is_gguf(path):
    return load_gguf(path, dtype=dtype)
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint directory "
                          f"or a .gguf file)")
  if not (path / "config.json").exists():
    raise CheckpointError(f"{path}: missing config.json")
  cfg = ModelConfig.from_hf_config(path / "config.json", dtype=dtype)
  src = _TensorSource(path)
  shapes = param_shapes(cfg)
  np_dtype = jnp.dtype(cfg.dtype)

  def fetch(hf_name, our_shape, transpose):
    want = tuple(reversed(our_shape)) if transpose else tuple(our_shape)
    arr = src.get(hf_name, want)
    if transpose:
      arr = arr.T
    return np.asarray(arr).astype(np_dtype)

  layers = {}
  for name, shape in shapes["layers"].items():
    hf, transpose = LAYER_MAP[name]
    layers[name] = jnp.asarray(np.stack(
        [fetch(hf_layer_name(name, i), shape[1:], transpose) for i in range(cfg.num_layers)]))
  params: Params = {"layers": layers}
  for name, shape in shapes.items():
    if name == "layers":
      continue
    hf, transpose = TOP_MAP[name]
    params[name] = jnp.asarray(fetch(hf, shape, transpose))
  return cfg, params


def save_hf(path: str | os.PathLike, cfg: ModelConfig, params: Params, *,
            max_shard_bytes: int | None = None) -> None:
  """Writes ``params`` as a transformers-loadable directory (config.json + safetensors).

  With ``max_shard_bytes`` the tensors are split into shards listed in ``model.safetensors.index.json``.
  """
  from safetensors.numpy import save_file
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
  tensors: dict[str, np.ndarray] = {}
  for name, w in params["layers"].items():
    hf, transpose = LAYER_MAP[name]
    w = np.asarray(w)
    for i in range(cfg.num_layers):
      tensors[hf_layer_name(name, i)] = np.ascontiguousarray(w[i].T if transpose else w[i])
  for name, (hf, transpose) in TOP_MAP.items():
    if name in params:
      w = np.asarray(params[name])
      tensors[hf] = np.ascontiguousarray(w.T if transpose else w)
  if max_shard_bytes is None:
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for k in sorted(tensors):
    nb = tensors[k].nbytes
    if shards[-1] and size + nb > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = tensors[k]
    size += nb
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(path / fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in shard})
  (path / INDEX_FILE).write_text(json.dumps(
      {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
       "weight_map": weight_map}, indent=2) + "\n")


__all__ = ["load_hf", "save_hf", "CheckpointError", "ConfigError"]
