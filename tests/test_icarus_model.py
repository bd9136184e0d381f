"""The two-stream ICaRus model: the invariants of DESIGN.md section 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icarus_jax import (IcarusError, decode, encode, forward, init_adapter, init_cache,
                        merge_adapter)
from icarus_jax.model.transformer import forward_with_cache


def _greedy(cfg, params, adapter, prompt, steps):
  toks = list(prompt)
  for _ in range(steps):
    lg = forward(cfg, params, np.array([toks]), adapter)
    toks.append(int(jnp.argmax(lg[0, -1])))
  return toks[len(prompt):]


@pytest.mark.parametrize("kind", ["icarus_lora", "icarus_full", "lora"])
def test_zero_adapter_reproduces_base(tiny, rng, kind):
  cfg, params = tiny
  ad = init_adapter(cfg, jax.random.key(3), kind=kind, base_params=params)
  toks = rng.randint(0, cfg.vocab_size, (2, 24))
  base = np.asarray(forward(cfg, params, toks))
  got = np.asarray(forward(cfg, params, toks, ad))
  assert np.abs(base - got).max() <= 1e-6
  prompt = list(toks[0, :8])
  assert _greedy(cfg, params, ad, prompt, 6) == _greedy(cfg, params, None, prompt, 6)


def test_one_cache_serves_every_adapter_and_the_base_model_writes_the_same_bits(tiny,
                                                                             tiny_adapters, rng):
  """Teacher-forced serving, encode/decode interleaved: the cache the ICaRus encoder writes
  equals, bit for bit, the cache the plain base model writes for itself (a conventional forward
  with a cache), and the adapters decoding over that one cache predict differently.

  (That the pages are bitwise equal *whichever adapter is served* is shown where an adapter can
  reach the K/V path, the engine's fused step: ``tests/test_hardening.py::
  test_engine_fused_step_writes_bitwise_equal_kv_for_every_adapter``.)
  """
  cfg, params = tiny
  toks = rng.randint(0, cfg.vocab_size, (2, 20))
  pos = lambda t: np.full((2, 1), t, np.int32)  # noqa: E731
  cache = init_cache(cfg, 2, 24)
  own = init_cache(cfg, 2, 24)
  logits = {i: [] for i in range(len(tiny_adapters))}
  for t in range(toks.shape[1]):
    cache = encode(cfg, params, toks[:, t:t + 1], positions=pos(t), cache=cache)
    _, own = forward_with_cache(cfg, params, toks[:, t:t + 1], own, positions=pos(t))
    for i, ad in enumerate(tiny_adapters):
      logits[i].append(np.asarray(decode(cfg, params, ad, toks[:, t:t + 1], cache,
                                         positions=pos(t))))
  np.testing.assert_array_equal(np.asarray(own["k"]), np.asarray(cache["k"]))
  np.testing.assert_array_equal(np.asarray(own["v"]), np.asarray(cache["v"]))
  outs = [np.concatenate(v, axis=1) for v in logits.values()]
  for i in range(len(outs)):
    for j in range(i + 1, len(outs)):
      # observed pairwise max |diff| >= 0.5 with b_std 0.05; a shared or ignored adapter gives 0
      assert np.abs(outs[i] - outs[j]).max() > 0.1


def test_decoder_at_t_depends_only_on_token_t_and_the_cache(tiny, tiny_adapters, rng):
  cfg, params = tiny
  ad = tiny_adapters[0]
  toks = rng.randint(0, cfg.vocab_size, (2, 16))
  kv = encode(cfg, params, toks)
  full = np.asarray(decode(cfg, params, ad, toks, kv))
  # Change every decoder input except the last token; the cache is unchanged.
  scrambled = toks.copy()
  scrambled[:, :-1] = rng.randint(0, cfg.vocab_size, (2, 15))
  got = np.asarray(decode(cfg, params, ad, scrambled, kv))
  np.testing.assert_array_equal(got[:, -1], full[:, -1])
  assert np.abs(got[:, :-1] - full[:, :-1]).max() > 1e-3  # earlier positions did change
  # Running the decoder at the last position alone gives the same logits.
  last = np.asarray(decode(cfg, params, ad, toks[:, -1:], kv, positions=np.full((2, 1), 15)))
  assert np.abs(last[:, 0] - full[:, -1]).max() <= 1e-5
  # ...whereas changing the cache (the encoder's view of earlier tokens) does change it.
  kv2 = encode(cfg, params, scrambled)
  other = np.asarray(decode(cfg, params, ad, toks, kv2))
  assert np.abs(other[:, -1] - full[:, -1]).max() > 1e-3


@pytest.mark.parametrize("kind", ["icarus_lora", "icarus_full"])
def test_full_sequence_decode_equals_step_by_step(tiny, rng, kind):
  cfg, params = tiny
  ad = init_adapter(cfg, jax.random.key(5), kind=kind, base_params=params, b_std=0.05)
  toks = rng.randint(0, cfg.vocab_size, (2, 18))
  full = np.asarray(forward(cfg, params, toks, ad))
  cache = init_cache(cfg, 2, 32)
  steps = []
  for t in range(18):
    p = np.full((2, 1), t, np.int32)
    cache = encode(cfg, params, toks[:, t:t + 1], positions=p, cache=cache)
    steps.append(np.asarray(decode(cfg, params, ad, toks[:, t:t + 1], cache, positions=p)))
  assert np.abs(np.concatenate(steps, 1) - full).max() <= 1e-5
  # Chunked prefill (7 + 11 tokens) then decode at the last position gives the same answer.
  cache = init_cache(cfg, 2, 32)
  cache = encode(cfg, params, toks[:, :7], cache=cache)
  cache = encode(cfg, params, toks[:, 7:], positions=np.arange(7, 18)[None].repeat(2, 0), cache=cache)
  last = np.asarray(decode(cfg, params, ad, toks[:, -1:], cache, positions=np.full((2, 1), 17)))
  assert np.abs(last[:, 0] - full[:, -1]).max() <= 1e-5


def test_icarus_differs_from_conventional_application(tiny, tiny_adapters, rng):
  """The same LoRA weights applied conventionally (adapter also on the K/V path via the hidden
  state) give another model: ICaRus is not a merge."""
  cfg, params = tiny
  ad = tiny_adapters[1]
  toks = rng.randint(0, cfg.vocab_size, (1, 12))
  icarus = np.asarray(forward(cfg, params, toks, ad))
  conventional = np.asarray(forward(cfg, params, toks, ad.replace(kind="lora")))
  assert np.abs(icarus - conventional).max() > 1e-3


def test_merge_adapter_matches_unmerged_conventional(tiny, rng):
  cfg, params = tiny
  ad = init_adapter(cfg, jax.random.key(9), kind="lora", base_params=params, b_std=0.05)
  toks = rng.randint(0, cfg.vocab_size, (2, 10))
  merged = merge_adapter(cfg, params, ad)
  a = np.asarray(forward(cfg, params, toks, ad))
  b = np.asarray(forward(cfg, merged, toks))
  assert np.abs(a - b).max() <= 1e-4


def test_bad_tokens_and_conventional_adapter_in_decode(tiny, tiny_adapters):
  cfg, params = tiny
  with pytest.raises(IcarusError, match=r"token ids must be in \[0, 272\)"):
    forward(cfg, params, np.array([[1, 2, 272]]))
  with pytest.raises(IcarusError, match="shape"):
    forward(cfg, params, np.array([1, 2, 3]))
  with pytest.raises(IcarusError, match="empty"):
    forward(cfg, params, np.zeros((1, 0), np.int32))
  toks = np.array([[1, 2, 3]])
  kv = encode(cfg, params, toks)
  with pytest.raises(IcarusError, match="kind 'lora'"):
    decode(cfg, params, tiny_adapters[0].replace(kind="lora"), toks, kv)


def test_bfloat16_model_runs_and_tracks_float32(tiny, tiny_adapters, rng):
  cfg, params = tiny
  cfg16 = cfg.replace(dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  ad16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_adapters[0])
  toks = rng.randint(0, cfg.vocab_size, (1, 12))
  kv = encode(cfg16, p16, toks)
  assert kv["k"].dtype == jnp.bfloat16
  a = np.asarray(forward(cfg16, p16, toks, ad16))
  b = np.asarray(forward(cfg, params, toks, tiny_adapters[0]))
  assert np.abs(a - b).max() < 0.1
