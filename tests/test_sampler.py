"""The sampler inside the serving step against exact numpy references.

Each feature (presence / frequency / repetition penalties, min-p, logit_bias, logprobs) is
checked against ``sampling.sample_reference`` (float64 numpy, written from the definition
alone), deterministically where the feature is deterministic (adjusted logits, greedy argmax,
logprobs) and with a chi-square test where it shapes a distribution. Engine level: the logprobs a
request gets equal numpy's log-softmax of the naive full-recompute model's logits, and a row
with penalties and biases does not change its neighbours' tokens.
"""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icarus_jax import IcarusError, init_adapter
from icarus_jax.model.transformer import forward
from icarus_jax.serving.engine import Engine
from icarus_jax.serving.sampling import (SamplingParams, adjusted_logits, adjustments, pack,
                                         sample_reference, sample_rows)

V = 40


def rows_batch(params, contexts, outs):
  adj = [adjustments(p, c, o) for p, c, o in zip(params, contexts, outs)]
  return jax.tree.map(jnp.asarray, pack(params, outs, adj, len(params)))


def ctx(rng, n_prompt, n_out):
  return list(rng.randint(0, V, n_prompt + n_out)), n_out


CASES = {
    "presence": SamplingParams(presence_penalty=1.5),
    "frequency": SamplingParams(frequency_penalty=0.7),
    "negative_presence": SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.3),
    "repetition": SamplingParams(repetition_penalty=1.8),
    "repetition_below_one": SamplingParams(repetition_penalty=0.6),
    "bias": SamplingParams(logit_bias={3: 5.0, 17: -100.0, 39: 2.5}),
    "all": SamplingParams(presence_penalty=0.5, frequency_penalty=0.4, repetition_penalty=1.3,
                          logit_bias={0: 1.0, 5: -3.0}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_adjusted_logits_greedy_and_logprobs_equal_numpy(name):
  """Bias and penalties on 6 rows with different histories (one row with none), logits and
  logprobs to 1e-5, greedy tokens exact."""
  rng = np.random.RandomState(zlib.crc32(name.encode()))
  sp = CASES[name]
  logits = rng.randn(6, V).astype(np.float32) * 2
  contexts, outs = zip(*[ctx(rng, 7, n) for n in (0, 1, 3, 9, 12, 20)])
  params = [sp] * 5 + [SamplingParams()]
  s = rows_batch(params, contexts, outs)
  got = np.asarray(adjusted_logits(jnp.asarray(logits), s))
  res = sample_rows(jnp.asarray(logits), s, num_top=5, with_logprobs=True)
  for i in range(6):
    probs, lp = sample_reference(logits[i], params[i], contexts[i], outs[i])
    x = lp  # temperature 0: the logprobs are the log-softmax of the adjusted logits
    np.testing.assert_allclose(got[i] - got[i].max(), x - x.max(), atol=1e-4)
    assert int(res.tokens[i]) == int(np.argmax(probs))
    np.testing.assert_allclose(float(res.logprob[i]), lp[int(res.tokens[i])], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.top_ids[i]), np.argsort(-lp, kind="stable")[:5])
    np.testing.assert_allclose(np.asarray(res.top_logprobs[i]), np.sort(lp)[::-1][:5], atol=1e-5)
  assert np.array_equal(got[5], logits[5])  # no adjustments: untouched


LOGITS = np.array([2.0, 1.6, 1.3, 1.0, 0.6, 0.2, -0.3, -1.0, -2.0, -3.0], np.float32)


def chi2_ok(counts, expected, n):
  assert counts[expected == 0].sum() == 0, (counts, expected)  # nothing outside the support
  support = expected > 0
  exp_counts = expected[support] * n
  chi2 = float((((counts[support] - exp_counts) ** 2) / exp_counts).sum())
  dof = int(support.sum()) - 1
  z = 3.719  # p = 1e-4 (Wilson-Hilferty)
  crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3 if dof else 0.0
  assert chi2 <= crit, (chi2, crit, counts, np.round(exp_counts))


@pytest.mark.parametrize("sp", [
    SamplingParams(temperature=1.0, min_p=0.3),
    SamplingParams(temperature=0.8, min_p=0.1, top_k=5),
    SamplingParams(temperature=1.0, min_p=0.05, top_p=0.8),
    SamplingParams(temperature=1.1, presence_penalty=0.8, frequency_penalty=0.3,
                   repetition_penalty=1.4, logit_bias={9: 4.0, 0: -2.0}),
], ids=["min_p", "min_p+top_k", "min_p+top_p", "penalties+bias"])
def test_sampled_tokens_follow_the_exact_distribution(sp):
  n = 8000
  context, n_out = [0, 1, 1, 2, 7, 0, 0], 4
  expected, lp = sample_reference(LOGITS, sp, context, n_out)
  s = pack([sp] * n, [n_out] * n, [adjustments(sp, context, n_out)] * n, n)
  s = jax.tree.map(jnp.asarray, dataclasses_replace(s, seed=np.arange(n, dtype=np.uint32)))
  res = sample_rows(jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size)), s, num_top=3,
                    with_logprobs=True)
  toks = np.asarray(res.tokens)
  chi2_ok(np.bincount(toks, minlength=LOGITS.size), expected, n)
  np.testing.assert_allclose(np.asarray(res.logprob), lp[toks], atol=1e-5)


def dataclasses_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


def test_rows_with_and_without_adjustments_share_a_step():
  """A free row's tokens (greedy and seeded) are the same alone and beside rows with
  penalties, biases and logprobs (the batch then has W > 0 adjustment slots)."""
  rng = np.random.RandomState(3)
  logits = jnp.asarray(rng.randn(4, V).astype(np.float32))
  free = [SamplingParams(), SamplingParams(temperature=0.9, seed=11)]
  other = [SamplingParams(repetition_penalty=2.0, logprobs=3),
           SamplingParams(temperature=1.0, logit_bias={1: 50.0}, seed=2)]
  contexts, outs = [list(range(10))] * 4, [2] * 4
  alone = sample_rows(logits[:2], rows_batch(free, contexts[:2], outs[:2]))
  mixed = sample_rows(logits, rows_batch(free + other, contexts, outs), num_top=3,
                      with_logprobs=True)
  assert np.asarray(mixed.tokens)[:2].tolist() == np.asarray(alone.tokens).tolist()
  assert int(mixed.tokens[3]) == 1  # a +50 bias wins


def test_sampling_params_validation():
  for bad in [dict(min_p=1.5), dict(presence_penalty=3.0), dict(frequency_penalty=-2.5),
              dict(repetition_penalty=0.0), dict(logit_bias={"x": 1.0}),
              dict(logit_bias={5: 101.0}), dict(logit_bias={-1: 1.0}), dict(logprobs=21),
              dict(logprobs=-1), dict(min_p=float("nan"))]:
    with pytest.raises(IcarusError):
      SamplingParams(**bad)
  assert SamplingParams(logit_bias={"5": 1, 2: -1.0}).logit_bias == ((2, -1.0), (5, 1.0))
  with pytest.raises(IcarusError, match="logit_bias token ids must be in"):
    SamplingParams(logit_bias={500: 1.0}).check_vocab(256)


# ------------------------------------------------------------------------------- engine level

@pytest.mark.parametrize("mode", ["icarus", "isolated"])
def test_engine_logprobs_equal_the_reference_models_log_softmax(tiny, mode):
  cfg, base = tiny
  kind = "icarus_lora" if mode == "icarus" else "lora"
  ad = init_adapter(cfg, jax.random.key(41), name="a", kind=kind, base_params=base, rank=4,
                    b_std=0.06)
  eng = Engine(cfg, base, mode=mode, num_pages=64, page_size=8, max_batch=4, prefill_chunk=16)
  eng.add_adapter(ad)
  prompt = list(np.random.RandomState(1).randint(0, cfg.vocab_size, 19))
  plain = eng.submit(prompt, "a", SamplingParams(max_tokens=5))
  rid = eng.submit(prompt, "a", SamplingParams(max_tokens=5, logprobs=4))
  list(eng.run())
  out = eng.outputs[rid]
  assert out.output_tokens == eng.outputs[plain].output_tokens  # logprobs change nothing
  assert eng.outputs[plain].logprobs is None and len(out.logprobs) == 5
  toks = list(prompt)
  for t, entry in zip(out.output_tokens, out.logprobs):
    logits = np.asarray(forward(cfg, base, np.array([toks], np.int32), ad)[0, -1], np.float64)
    lp = logits - (np.log(np.exp(logits - logits.max()).sum()) + logits.max())
    assert entry.logprob == pytest.approx(lp[t], abs=2e-4)
    assert [i for i, _ in entry.top] == list(np.argsort(-lp, kind="stable")[:4])
    np.testing.assert_allclose([v for _, v in entry.top], np.sort(lp)[::-1][:4], atol=2e-4)
    toks.append(t)


def test_engine_penalties_and_bias_change_only_their_own_request(tiny):
  """A request with a strong repetition penalty never repeats a token of its context while
  greedy; a +100 bias forces its token; the greedy neighbour is unchanged."""
  cfg, base = tiny
  eng = Engine(cfg, base, num_pages=64, page_size=8, max_batch=4, prefill_chunk=16)
  prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]
  alone = eng.generate([prompt], [None], SamplingParams(max_tokens=8))[0].output_tokens
  eng2 = Engine(cfg, base, num_pages=64, page_size=8, max_batch=4, prefill_chunk=16)
  r_plain = eng2.submit(prompt, None, SamplingParams(max_tokens=8))
  r_rep = eng2.submit(prompt, None, SamplingParams(max_tokens=8, repetition_penalty=1e4))
  r_bias = eng2.submit(prompt, None, SamplingParams(max_tokens=8, logit_bias={77: 100.0}))
  list(eng2.run())
  assert eng2.outputs[r_plain].output_tokens == alone
  rep = eng2.outputs[r_rep].output_tokens
  assert len(set(rep)) == len(rep) and not set(rep) & set(prompt)
  assert eng2.outputs[r_bias].output_tokens == [77] * 8
  with pytest.raises(IcarusError, match="logit_bias"):
    eng2.submit(prompt, None, SamplingParams(logit_bias={cfg.vocab_size: 1.0}))


def test_grammar_rows_and_free_rows_share_a_step(tiny):
  """Grammar-constrained requests (json schema, sampled) beside free ones: the free ones'
  tokens equal their tokens alone, every constrained output validates, and ends as "stop"."""
  jsonschema = pytest.importorskip("jsonschema")
  import json
  from icarus_jax.model.tokenizer import ByteTokenizer
  cfg, base = tiny
  tok = ByteTokenizer()
  schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                    "maximum": 999},
                                              "ok": {"type": "boolean"}},
            "required": ["n", "ok"], "additionalProperties": False}

  def engine():
    return Engine(cfg, base, tokenizer=tok, num_pages=64, page_size=8, max_batch=8,
                  prefill_chunk=16)
  free = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, temperature=1.0, seed=4)]
  e0 = engine()
  r0 = [e0.submit(p, None, sp) for p, sp in zip(["free one", "free two"], free)]
  list(e0.run())
  alone = [e0.outputs[r] for r in r0]
  eng = engine()
  g = eng.grammar_compiler.json_schema(schema)
  rids = [eng.submit("json please", None, SamplingParams(max_tokens=40, temperature=1.0, seed=s,
                                                        grammar=g)) for s in range(4)]
  frees = [eng.submit(p, None, sp) for p, sp in zip(["free one", "free two"], free)]
  list(eng.run())
  assert [eng.outputs[r].output_tokens for r in frees] == [o.output_tokens for o in alone]
  for r in rids:
    out = eng.outputs[r]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(tok.decode(out.output_tokens)), schema)
  with pytest.raises(IcarusError, match="JSON schema|grammar"):
    eng.grammar_compiler.json_schema({"type": "object", "properties": {"x": {"type": 7}}})
