"""Adapters on disk in PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

LoRA adapters use PEFT's key names and shapes exactly
(``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]``,
``...lora_B.weight`` ``[out, r]``, ``base_model.model.lm_head.lora_A.weight``), so adapters trained
here load in PEFT/vLLM and PEFT adapters load here. Our metadata (name, kind, base fingerprint)
travels in the safetensors header under the key ``icarus`` and in ``adapter_config.json`` under
``icarus``; PEFT ignores both.

Full-decoder adapters (``icarus_full``/``full``) have no PEFT equivalent; they are written with
``peft_type: "ICARUS_FULL"`` and Hugging Face tensor names of the weights they replace.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from icarus_jax.model.adapters import Adapter, AdapterConfig
from icarus_jax.errors import AdapterGateError, CheckpointError, IcarusError
from icarus_jax.checkpoints.hf import LAYER_MAP, TOP_MAP

log = logging.getLogger("icarus_jax.checkpoints.peft_io")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# our target -> PEFT module name
PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj", "lm_head": "lm_head"}
FROM_PEFT = {v: k for k, v in PEFT_MODULES.items()}
_BASE_COPY_RE = re.compile(r"^base_model\.model\..*\.base_layer\.weight$")
_KEY_RE = re.compile(r"^base_model\.model\.(?:model\.layers\.(\d+)\.(?:self_attn|mlp)\.)?"
                     r"(\w+)\.lora_([AB])(?:\.default)?\.weight$")


def _module_path(target: str, layer: int | None) -> str:
  if target == "lm_head":
    return PREFIX + "lm_head"
  hf = LAYER_MAP[target][0].rsplit(".", 1)[0]  # e.g. self_attn.q_proj
  return f"{PREFIX}model.layers.{layer}.{hf}"


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> None:
  """Writes ``adapter`` to directory ``path`` (PEFT layout for LoRA kinds)."""
  from safetensors.numpy import save_file
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  ac = adapter.config
  meta = {"name": ac.name, "kind": ac.kind, "base_fingerprint": ac.base_fingerprint,
          "targets": list(ac.targets), "format_version": 1}
  tensors: dict[str, np.ndarray] = {}
  if ac.is_lora:
    for t, ab in adapter.params.get("layers", {}).items():
      a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
      for i in range(a.shape[0]):
        tensors[_module_path(t, i) + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)
        tensors[_module_path(t, i) + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)
    if "lm_head" in adapter.params:
      ab = adapter.params["lm_head"]
      tensors[_module_path("lm_head", None) + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"]).T)
      tensors[_module_path("lm_head", None) + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"]).T)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ac.rank, "lora_alpha": ac.alpha,
        "target_modules": [PEFT_MODULES[t] for t in ac.targets], "use_rslora": ac.use_rslora,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "use_dora": False, "base_model_name_or_path": None, "icarus": meta,
    }
  else:
    for t, w in adapter.params.get("layers", {}).items():
      hf, transpose = LAYER_MAP[t]
      w = np.asarray(w)
      for i in range(w.shape[0]):
        tensors[f"model.layers.{i}.{hf}"] = np.ascontiguousarray(w[i].T if transpose else w[i])
    for t, w in adapter.params.items():
      if t == "layers":
        continue
      hf, transpose = TOP_MAP[t]
      w = np.asarray(w)
      tensors[hf] = np.ascontiguousarray(w.T if transpose else w)
    config = {"peft_type": "ICARUS_FULL", "target_modules": list(ac.targets), "icarus": meta}
  (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  save_file(tensors, str(path / WEIGHTS_FILE),
            metadata={"format": "pt", "icarus": json.dumps(meta)})


def _read_config(path: Path) -> dict:
  f = path / CONFIG_FILE
  if not f.exists():
    raise CheckpointError(f"{path}: missing {CONFIG_FILE} (expected a PEFT adapter directory)")
  try:
    cfg = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{f}: malformed JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise CheckpointError(f"{f}: expected a JSON object")
  return cfg


def _read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
  from safetensors import safe_open
  f = path / WEIGHTS_FILE
  if not f.exists():
    raise CheckpointError(f"{path}: missing {WEIGHTS_FILE}")
  try:
    h = safe_open(str(f), framework="numpy")
    meta = h.metadata() or {}
    tensors = {}
    for k in h.keys():
      try:
        tensors[k] = h.get_tensor(k)
      except Exception as e:
        raise CheckpointError(f"{f}: cannot read tensor {k!r} ({type(e).__name__}: {e}); the file "
                              f"may be truncated") from None
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f"{f}: cannot read safetensors file ({type(e).__name__}: {e}); the file "
                          f"may be truncated or not a safetensors file") from None
  return tensors, meta


def adapter_name(path: str | os.PathLike) -> str:
  """The serving name of an adapter directory: the one recorded at training
  (``adapter_config.json`` -> ``icarus.name``), else the directory's name."""
  path = Path(path)
  try:
    meta = _read_config(path).get("icarus") or {}
  except CheckpointError:  # unreadable: loading it reports why
    meta = {}
  name = meta.get("name") if isinstance(meta, dict) else None
  return name if isinstance(name, str) and name else path.name


def adapter_specs(specs) -> list[tuple[str, Path]]:
  """``launch.serve --adapters`` entries -> ``[(serving name, adapter dir)]``.

  An entry is ``dir`` or ``name=dir``; ``dir`` holds one adapter (``adapter_config.json``) or
  adapters in subdirectories. Names default to the recorded one (``launch.train --name``), else
  the directory's; two adapters with one name are an error naming both paths."""
  out: list[tuple[str, Path]] = []
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep:
      name, path = None, spec
    p = Path(path)
    if (p / "adapter_config.json").exists():
      out.append((name or adapter_name(p), p))
    elif p.is_dir() and name is None:
      out += [(adapter_name(d), d) for d in sorted(p.iterdir())
              if (d / "adapter_config.json").exists()]
    else:
      raise IcarusError(f"{p} is not an adapter dir (adapter_config.json)"
                        + ("" if sep else " nor a dir of adapters"))
  seen: dict[str, Path] = {}
  for name, p in out:
    if name in seen:
      raise IcarusError(f"two adapters are named {name!r}: {seen[name]} and {p}; name one "
                        f"explicitly (--adapters=other_name={p}) or train it with "
                        f"`launch.train --name`")
    seen[name] = p
  return out


def load_adapter(path: str | os.PathLike, *, kind: str | None = None, name: str | None = None,
                 base_fingerprint: str | None = None, dtype: str | None = None) -> Adapter:
  """Reads an adapter directory written by ``save_adapter`` or by PEFT.

  Args:
    path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
    kind: adapter kind; default: the recorded kind, else ``icarus_lora`` (so a PEFT adapter that
      targets ``k_proj``/``v_proj`` is refused for the shared cache: pass ``kind="lora"`` to load
      it as a conventional model).
    name: serving name; default: the recorded name, else the directory name.
    base_fingerprint: asserts the base it was trained on when the files record none (foreign
      PEFT adapters; ``launch.serve --trust_foreign_adapters`` passes the served base's); a
      recorded fingerprint that differs is an error. Saved copies of base weights
      (``...base_layer.weight``, written by PEFT for a targeted ``lm_head``) are ignored with a
      warning.
    dtype: cast the arrays (default: as stored).
  Raises:
    CheckpointError: missing/malformed files, missing or mis-shaped tensors.
    AdapterGateError: an ICaRus kind whose targets would change K/V.
  """
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a directory (expected a PEFT adapter directory)")
  cfg = _read_config(path)
  tensors, header = _read_tensors(path)
  meta = cfg.get("icarus") or {}
  if not meta and "icarus" in header:
    try:
      meta = json.loads(header["icarus"])
    except json.JSONDecodeError:
      meta = {}
  kind = kind or meta.get("kind") or "icarus_lora"
  name = name or meta.get("name") or path.name
  fp = meta.get("base_fingerprint")
  if base_fingerprint is not None:
    if fp is not None and fp != base_fingerprint:
      from icarus_jax.errors import FingerprintMismatchError
      raise FingerprintMismatchError(f"{path}: adapter records base {fp}, not {base_fingerprint}")
    fp = base_fingerprint
  cast = (lambda x: jnp.asarray(x, jnp.dtype(dtype))) if dtype else jnp.asarray
  peft_type = cfg.get("peft_type")

  if peft_type == "ICARUS_FULL":
    return _load_full(path, cfg, tensors, kind, name, fp, cast)
  if peft_type != "LORA":
    raise CheckpointError(f"{path / CONFIG_FILE}: peft_type={peft_type!r} is not supported; "
                          f"accepted: 'LORA' (or 'ICARUS_FULL' written by icarus-jax)")
  for bad_key in ("use_dora", "layers_to_transform", "modules_to_save", "rank_pattern",
                  "alpha_pattern"):
    if cfg.get(bad_key):
      raise CheckpointError(f"{path / CONFIG_FILE}: {bad_key}={cfg[bad_key]!r} is not supported")
  modules = cfg.get("target_modules")
  if isinstance(modules, str):
    modules = [modules]
  if not isinstance(modules, list) or not modules:
    raise CheckpointError(f"{path / CONFIG_FILE}: target_modules must be a non-empty list of module "
                          f"names, got {modules!r}")
  unknown = [m for m in modules if m not in FROM_PEFT]
  if unknown:
    raise CheckpointError(f"{path / CONFIG_FILE}: target_modules {unknown} are not supported; "
                          f"accepted: {sorted(FROM_PEFT)}")
  targets = tuple(FROM_PEFT[m] for m in modules)
  try:
    rank = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", rank))
  except (KeyError, TypeError, ValueError):
    raise CheckpointError(f"{path / CONFIG_FILE}: missing or invalid 'r' / 'lora_alpha'") from None
  # The gate runs here: an ICaRus kind with k/v targets raises AdapterGateError naming them.
  acfg = AdapterConfig(name=name, kind=kind, targets=targets, rank=rank, alpha=alpha,
                       base_fingerprint=fp, use_rslora=bool(cfg.get("use_rslora", False)))

  # Group tensors: (target, layer) -> {"A": [r, in], "B": [out, r]}.
  found: dict[tuple[str, int | None], dict[str, np.ndarray]] = {}
  base_copies = []
  for k, arr in tensors.items():
    if _BASE_COPY_RE.match(k):  # PEFT saves the wrapped base weight (e.g. a targeted lm_head)
      base_copies.append(k)
      continue
    m = _KEY_RE.match(k)
    if not m:
      raise CheckpointError(f"{path / WEIGHTS_FILE}: unexpected tensor {k!r} (not a PEFT LoRA key)")
    layer, module, ab = m.group(1), m.group(2), m.group(3)
    if module not in FROM_PEFT or FROM_PEFT[module] not in targets:
      raise CheckpointError(f"{path / WEIGHTS_FILE}: tensor {k!r} is for module {module!r}, which "
                            f"is not in target_modules {modules}")
    found.setdefault((FROM_PEFT[module], None if layer is None else int(layer)), {})[ab] = arr
  if base_copies:
    log.warning("%s: ignoring %d saved copies of base weights (%s%s); the served base's own "
                "weights are used", path / WEIGHTS_FILE, len(base_copies), base_copies[0],
                ", ..." if len(base_copies) > 1 else "")
  layers = sorted({l for (_, l) in found if l is not None})
  n_layers = (max(layers) + 1) if layers else 0
  params: dict = {"layers": {}}
  for t in targets:
    idx = [None] if t == "lm_head" else list(range(n_layers))
    if t != "lm_head" and not idx:
      raise CheckpointError(f"{path / WEIGHTS_FILE}: no tensors for target {PEFT_MODULES[t]!r}")
    a_list, b_list = [], []
    for i in idx:
      pair = found.get((t, i), {})
      for ab in ("A", "B"):
        if ab not in pair:
          raise CheckpointError(f"{path / WEIGHTS_FILE}: missing tensor "
                                f"{_module_path(t, i) + f'.lora_{ab}.weight'!r}")
      A, B = pair["A"], pair["B"]
      if A.ndim != 2 or B.ndim != 2 or A.shape[0] != rank or B.shape[1] != rank:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: {_module_path(t, i)} has lora_A {A.shape} and "
                              f"lora_B {B.shape}; expected [r={rank}, in] and [out, r={rank}]")
      if a_list and (A.shape != a_list[0].shape[::-1] or B.shape != b_list[0].shape[::-1]):
        raise CheckpointError(f"{path / WEIGHTS_FILE}: {_module_path(t, i)} shapes {A.shape}/{B.shape} "
                              f"differ from layer 0")
      a_list.append(np.ascontiguousarray(A.T))
      b_list.append(np.ascontiguousarray(B.T))
    if t == "lm_head":
      params["lm_head"] = {"a": cast(a_list[0]), "b": cast(b_list[0])}
    else:
      params["layers"][t] = {"a": cast(np.stack(a_list)), "b": cast(np.stack(b_list))}
  return Adapter(params, acfg)


def _load_full(path, cfg, tensors, kind, name, fp, cast) -> Adapter:
  targets = tuple(cfg.get("target_modules") or ())
  if kind not in ("icarus_full", "full"):
    raise IcarusError(f"{path}: a full adapter cannot be loaded as kind {kind!r}")
  acfg = AdapterConfig(name=name, kind=kind, targets=targets, rank=0, alpha=0.0, base_fingerprint=fp)
  params: dict = {"layers": {}}
  for t in targets:
    if t in LAYER_MAP:
      hf, transpose = LAYER_MAP[t]
      ws = []
      i = 0
      while f"model.layers.{i}.{hf}" in tensors:
        w = tensors[f"model.layers.{i}.{hf}"]
        ws.append(w.T if transpose else w)
        i += 1
      if not ws:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: missing tensor 'model.layers.0.{hf}'")
      params["layers"][t] = cast(np.stack(ws))
    elif t in TOP_MAP:
      hf, transpose = TOP_MAP[t]
      if hf not in tensors:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: missing tensor {hf!r}")
      params[t] = cast(tensors[hf].T if transpose else tensors[hf])
    else:
      raise CheckpointError(f"{path / CONFIG_FILE}: unknown full-adapter target {t!r}")
  return Adapter(params, acfg)


__all__ = ["save_adapter", "load_adapter", "AdapterGateError"]
