"""The embedded default base (``icarus_jax/assets/small_base``) and generic base loading."""

from __future__ import annotations

import os
from pathlib import Path

from icarus_jax.errors import CheckpointError

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_BASE = ASSETS / "small_base"
DEFAULT_ADAPTERS = ASSETS / "adapters"


def load_any_base(path: str | os.PathLike | None = None, *, dtype: str | None = None):
  """``(config, params)`` from a Hugging Face dir, an icarus-jax Orbax base, or the default."""
  from icarus_jax.hf_checkpoint import load_hf
  from icarus_jax.orbax_io import load_base
  p = Path(path) if path else DEFAULT_BASE
  if (p / "model_config.json").exists():
    return load_base(p)
  if (p / "config.json").exists():
    return load_hf(p, dtype=dtype)
  if path is None:
    raise CheckpointError(f"the embedded default base is missing at {p}; regenerate it with "
                          f"`python -m launch.pretrain` (see README)")
  raise CheckpointError(f"{p}: neither a Hugging Face directory (config.json) nor an icarus-jax "
                        f"base checkpoint (model_config.json)")
