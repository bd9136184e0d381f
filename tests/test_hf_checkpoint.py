"""Parity with transformers on committed fixtures, and save/load round trips."""

import numpy as np
import pytest

from icarus_jax import forward, load_hf, save_hf
from icarus_jax.model.params import flatten_names

from conftest import HF_FIXTURES

MODELS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("name", MODELS)
def test_forward_matches_transformers(name):
  cfg, params = load_hf(HF_FIXTURES / name)
  ref = np.load(HF_FIXTURES / name / "parity.npz")
  logits = np.asarray(forward(cfg, params, ref["tokens"]))
  assert logits.shape == ref["logits"].shape
  assert np.abs(logits - ref["logits"]).max() <= 1e-4


def test_fixtures_cover_the_variants():
  cfgs = {n: load_hf(HF_FIXTURES / n)[0] for n in MODELS}
  assert cfgs["llama"].num_kv_heads < cfgs["llama"].num_heads  # GQA
  assert cfgs["llama"].rope_scaling.rope_type == "llama3"
  assert cfgs["qwen2"].attention_bias and cfgs["qwen2"].tie_embeddings
  assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim * cfgs["qwen3"].num_heads != cfgs["qwen3"].d_model
  assert cfgs["mistral"].sliding_window == 6
  assert (HF_FIXTURES / "mistral" / "model.safetensors.index.json").exists()  # sharded


@pytest.mark.parametrize("name,shard", [("qwen3", None), ("qwen2", 4096)])
def test_save_hf_round_trip(tmp_path, name, shard):
  cfg, params = load_hf(HF_FIXTURES / name)
  save_hf(tmp_path / "out", cfg, params, max_shard_bytes=shard)
  cfg2, params2 = load_hf(tmp_path / "out")
  assert cfg2.replace(name=cfg.name) == cfg
  a, b = flatten_names(params), flatten_names(params2)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  if shard:
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_load_in_bfloat16():
  cfg, params = load_hf(HF_FIXTURES / "llama", dtype="bfloat16")
  assert cfg.dtype == "bfloat16"
  assert params["layers"]["q"].dtype.name == "bfloat16"
  ref = np.load(HF_FIXTURES / "llama" / "parity.npz")
  logits = np.asarray(forward(cfg, params, ref["tokens"]))
  # bf16 weights against transformers' float32 logits: observed max |diff| 0.0266; 0.06 is ~2x
  assert np.abs(logits - ref["logits"]).max() < 0.06
