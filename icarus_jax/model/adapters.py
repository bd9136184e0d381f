"""Adapters: LoRA and full-decoder pytrees, their metadata, the ICaRus gate and the fingerprint check.

An ``Adapter`` is a JAX pytree: its array leaves live in ``adapter.params`` and its metadata
(``AdapterConfig``) is static aux data, so an adapter can be passed straight into ``jax.jit``.

Kinds:
  * ``icarus_lora`` (default): LoRA on decoder-path weights only; shares the base's KV cache.
  * ``icarus_full``: a full copy of every decoder-path weight; shares the base's KV cache.
  * ``lora``: standard LoRA (may touch k/v): the conventional baseline, which owns its KV cache.
  * ``full``: standard full fine-tuning (a full copy of every weight): conventional baseline.

LoRA parameter layout (``[in, r]`` / ``[r, out]``, stacked on layers like the base):

    params["layers"][t] = {"a": [L, in, r], "b": [L, r, out]}   for t in q, k, v, o, gate, up, down
    params["lm_head"]    = {"a": [d_model, r], "b": [r, vocab]}

The effective weight is ``W + (alpha / r) * a @ b`` (``alpha / sqrt(r)`` with rsLoRA). ``b`` is
initialised to zero, so a fresh adapter reproduces the base model exactly.

Full layout: ``params["layers"][name]`` and top-level ``final_norm`` / ``lm_head`` hold
replacement weights with the base's shapes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from icarus_jax.model.config import ModelConfig
from icarus_jax.errors import AdapterGateError, FingerprintMismatchError, IcarusError
from icarus_jax.model.params import (ENCODER_ONLY_WEIGHTS, LAYER_WEIGHTS, Params, base_fingerprint,
                                     param_shapes)

KINDS = ("icarus_lora", "icarus_full", "lora", "full")
ICARUS_KINDS = ("icarus_lora", "icarus_full")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
LAYER_LORA_TARGETS = tuple(w.name for w in LAYER_WEIGHTS if w.is_projection)  # q k v o gate up down
DEFAULT_ICARUS_TARGETS = ("q", "o", "gate", "up", "down", "lm_head")
DEFAULT_LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
#: Decoder-path weights copied by a full-decoder (``icarus_full``) adapter.
DECODER_WEIGHTS = ("attn_norm", "q", "q_bias", "q_norm", "o", "mlp_norm", "gate", "up", "down",
                   "final_norm", "lm_head")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Static metadata of an adapter.

  Attributes:
    name: adapter name (the model name it is served under).
    kind: one of ``KINDS``.
    targets: weights the adapter modifies (LoRA targets, or replaced weights for full kinds).
    rank: LoRA rank (0 for full kinds).
    alpha: LoRA alpha (scale = alpha / rank, or alpha / sqrt(rank) with ``use_rslora``).
    base_fingerprint: ``base_fingerprint()`` of the base it was trained on (None: unknown).
    use_rslora: rank-stabilised scaling.
  """

  name: str = "adapter"
  kind: str = "icarus_lora"
  targets: tuple[str, ...] = DEFAULT_ICARUS_TARGETS
  rank: int = 8
  alpha: float = 16.0
  base_fingerprint: str | None = None
  use_rslora: bool = False

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.kind not in KINDS:
      raise IcarusError(f"adapter kind {self.kind!r} is unknown; accepted: {KINDS}")
    if self.kind in ("icarus_lora", "lora"):
      bad = [t for t in self.targets if t not in LORA_TARGETS]
      if bad:
        raise IcarusError(f"adapter {self.name!r}: LoRA targets {bad} are not supported; "
                          f"accepted: {LORA_TARGETS}")
      if not isinstance(self.rank, int) or self.rank <= 0:
        raise IcarusError(f"adapter {self.name!r}: LoRA rank must be a positive int, got {self.rank!r}")
      if not self.targets:
        raise IcarusError(f"adapter {self.name!r}: a LoRA adapter needs at least one target")
    if self.kind in ICARUS_KINDS:
      bad = [t for t in self.targets if t in ENCODER_ONLY_WEIGHTS]
      if bad:
        hf = {"k": "k_proj", "v": "v_proj", "embed": "embed_tokens", "k_norm": "k_norm",
              "k_bias": "k_proj.bias", "v_bias": "v_proj.bias"}
        raise AdapterGateError(
            f"adapter {self.name!r} targets {[f'{t} ({hf[t]})' for t in bad]}, which change "
            f"the encoder's K/V; an ICaRus "
            f"adapter may only modify decoder-path weights {DECODER_WEIGHTS}. Load it as "
            f"kind='lora' (conventional baseline with its own KV cache) instead.")

  @property
  def is_icarus(self) -> bool:
    return self.kind in ICARUS_KINDS

  @property
  def is_lora(self) -> bool:
    return self.kind in ("icarus_lora", "lora")

  @property
  def scale(self) -> float:
    if not self.is_lora:
      return 1.0
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def replace(self, **kw) -> "AdapterConfig":
    return dataclasses.replace(self, **kw)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Adapter:
  """An adapter: array pytree ``params`` plus static ``config`` (see module docstring)."""

  params: Params
  config: AdapterConfig

  def tree_flatten(self):
    return (self.params,), self.config

  @classmethod
  def tree_unflatten(cls, config, children):
    return cls(children[0], config)

  @property
  def name(self) -> str:
    return self.config.name

  @property
  def kind(self) -> str:
    return self.config.kind

  def replace(self, **kw) -> "Adapter":
    """New adapter with ``config`` fields replaced (``params`` kept)."""
    return Adapter(self.params, self.config.replace(**kw))


# ------------------------------------------------------------------------------------------
def lora_shapes(cfg: ModelConfig, targets: Sequence[str], rank: int) -> Params:
  """Shapes of LoRA factors for ``targets``: ``{"layers": {t: {"a":..., "b":...}}, "lm_head": ...}``."""
  base = param_shapes(cfg)["layers"]
  L = cfg.num_layers
  out: Params = {"layers": {}}
  for t in targets:
    if t == "lm_head":
      out["lm_head"] = {"a": (cfg.d_model, rank), "b": (rank, cfg.vocab_size)}
    else:
      _, din, dout = base[t]
      out["layers"][t] = {"a": (L, din, rank), "b": (L, rank, dout)}
  return out


def init_adapter(cfg: ModelConfig, key: jax.Array, *, name: str = "adapter",
                 kind: str = "icarus_lora", targets: Sequence[str] | None = None, rank: int = 8,
                 alpha: float = 16.0, base_params: Params | None = None,
                 base_fingerprint_: str | None = None, b_std: float = 0.0,
                 use_rslora: bool = False) -> Adapter:
  """Creates an adapter for ``cfg``.

  LoRA kinds: ``a ~ N(0, 1/in)`` (Kaiming-like, as PEFT), ``b = 0`` unless ``b_std > 0`` (random
  adapters for tests/demos). Full kinds copy ``base_params`` (required) for their targets.
  ``base_params`` (or an explicit ``base_fingerprint_``) stamps the base fingerprint.
  """
  if targets is None:
    targets = {"icarus_lora": DEFAULT_ICARUS_TARGETS, "lora": DEFAULT_LORA_TARGETS,
               "icarus_full": DECODER_WEIGHTS, "full": None}[kind]
  fp = base_fingerprint_
  if fp is None and base_params is not None:
    fp = base_fingerprint(cfg, base_params)
  if kind in ("icarus_lora", "lora"):
    # LoRA factors are float32 master weights whatever the base dtype (as PEFT and MaxText):
    # on a bf16 base, Adam updates below bf16 resolution would otherwise be lost
    # (0.05 + 1e-4 == 0.05 in bf16). They are cast to the activations' dtype for the matmul.
    dtype = jnp.float32
    acfg = AdapterConfig(name=name, kind=kind, targets=tuple(targets), rank=rank, alpha=alpha,
                         base_fingerprint=fp, use_rslora=use_rslora)
    shapes = lora_shapes(cfg, acfg.targets, rank)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
      if path[-1].key == "a":
        fan_in = shape[-2]
        leaves.append((jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype))
      else:
        leaves.append((b_std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return Adapter(jax.tree_util.tree_unflatten(treedef, leaves), acfg)
  # Full kinds: a copy of the base weights they replace.
  if base_params is None:
    raise IcarusError(f"init_adapter(kind={kind!r}) needs base_params to copy")
  shapes = param_shapes(cfg)
  if targets is None:  # standard full fine-tuning: every weight
    targets = tuple(shapes["layers"]) + tuple(k for k in shapes if k != "layers")
  present = set(shapes["layers"]) | set(shapes) | {"lm_head"}
  targets = tuple(t for t in targets if t in present)
  acfg = AdapterConfig(name=name, kind=kind, targets=targets, rank=0, alpha=0.0,
                       base_fingerprint=fp)
  params: Params = {"layers": {}}
  for t in targets:
    if t in shapes["layers"]:
      params["layers"][t] = jnp.array(base_params["layers"][t])
    elif t == "lm_head":
      from icarus_jax.model.params import lm_head_weight
      params["lm_head"] = jnp.array(lm_head_weight(cfg, base_params))
    else:
      params[t] = jnp.array(base_params[t])
  if b_std > 0:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [x + (b_std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
              for x, k in zip(leaves, keys)]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
  return Adapter(params, acfg)


def check_adapter(cfg: ModelConfig, base_params: Params, adapter: Adapter, *,
                  require_icarus: bool = False, fingerprint: str | None = None) -> None:
  """Validates ``adapter`` against a base: gate, fingerprint and shapes.

  ``fingerprint``: the base's, when the caller already holds it (the engine computes it once at
  construction, so adding an adapter never re-hashes the base on the serving thread).

  Raises:
    AdapterGateError: ``require_icarus`` and the adapter is not an ICaRus kind.
    FingerprintMismatchError: the adapter records another base (or none).
    IcarusError: array shapes do not match the config.
  """
  ac = adapter.config
  if require_icarus and not ac.is_icarus:
    raise AdapterGateError(
        f"adapter {ac.name!r} is of kind {ac.kind!r} (targets {list(ac.targets)}), which owns its "
        f"KV cache; the shared ICaRus cache accepts only kinds {ICARUS_KINDS}")
  fp = fingerprint or base_fingerprint(cfg, base_params)
  if ac.base_fingerprint is None:
    raise FingerprintMismatchError(
        f"adapter {ac.name!r} records no base fingerprint (e.g. trained with HF PEFT); to assert "
        f"it was trained on this base, load it with load_adapter(path, base_fingerprint="
        f"engine.fingerprint) or serve with `launch.serve --trust_foreign_adapters` (this base "
        f"is {fp})")
  if ac.base_fingerprint != fp:
    raise FingerprintMismatchError(
        f"adapter {ac.name!r} was trained on base {ac.base_fingerprint}, but this base is {fp}")
  if ac.is_lora:
    want = lora_shapes(cfg, ac.targets, ac.rank)
    got = jax.tree_util.tree_map(lambda x: tuple(x.shape), adapter.params)
    for t in ac.targets:
      w = want["lm_head"] if t == "lm_head" else want["layers"][t]
      g = got.get("lm_head") if t == "lm_head" else got.get("layers", {}).get(t)
      if g is None or {k: tuple(v) for k, v in g.items()} != w:
        raise IcarusError(f"adapter {ac.name!r}: target {t!r} has shapes {g}, expected {w}")


def lora_weights(adapter: Adapter | None, dtype=None) -> Params:
  """The LoRA factors ready to apply: ``b`` pre-multiplied by the adapter's scale.

  Returns ``{"layers": {t: {"a","b"}}, "lm_head": {...}}`` (empty dicts for no adapter / full kinds).
  """
  if adapter is None or not adapter.config.is_lora:
    return {"layers": {}}
  s = adapter.config.scale
  out: Params = {"layers": {t: {"a": ab["a"], "b": ab["b"] * jnp.asarray(s, ab["b"].dtype)}
                            for t, ab in adapter.params.get("layers", {}).items()}}
  if "lm_head" in adapter.params:
    ab = adapter.params["lm_head"]
    out["lm_head"] = {"a": ab["a"], "b": ab["b"] * jnp.asarray(s, ab["b"].dtype)}
  return out


def merge_adapter(cfg: ModelConfig, base_params: Params, adapter: Adapter) -> Params:
  """Base weights with the adapter folded in (``W + s * a @ b``, or the replacement weights).

  For ICaRus kinds the merged pytree is the *decoder's* weights: the encoder must keep the
  base weights, so never use the result to produce K/V (see ``model.forward``).
  """
  merged = jax.tree_util.tree_map(lambda x: x, base_params)
  merged["layers"] = dict(merged["layers"])
  if adapter.config.is_lora:
    lw = lora_weights(adapter)
    for t, ab in lw["layers"].items():
      w = merged["layers"][t]
      merged["layers"][t] = (w.astype(jnp.float32) + jnp.einsum(
          "lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))).astype(w.dtype)
    if "lm_head" in lw:
      from icarus_jax.model.params import lm_head_weight
      w = lm_head_weight(cfg, base_params)
      merged["lm_head"] = (w.astype(jnp.float32) + lw["lm_head"]["a"].astype(jnp.float32)
                           @ lw["lm_head"]["b"].astype(jnp.float32)).astype(w.dtype)
    return merged
  for t, w in adapter.params.get("layers", {}).items():
    merged["layers"][t] = w
  for t, w in adapter.params.items():
    if t != "layers":
      merged[t] = w
  return merged


def adapter_num_params(adapter: Adapter) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(adapter.params)))
