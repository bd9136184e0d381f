"""Naive generation: recompute the whole sequence with no cache at every step. Used by tests.

``mode="icarus"``: the ICaRus model (``decode(encode(tokens))``); ``mode="isolated"``: the
conventional model (``forward`` with the adapter everywhere).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from icarus_jax.model.adapters import Adapter
from icarus_jax.model.config import ModelConfig
from icarus_jax.model.transformer import forward
from icarus_jax.model.params import Params


def reference_generate(cfg: ModelConfig, params: Params, adapter: Adapter | None, prompt,
                       max_tokens: int, *, stop_token_ids=()) -> list[int]:
  """Greedy tokens after ``prompt``; the full forward is recomputed for every new token.

  The sequence is right-padded to a power-of-two length (at least 32) so the jitted forward
  compiles once per bucket; causality makes the padding invisible to the real positions.
  """
  toks = [int(t) for t in prompt]
  out = []
  for _ in range(max_tokens):
    n = len(toks)
    padded = min(max(32, 1 << (n - 1).bit_length()), cfg.max_seq_len)
    arr = np.zeros((1, max(padded, n)), np.int32)
    arr[0, :n] = toks
    logits = forward(cfg, params, arr, adapter)
    t = int(jnp.argmax(logits[0, n - 1]))
    out.append(t)
    toks.append(t)
    if t in stop_token_ids or len(toks) >= cfg.max_seq_len:
      break
  return out
