"""Adapters: PEFT round trip, PEFT parity, gate and fingerprint checks."""

import jax
import numpy as np
import pytest

from icarus_jax import (AdapterConfig, AdapterGateError, FingerprintMismatchError, IcarusError,
                        base_fingerprint, check_adapter, forward, init_adapter, init_base_params,
                        load_adapter, load_adapter_orbax, load_hf, save_adapter,
                        save_adapter_orbax)

from conftest import HF_FIXTURES


def _assert_same(a, b):
  assert a.config == b.config
  la, ta = jax.tree_util.tree_flatten(a.params)
  lb, tb = jax.tree_util.tree_flatten(b.params)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["icarus_lora", "lora", "icarus_full", "full"])
def test_peft_round_trip(tmp_path, tiny, kind):
  cfg, params = tiny
  ad = init_adapter(cfg, jax.random.key(1), name="math", kind=kind, base_params=params, b_std=0.1)
  save_adapter(ad, tmp_path / "a")
  back = load_adapter(tmp_path / "a")
  _assert_same(ad, back)
  save_adapter_orbax(ad, tmp_path / "o")
  _assert_same(ad, load_adapter_orbax(tmp_path / "o"))


def test_saved_lora_uses_peft_key_names(tmp_path, tiny):
  from safetensors import safe_open
  cfg, params = tiny
  ad = init_adapter(cfg, jax.random.key(1), base_params=params, rank=4)
  save_adapter(ad, tmp_path / "a")
  keys = set(safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "numpy").keys())
  assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
  assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in keys
  assert "base_model.model.lm_head.lora_B.weight" in keys
  f = safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "numpy")
  assert f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == (4, 64)


def test_peft_adapter_matches_peft_logits():
  """A LoRA adapter trained by PEFT (with k/v targets) applied conventionally equals PEFT's model."""
  cfg, params = load_hf(HF_FIXTURES / "llama")
  ref = np.load(HF_FIXTURES / "peft_kv" / "parity.npz")
  ad = load_adapter(HF_FIXTURES / "peft_kv", kind="lora")
  assert np.abs(np.asarray(forward(cfg, params, ref["tokens"], ad)) - ref["logits"]).max() <= 1e-4
  ref = np.load(HF_FIXTURES / "peft_icarus" / "parity.npz")
  ad = load_adapter(HF_FIXTURES / "peft_icarus")
  assert ad.config.kind == "icarus_lora" and ad.config.rank == 4 and ad.config.alpha == 8
  conv = np.asarray(forward(cfg, params, ref["tokens"], ad.replace(kind="lora")))
  assert np.abs(conv - ref["logits"]).max() <= 1e-4


def test_gate_refuses_kv_targets_by_name():
  for bad in (("q", "k"), ("v",)):
    with pytest.raises(AdapterGateError, match="change the encoder's K/V"):
      AdapterConfig(kind="icarus_lora", targets=bad)
  with pytest.raises(AdapterGateError, match=r"embed \(embed_tokens\)"):
    AdapterConfig(kind="icarus_full", targets=("q", "embed"))
  AdapterConfig(kind="lora", targets=("q", "k", "v"))  # conventional baseline: allowed


def test_fingerprint_checks(tiny, tiny_adapters):
  cfg, params = tiny
  other = init_base_params(cfg, jax.random.key(99), scale=0.1)
  assert base_fingerprint(cfg, params) != base_fingerprint(cfg, other)
  assert base_fingerprint(cfg, params) == base_fingerprint(cfg, jax.tree.map(lambda x: x + 0, params))
  ad = tiny_adapters[0]
  check_adapter(cfg, params, ad, require_icarus=True)
  with pytest.raises(FingerprintMismatchError, match="was trained on base icarus-base-"):
    check_adapter(cfg, other, ad)
  with pytest.raises(FingerprintMismatchError, match="records no base fingerprint"):
    check_adapter(cfg, params, ad.replace(base_fingerprint=None))
  conv = init_adapter(cfg, jax.random.key(1), kind="lora", base_params=params)
  with pytest.raises(AdapterGateError, match="owns its KV cache"):
    check_adapter(cfg, params, conv, require_icarus=True)


def test_foreign_peft_adapter_needs_asserted_fingerprint():
  cfg, params = load_hf(HF_FIXTURES / "llama")
  ad = load_adapter(HF_FIXTURES / "peft_icarus")
  with pytest.raises(FingerprintMismatchError, match="records no base fingerprint"):
    check_adapter(cfg, params, ad)
  fp = base_fingerprint(cfg, params)
  ad = load_adapter(HF_FIXTURES / "peft_icarus", base_fingerprint=fp)
  check_adapter(cfg, params, ad, require_icarus=True)


def test_loaded_adapter_with_wrong_shapes_is_refused(tmp_path, tiny):
  cfg, params = tiny
  big = cfg.replace(d_model=96)
  bp = init_base_params(big, jax.random.key(0))
  ad = init_adapter(big, jax.random.key(1), base_params=bp)
  ad = ad.replace(base_fingerprint=base_fingerprint(cfg, params))
  with pytest.raises(IcarusError, match="target 'q' has shapes"):
    check_adapter(cfg, params, ad)


def test_adapter_is_a_pytree_usable_under_jit(tiny, tiny_adapters):
  cfg, params = tiny
  ad = tiny_adapters[0]
  leaves = jax.tree_util.tree_leaves(ad)
  assert len(leaves) == 2 * 6  # (a, b) for q, o, gate, up, down, lm_head
  doubled = jax.jit(lambda a: jax.tree.map(lambda x: 2 * x, a))(ad)
  assert doubled.config == ad.config
