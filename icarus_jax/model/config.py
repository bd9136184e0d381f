"""Model configuration: one frozen dataclass for Llama / Qwen2 / Qwen3 / Mistral style models.

A ``ModelConfig`` fully determines the shapes of the base parameter pytree (see
``icarus_jax.model.params``) and the math of the forward pass. Presets live as JSON
files in ``configs/models/``; ``ModelConfig.from_hf_config`` reads a Hugging
Face ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from icarus_jax.errors import ConfigError

#: Architectures whose Hugging Face weights we can load, by ``config.json`` ``architectures[0]``.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = ("float32", "bfloat16", "float16")

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # package data


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (Hugging Face ``rope_parameters`` / ``rope_scaling``).

  ``rope_type``: ``"default"`` (none), ``"linear"`` (positions divided by ``factor``) or
  ``"llama3"`` (Llama-3.1 band-wise scaling with ``low_freq_factor``/``high_freq_factor``).
  """

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in _ROPE_TYPES:
      raise ConfigError(f"rope_type={self.rope_type!r} is not supported; accepted: {_ROPE_TYPES}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and options of a decoder-only transformer.

  Attributes:
    vocab_size: number of token ids.
    d_model: residual width.
    num_layers: transformer blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA); must divide ``num_heads``.
    head_dim: per-head width (may differ from d_model / num_heads, as in Qwen3).
    mlp_dim: gated-MLP hidden width.
    rope_theta: RoPE base.
    rope_scaling: optional frequency scaling.
    norm_eps: RMSNorm epsilon.
    attention_bias: q/k/v projections carry a bias (Qwen2).
    qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
    tie_embeddings: the LM head reuses the embedding matrix.
    max_seq_len: longest sequence the model accepts (prompt + generation).
    sliding_window: if set, a query sees only the last ``sliding_window`` keys (Mistral v0.1).
    dtype: parameter / activation dtype name (``float32``, ``bfloat16``, ``float16``).
    architecture: family name (``llama``, ``mistral``, ``qwen2``, ``qwen3``), used for export.
    name: free-form preset name.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  attention_bias: bool = False
  qk_norm: bool = False
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  sliding_window: int | None = None
  dtype: str = "float32"
  architecture: str = "llama"
  name: str = "custom"

  def __post_init__(self):
    for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "max_seq_len"):
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"ModelConfig.{f} must be a positive int, got {v!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} must be a multiple of "
                        f"num_kv_heads={self.num_kv_heads}")
    if self.dtype not in _DTYPES:
      raise ConfigError(f"dtype={self.dtype!r} is not supported; accepted: {_DTYPES}")
    if self.architecture not in SUPPORTED_ARCHITECTURES.values():
      raise ConfigError(f"architecture={self.architecture!r} is unknown; accepted: "
                        f"{sorted(SUPPORTED_ARCHITECTURES.values())}")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ConfigError(f"sliding_window must be positive or None, got {self.sliding_window}")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

  # ----------------------------------------------------------------------------------------
  @property
  def q_per_kv(self) -> int:
    """Query heads per KV head (GQA group size)."""
    return self.num_heads // self.num_kv_heads

  @property
  def jnp_dtype(self):
    import jax.numpy as jnp
    return jnp.dtype(self.dtype)

  def kv_bytes_per_token(self) -> int:
    """Bytes of K and V one token occupies over all layers."""
    import jax.numpy as jnp
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize

  def rope_inv_freq(self) -> np.ndarray:
    """Inverse RoPE frequencies ``[head_dim // 2]`` (float64 numpy), scaling applied."""
    inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
    rs = self.rope_scaling
    if rs is None or rs.rope_type == "default":
      return inv
    if rs.rope_type == "linear":
      return inv / rs.factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    mid = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_mid, mid, scaled)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ----------------------------------------------------------------------------------------
  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ConfigError(f"unknown ModelConfig fields {sorted(unknown)}; accepted: {sorted(fields)}")
    d = dict(d)
    if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], RopeScaling):
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    try:
      return cls(**d)
    except TypeError as e:
      raise ConfigError(f"bad ModelConfig fields: {e}") from None

  def to_json(self, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
    try:
      d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f"cannot read model config {path}: {e}") from None
    return cls.from_dict(d)

  @classmethod
  def from_preset(cls, name: str) -> "ModelConfig":
    """Loads ``configs/models/<name>.json`` (see ``list_presets()``)."""
    path = CONFIGS_DIR / "models" / f"{name}.json"
    if not path.exists():
      raise ConfigError(f"unknown preset {name!r}; available: {list_presets()}")
    return cls.from_json(path)

  # ----------------------------------------------------------------------------------------
  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any] | str | os.PathLike, *,
                     dtype: str | None = None) -> "ModelConfig":
    """Builds a config from a Hugging Face ``config.json`` (dict, file, or its directory).

    Understands transformers 4 (``rope_theta``/``rope_scaling``) and 5 (``rope_parameters``)
    layouts. ``dtype`` overrides the checkpoint's ``torch_dtype``/``dtype``.
    """
    src = "config dict"
    if not isinstance(hf, Mapping):
      p = Path(hf)
      if p.is_dir():
        p = p / "config.json"
      src = str(p)
      try:
        hf = json.loads(p.read_text())
      except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read Hugging Face config {src}: {e}") from None
    archs = hf.get("architectures") or []
    arch = None
    for a in archs:
      if a in SUPPORTED_ARCHITECTURES:
        arch = SUPPORTED_ARCHITECTURES[a]
    if arch is None:
      mt = hf.get("model_type")
      if mt in SUPPORTED_ARCHITECTURES.values():
        arch = mt
      else:
        raise ConfigError(f"{src}: unknown architecture {archs or mt!r}; supported: "
                          f"{sorted(SUPPORTED_ARCHITECTURES)}")

    def req(key):
      if key not in hf:
        raise ConfigError(f"{src}: missing required field {key!r}")
      return hf[key]

    d_model = int(req("hidden_size"))
    n_heads = int(req("num_attention_heads"))
    rope_params = hf.get("rope_parameters") or {}
    rope_theta = float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or rope_params
    rope_scaling = None
    rtype = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rtype not in (None, "default"):
      if rtype not in _ROPE_TYPES:
        raise ConfigError(f"{src}: rope type {rtype!r} is not supported; accepted: {_ROPE_TYPES}")
      rope_scaling = RopeScaling(
          rope_type=rtype, factor=float(scaling.get("factor", 1.0)),
          low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
          high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
          original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))
    if dtype is None:
      dtype = hf.get("dtype", hf.get("torch_dtype", "float32")) or "float32"
    sliding = hf.get("sliding_window") if arch == "mistral" else None
    if arch in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
      # Qwen's window applies only to layers >= max_window_layers (a per-layer mix we do not
      # implement); loading it with full attention would silently change the model.
      raise ConfigError(f"{src}: {arch} use_sliding_window=True (sliding_window="
                        f"{hf.get('sliding_window')}, max_window_layers="
                        f"{hf.get('max_window_layers')}) is not supported; only full attention "
                        f"(use_sliding_window=false) loads")
    return cls(
        vocab_size=int(req("vocab_size")),
        d_model=d_model,
        num_layers=int(req("num_hidden_layers")),
        num_heads=n_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        mlp_dim=int(req("intermediate_size")),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
        qk_norm=(arch == "qwen3"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        sliding_window=int(sliding) if sliding else None,
        dtype=str(dtype),
        architecture=arch,
        name=str(hf.get("_name_or_path") or arch),
    )

  def to_hf_config(self) -> dict[str, Any]:
    """A transformers-compatible ``config.json`` dict for this config."""
    arch_cls = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.architecture]
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling is not None:
      rope.update(dataclasses.asdict(self.rope_scaling))
    d = {
        "architectures": [arch_cls],
        "model_type": self.architecture,
        "vocab_size": self.vocab_size,
        "hidden_size": self.d_model,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "intermediate_size": self.mlp_dim,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "rms_norm_eps": self.norm_eps,
        "tie_word_embeddings": self.tie_embeddings,
        "max_position_embeddings": self.max_seq_len,
        "hidden_act": "silu",
        "dtype": self.dtype,
        "_name_or_path": self.name,
    }
    if self.architecture in ("llama",):
      d["attention_bias"] = self.attention_bias
      d["mlp_bias"] = False
    if self.architecture == "mistral":
      d["sliding_window"] = self.sliding_window
    if self.architecture == "qwen3":
      d["attention_bias"] = self.attention_bias
    if self.architecture == "qwen2":
      d["use_sliding_window"] = False
    return d


def list_presets() -> list[str]:
  return sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.json"))


def tiny_config(**overrides) -> ModelConfig:
  """The small model used by tests and the CPU demo (``configs/models/tiny.json``)."""
  return ModelConfig.from_preset("tiny").replace(**overrides)
