"""Batched greedy generation with a contiguous cache, for evaluation.

ICaRus adapters generate through the two streams: the encoder writes the shared cache and the
decoder (with the adapter) reads it; no merged model is built. Conventional adapters (and the
base) run one stream that writes its own cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from icarus_jax.model.adapters import Adapter
from icarus_jax.model.config import ModelConfig
from icarus_jax.model.transformer import decoder_stream, init_cache, model_view, single_stream
from icarus_jax.model.params import Params


@functools.partial(jax.jit, static_argnames=("cfg", "icarus"))
def _prefill(cfg, base, weights, lora, cache, tokens, lengths, icarus: bool):
  B, P = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  last = (lengths - 1)[:, None]
  if icarus:
    _, cache = single_stream(cfg, base, {"layers": {}}, tokens, pos, cache, False)
    tok_last = jnp.take_along_axis(tokens, last, axis=1)
    logits = decoder_stream(cfg, weights, lora, tok_last, last, cache)[:, 0]
  else:
    logits, cache = single_stream(cfg, weights, lora, tokens, pos, cache, True)
    logits = jnp.take_along_axis(logits, last[:, :, None], axis=1)[:, 0]
  return jnp.argmax(logits, -1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("cfg", "icarus"), donate_argnums=(4,))
def _step(cfg, base, weights, lora, cache, tok, pos, icarus: bool):
  tok, pos = tok[:, None], pos[:, None]
  if icarus:
    _, cache = single_stream(cfg, base, {"layers": {}}, tok, pos, cache, False)
    logits = decoder_stream(cfg, weights, lora, tok, pos, cache)[:, 0]
  else:
    logits, cache = single_stream(cfg, weights, lora, tok, pos, cache, True)
    logits = logits[:, 0]
  return jnp.argmax(logits, -1).astype(jnp.int32), cache


def greedy_generate(cfg: ModelConfig, base: Params, adapter: Adapter | None,
                    prompts: list[list[int]], max_new_tokens: int, *, eos_id: int | None = None,
                    batch_size: int = 128) -> list[list[int]]:
  """Greedy continuations (stopping at ``eos_id``, which is included) for each prompt."""
  icarus = adapter is not None and adapter.config.is_icarus
  weights, lora = model_view(base, adapter)
  out: list[list[int]] = []
  for s in range(0, len(prompts), batch_size):
    chunk = prompts[s:s + batch_size]
    n = len(chunk)
    B = batch_size if len(prompts) > batch_size else n
    lens = np.array([len(p) for p in chunk] + [1] * (B - n), np.int32)
    P = int(-(-lens.max() // 16) * 16)
    toks = np.zeros((B, P), np.int32)
    for i, p in enumerate(chunk):
      toks[i, :len(p)] = p
    cache = init_cache(cfg, B, P + max_new_tokens)
    nxt, cache = _prefill(cfg, base, weights, lora, cache, toks, lens, icarus=icarus)
    gen = [np.asarray(nxt)]
    pos = lens.copy()
    for _ in range(max_new_tokens - 1):
      done = np.zeros(B, bool) if eos_id is None else np.any(np.stack(gen) == eos_id, axis=0)
      if done[:n].all():
        break
      nxt, cache = _step(cfg, base, weights, lora, cache, nxt, pos, icarus=icarus)
      pos = pos + 1
      gen.append(np.asarray(nxt))
    g = np.stack(gen, axis=1)
    for i in range(n):
      row = [int(t) for t in g[i]]
      if eos_id is not None and eos_id in row:
        row = row[:row.index(eos_id) + 1]
      out.append(row)
  return out


def exact_match_accuracy(cfg, base, adapter, prompts, answers, tok, *, max_new_tokens: int = 16,
                         batch_size: int = 128) -> tuple[float, list[str]]:
  """Fraction of greedy answers (decoded up to eos) equal to the reference answers."""
  outs = greedy_generate(cfg, base, adapter, prompts, max_new_tokens, eos_id=tok.eos_id,
                         batch_size=batch_size)
  texts = [tok.decode([t for t in o if t != tok.eos_id]) for o in outs]
  correct = sum(t == a for t, a in zip(texts, answers))
  return correct / max(1, len(answers)), texts
