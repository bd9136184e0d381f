"""One serving process from plain values: base, tokenizer, engine, adapters, the OpenAI app.

``launch.serve`` calls :func:`build_server` with its flags; each Ray Serve replica
(``serving/ray_app.py``) calls it with the replica spec, so a replica serves exactly what the
single-process server serves.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from icarus_jax.errors import IcarusError
from icarus_jax.serving.engine_config import EngineConfig


@dataclasses.dataclass(frozen=True)
class ServerSpec:
  """What one server process loads (the ``launch.serve`` flags of the same names).

  ``adapters``: adapter dirs or dirs of adapter dirs, each optionally ``name=dir``; None: the
  adapters shipped for ``base`` of the engine mode's kind.
  """
  base: str | None = None
  adapters: Sequence[str] | None = None
  engine: EngineConfig = EngineConfig()
  base_name: str = "base"
  dtype: str | None = None
  tokenizer: str | None = None
  chat_template: str | None = None
  mesh: str | None = None
  api_key: str | None = None
  allow_runtime_lora: bool = False
  lora_roots: Sequence[str] | None = None
  trust_foreign_adapters: bool = False


def build_server(spec: ServerSpec):
  """``(AsyncEngine, FastAPI app)``: the engine started, adapters registered (the disk tier when
  ``spec.engine.max_host_adapters`` is set), sharded over ``spec.mesh`` if given. Adapters of the
  wrong kind or base are skipped with a warning; a bad ``adapters`` entry raises
  ``IcarusError``."""
  from icarus_jax.checkpoints.assets import default_adapters_dir, load_any_base, load_base_tokenizer
  from icarus_jax.checkpoints.peft_io import adapter_specs, load_adapter
  from icarus_jax.serving.async_engine import AsyncEngine
  from icarus_jax.serving.engine import Engine
  from icarus_jax.serving.server import create_app

  cfg, base = load_any_base(spec.base, dtype=spec.dtype)
  tokenizer, chat = load_base_tokenizer(spec.base, tokenizer=spec.tokenizer,
                                        chat_template=spec.chat_template)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise IcarusError(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                      f"{cfg.vocab_size}")
  engine = Engine.from_config(cfg, base, spec.engine, tokenizer=tokenizer)
  kind = "icarus_lora" if spec.engine.mode == "icarus" else "lora"
  shipped = default_adapters_dir(spec.base)
  paths = list(spec.adapters) if spec.adapters is not None else (
      [str(p) for p in sorted(shipped.glob(f"*-{kind}"))] if shipped and shipped.exists()
      else [])
  trusted = engine.fingerprint if spec.trust_foreign_adapters else None
  for name, d in adapter_specs(paths):
    try:
      if spec.engine.max_host_adapters is not None:  # disk tier
        engine.register_adapter(d, name, loader=lambda p, n: load_adapter(
            p, kind=kind, name=n, base_fingerprint=trusted))
      else:
        engine.add_adapter(load_adapter(d, kind=kind, name=name, base_fingerprint=trusted), name)
      logging.info("loaded adapter %s from %s", name, d)
    except IcarusError as e:
      logging.warning("skipping adapter %s: %s", d, e)
  if spec.mesh:
    from icarus_jax.model.sharding import make_mesh, shard_engine
    shard_engine(engine, make_mesh(spec.mesh))
  aengine = AsyncEngine(engine).start()
  return aengine, create_app(aengine, tokenizer, base_name=spec.base_name, chat_template=chat,
                             api_key=spec.api_key, allow_runtime_lora=spec.allow_runtime_lora,
                             lora_roots=spec.lora_roots,
                             trust_foreign_adapters=spec.trust_foreign_adapters)
