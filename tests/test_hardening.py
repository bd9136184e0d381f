"""Hardening of the engine and loaders: one bad request never hurts another; PEFT adapters from
anywhere serve; no stale or poisoned K/V; float32 LoRA masters; no hidden base copies.

Oracles: the naive full-recompute reference (``reference_generate``), the same workload run
without the bad request, and PEFT's own fixture files (``tests/fixtures/hf/peft_icarus``).
"""

import gc
import json
import logging
import shutil
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icarus_jax import (ConfigError, FingerprintMismatchError, IcarusError, init_adapter,
                        init_base_params, load_adapter, load_hf, tiny_config)
from icarus_jax.model import adapters as adapters_mod
from icarus_jax.serving.engine import Engine
from icarus_jax.serving.reference import reference_generate
from icarus_jax.serving.sampling import SamplingParams

from conftest import HF_FIXTURES

PS = 8


def engine(tiny, ads, mode="icarus", backend="reference", **kw):
  cfg, params = tiny
  kw = {"num_pages": 64, "page_size": PS, "max_batch": 4, "prefill_chunk": 16, **kw}
  eng = Engine(cfg, params, mode=mode, attention_backend=backend, **kw)
  for a in ads:
    eng.add_adapter(a)
  return eng


def prompts(seed, lengths):
  rng = np.random.RandomState(seed)
  return [list(rng.randint(0, 256, n)) for n in lengths]


def no_held_pages(eng) -> bool:
  return not eng.running and not eng.waiting and eng.pages_used() == eng.cache.num_unreferenced()


# ------------------------------------------------------------------- 1. fault isolation

@pytest.mark.parametrize("bad", [dict(seed=2**80), dict(top_k=2**40), dict(temperature=float("inf")),
                                 dict(temperature=float("nan")), dict(top_p=0.0),
                                 dict(stop_token_ids=(2**40,)), dict(seed=-1), dict(max_tokens=0),
                                 dict(top_k=1.5), dict(seed=True)])
def test_sampling_params_refuse_values_the_sampler_cannot_hold(bad):
  with pytest.raises(IcarusError, match=list(bad)[0]):
    SamplingParams(**bad)


def test_sampling_params_accept_the_documented_range_up_to_its_bounds():
  for ok in (dict(top_k=-1), dict(top_k=0), dict(top_k=2**31 - 1), dict(seed=0),
             dict(seed=2**32 - 1), dict(stop_token_ids=(0, 5, 2**31 - 1)), dict(temperature=0.0),
             dict(top_p=1.0), dict(max_tokens=1)):
    SamplingParams(**ok)
  for bad in (dict(top_k=-2), dict(top_k=2**31), dict(seed=2**32), dict(stop_token_ids=(2**31,)),
              dict(stop_token_ids=(-1,))):
    with pytest.raises(IcarusError, match=list(bad)[0]):
      SamplingParams(**bad)


def _poison(sp: SamplingParams, **fields) -> SamplingParams:
  """A request whose parameters got past validation (a gap, or a future field)."""
  for k, v in fields.items():
    object.__setattr__(sp, k, v)
  return sp


@pytest.mark.parametrize("where", ["sampling", "callback", "step"])
def test_a_poisoned_request_fails_alone(tiny, tiny_adapters, where, monkeypatch):
  """N well-formed requests batched with one that makes the step, the sampler or its consumer
  raise: the N produce exactly the tokens they produce without it; the bad one ends with
  ``finish_reason="error"``; pages are all released."""
  good = prompts(3, [5, 11, 8, 13])
  names = [None, "agent0", "agent1", "agent2"]
  sp = SamplingParams(temperature=0.8, seed=7, max_tokens=6)

  clean = engine(tiny, tiny_adapters)
  rids = [clean.submit(p, a, sp) for p, a in zip(good, names)]
  list(clean.run())
  expected = [clean.outputs[r].output_tokens for r in rids]

  eng = engine(tiny, tiny_adapters)
  bad_prompt = [9, 9, 9, 9, 9, 9, 9]
  if where == "sampling":
    bad = eng.submit(bad_prompt, "agent1", _poison(SamplingParams(max_tokens=6), seed=2**80))
  elif where == "callback":
    def cb(rid, tok, done):
      raise RuntimeError("client went away mid-stream")
    bad = eng.submit(bad_prompt, "agent1", SamplingParams(max_tokens=6), callback=cb)
  else:  # the device step itself raises whenever the bad request's row is in the batch
    bad = eng.submit(bad_prompt, "agent1", SamplingParams(max_tokens=6))
    execute = eng.runner.execute

    def faulty(step):
      if any(r.request_id == bad for r in step.rows):
        raise FloatingPointError("non-finite activations in this row")
      return execute(step)
    monkeypatch.setattr(eng.runner, "execute", faulty)
  rids = [eng.submit(p, a, sp) for p, a in zip(good, names)]
  while eng.has_work:
    eng.step()
    eng.check_invariants()
  assert [eng.outputs[r].output_tokens for r in rids] == expected
  assert all(eng.outputs[r].finish_reason == "length" for r in rids)
  out = eng.outputs[bad]
  assert out.finish_reason == "error" and out.error
  assert no_held_pages(eng)
  if where != "callback":
    assert eng.stats.isolated_faults >= 1


# ------------------------------------------------------------------- 5. stale K/V (isolated)

def test_isolated_reload_under_the_same_name_never_reads_the_old_kv(tiny):
  cfg, params = tiny
  v1 = init_adapter(cfg, jax.random.key(31), name="m", kind="lora", base_params=params, rank=4,
                    b_std=0.08)
  v2 = init_adapter(cfg, jax.random.key(32), name="m", kind="lora", base_params=params, rank=4,
                    b_std=0.08)
  eng = engine(tiny, [v1], mode="isolated")
  p = prompts(5, [27])[0]
  first = eng.generate([p], ["m"], SamplingParams(max_tokens=6))[0].output_tokens
  assert first == reference_generate(cfg, params, v1, p, 6)
  cached_before = eng.cache.num_cached_pages
  assert cached_before > 0
  eng.remove_adapter("m")
  assert eng.cache.num_cached_pages == 0  # the unloaded adapter's K/V is given back at once
  eng.add_adapter(v2)
  out = eng.generate([p], ["m"], SamplingParams(max_tokens=6))[0]
  assert out.num_cached_tokens == 0
  assert out.output_tokens == reference_generate(cfg, params, v2, p, 6)
  eng.check_invariants()


# ------------------------------------------------------------------- 6. poisoned stale slots

@pytest.mark.parametrize("backend", ["reference", "pallas"])
@pytest.mark.parametrize("mode", ["icarus", "isolated"])
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_stale_inf_nan_in_hidden_slots_never_leak(tiny, tiny_adapters, mode, backend, poison):
  """Every slot of the pool, the null page included, starts as inf/NaN (what a previous owner's
  overflow leaves behind): outputs equal the naive reference."""
  cfg, params = tiny
  ads = tiny_adapters if mode == "icarus" else [
      init_adapter(cfg, jax.random.key(40 + i), name=f"agent{i}", kind="lora",
                   base_params=params, rank=4, b_std=0.05) for i in range(3)]
  eng = engine(tiny, ads, mode=mode, backend=backend)
  eng.runner.pages = jnp.full_like(eng.runner.pages, poison)
  ps = prompts(6, [PS - 1, PS + 3, 2 * PS + 1])
  names = [None, "agent0", "agent2"]
  outs = eng.generate(ps, names, SamplingParams(max_tokens=5))
  for o, p, a in zip(outs, ps, names):
    ad = None if a is None else eng.adapters[a]
    assert o.output_tokens == reference_generate(cfg, params, ad, p, 5)


# ------------------------------------------------------------------- 10. bitwise K/V via the engine

def test_engine_fused_step_writes_bitwise_equal_kv_for_every_adapter(tiny, tiny_adapters):
  """Through the engine's own fused step (same batch shapes), the pages written while serving
  adapter A, adapter B and the base are bitwise equal; the conventional step's are not (its
  adapters own their K/V), so the comparison can fail."""
  cfg, params = tiny
  eng = engine(tiny, tiny_adapters)
  ctx = prompts(7, [37])[0]  # 5 pages of 8, 3 prefill chunks of 16
  kvs = [eng.context_kv(ctx, a) for a in (None, "agent0", "agent1", "agent2")]
  assert kvs[0].shape == (cfg.num_layers, 37, 2 * cfg.num_kv_heads, cfg.head_dim)
  assert np.isfinite(kvs[0]).all() and np.abs(kvs[0]).max() > 0
  assert all(np.array_equal(kv, kvs[0]) for kv in kvs[1:])
  conv = [init_adapter(cfg, jax.random.key(50 + i), name=f"c{i}", kind="lora",
                       base_params=params, rank=4, b_std=0.05) for i in range(2)]
  iso = engine(tiny, conv, mode="isolated")
  a, b = iso.context_kv(ctx, "c0"), iso.context_kv(ctx, "c1")
  assert not np.array_equal(a, b)
  # The base's K/V from the other program (conventional step): equal up to float rounding
  # (observed 1.7e-6), which is why the cache never mixes K/V across programs.
  np.testing.assert_allclose(iso.context_kv(ctx, None), kvs[0], atol=1e-5)


# ------------------------------------------------------------------- 3. PEFT adapters

@pytest.fixture(scope="module")
def llama():
  return load_hf(HF_FIXTURES / "llama")


def test_peft_adapter_without_lm_head_serves(llama):
  """HF PEFT LoRA on q/o/gate/up/down (no lm_head): loads, serves, equals the reference."""
  cfg, params = llama
  eng = Engine(cfg, params, mode="icarus", num_pages=32, page_size=PS, prefill_chunk=16)
  with pytest.raises(FingerprintMismatchError, match="trust_foreign_adapters"):
    eng.add_adapter(load_adapter(HF_FIXTURES / "peft_icarus", name="peft"))
  ad = load_adapter(HF_FIXTURES / "peft_icarus", name="peft", base_fingerprint=eng.fingerprint)
  assert "lm_head" not in ad.config.targets
  eng.add_adapter(ad)
  p = [t % cfg.vocab_size for t in prompts(8, [13])[0]]
  out = eng.generate([p], ["peft"], SamplingParams(max_tokens=5))[0].output_tokens
  assert out == reference_generate(cfg, params, ad, p, 5)


def test_peft_adapter_targeting_lm_head_with_saved_base_copy_loads(llama, tmp_path, caplog):
  """PEFT saves ``...lm_head.base_layer.weight`` when it wraps lm_head: ignored with a warning;
  the adapter (a subset of targets, rank below the pool's) serves."""
  from safetensors.numpy import load_file, save_file
  cfg, params = llama
  d = tmp_path / "peft_head"
  shutil.copytree(HF_FIXTURES / "peft_icarus", d)
  conf = json.loads((d / "adapter_config.json").read_text())
  conf["target_modules"] = ["q_proj", "lm_head"]
  (d / "adapter_config.json").write_text(json.dumps(conf))
  t = {k: v for k, v in load_file(str(d / "adapter_model.safetensors")).items() if "q_proj" in k}
  rng = np.random.RandomState(0)
  r = conf["r"]
  t["base_model.model.lm_head.lora_A.weight"] = rng.randn(r, cfg.d_model).astype(np.float32) * 0.1
  t["base_model.model.lm_head.lora_B.weight"] = rng.randn(cfg.vocab_size, r).astype(np.float32) * 0.1
  t["base_model.model.lm_head.base_layer.weight"] = np.zeros((cfg.vocab_size, cfg.d_model),
                                                               np.float32)
  save_file(t, str(d / "adapter_model.safetensors"))
  eng = Engine(cfg, params, mode="icarus", num_pages=32, page_size=PS, prefill_chunk=16)
  with caplog.at_level(logging.WARNING, logger="icarus_jax.checkpoints.peft_io"):
    ad = load_adapter(d, name="head", base_fingerprint=eng.fingerprint)
  assert "base_layer" in caplog.text
  assert set(ad.config.targets) == {"q", "lm_head"}
  eng.add_adapter(ad)
  p = [t % cfg.vocab_size for t in prompts(9, [11])[0]]
  out = eng.generate([p], ["head"], SamplingParams(max_tokens=5))[0].output_tokens
  assert out == reference_generate(cfg, params, ad, p, 5)


def test_adapter_pool_slot_reuse_with_another_rank_and_subset(tiny, tiny_adapters):
  """A slot freed by a rank-8 adapter with every target, reused by a rank-2 q-only adapter: no
  leftover of the first in the second's output."""
  cfg, params = tiny
  eng = engine(tiny, [tiny_adapters[2]], max_adapters=1, max_rank=8)
  eng.remove_adapter("agent2")
  small = init_adapter(cfg, jax.random.key(60), name="small", targets=("q",), base_params=params,
                       rank=2, b_std=0.1)
  eng.add_adapter(small)
  p = prompts(10, [9])[0]
  out = eng.generate([p], ["small"], SamplingParams(max_tokens=6))[0].output_tokens
  assert out == reference_generate(cfg, params, small, p, 6)


# ------------------------------------------------------------------- 7. float32 LoRA masters

def test_lora_masters_and_optimizer_state_are_float32_on_a_bf16_base():
  from icarus_jax.training.objective import TrainConfig, init_trainable, make_optimizer, train_step
  cfg = tiny_config(dtype="bfloat16")
  base = init_base_params(cfg, jax.random.key(0), scale=0.1)
  tc = TrainConfig(mode="icarus_lora", learning_rate=1e-4, warmup_steps=0, total_steps=10)
  ad = init_trainable(cfg, base, tc)
  assert {x.dtype for x in jax.tree.leaves(ad.params)} == {jnp.dtype(jnp.float32)}
  # B = 0.05 everywhere: an Adam step of ~1e-4 is below bf16 resolution at 0.05 (bf16 would lose it)
  ad = jax.tree.map(lambda x: x, ad)
  ad.params["layers"]["q"]["b"] = jnp.full_like(ad.params["layers"]["q"]["b"], 0.05)
  tx = make_optimizer(tc)
  opt = tx.init(ad.params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(opt) if hasattr(x, "dtype")
             and jnp.issubdtype(x.dtype, jnp.floating))
  rng = np.random.RandomState(0)
  batch = {"inputs": jnp.asarray(rng.randint(0, 256, (2, 12)), jnp.int32),
           "targets": jnp.asarray(rng.randint(0, 256, (2, 12)), jnp.int32),
           "mask": jnp.ones((2, 12))}
  b0 = np.asarray(ad.params["layers"]["q"]["b"])
  new = ad
  for _ in range(2):  # the schedule's first step has learning rate 0 (warm-up from 0)
    new, opt, _ = train_step(cfg, new, opt, base, batch, tx=tx)
  b1 = new.params["layers"]["q"]["b"]
  assert b1.dtype == jnp.float32
  assert float((np.asarray(b1) != b0).mean()) > 0.5  # the small updates landed


# ------------------------------------------------------------------- 8. fingerprint cache

def test_fingerprint_cache_holds_no_base_and_add_adapter_does_not_rehash(tiny, tiny_adapters,
                                                                         monkeypatch):
  from icarus_jax.model.params import base_fingerprint
  cfg = tiny_config()
  params = init_base_params(cfg, jax.random.key(3), scale=0.1)
  fp = base_fingerprint(cfg, params)
  assert base_fingerprint(cfg, params) == fp
  ref = weakref.ref(params["layers"]["q"])
  del params
  gc.collect()
  assert ref() is None  # the cache did not keep the base alive
  cfg, params = tiny
  eng = engine(tiny, [])
  monkeypatch.setattr(adapters_mod, "base_fingerprint",
                      lambda *a, **k: pytest.fail("base re-hashed while adding an adapter"))
  eng.add_adapter(tiny_adapters[0])
  assert "agent0" in eng.adapter_names


# ------------------------------------------------------------------- 9. Qwen3 sliding window

def test_qwen3_sliding_window_is_refused(tmp_path):
  from icarus_jax.model.config import ModelConfig
  hf = json.loads((HF_FIXTURES / "qwen3" / "config.json").read_text())
  hf.update(use_sliding_window=True, sliding_window=64, max_window_layers=1)
  (tmp_path / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ConfigError, match="qwen3 use_sliding_window=True"):
    ModelConfig.from_hf_config(tmp_path / "config.json")
  hf["use_sliding_window"] = False
  (tmp_path / "config.json").write_text(json.dumps(hf))
  assert ModelConfig.from_hf_config(tmp_path / "config.json").sliding_window is None
