import json

import numpy as np
import pytest

from icarus_jax import ConfigError, ModelConfig, list_presets
from icarus_jax.model.config import RopeScaling


def test_presets_load_and_have_sane_shapes():
  names = list_presets()
  for want in ("tiny", "llama-3.1-8b", "qwen3-8b"):
    assert want in names
  llama = ModelConfig.from_preset("llama-3.1-8b")
  assert (llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim) == (32, 32, 8, 128)
  assert llama.rope_scaling.rope_type == "llama3"
  assert llama.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2  # 128 KiB / token in bf16
  assert ModelConfig.from_preset("qwen3-8b").qk_norm


def test_unknown_preset_lists_available():
  with pytest.raises(ConfigError, match="available"):
    ModelConfig.from_preset("nope")


def test_from_hf_config_transformers4_layout():
  hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
  cfg = ModelConfig.from_hf_config(hf)
  preset = ModelConfig.from_preset("llama-3.1-8b")
  assert cfg.replace(name=preset.name) == preset


def test_hf_config_round_trip():
  for name in ("qwen3-8b", "qwen2.5-7b", "mistral-7b-v0.3", "llama-3.1-8b"):
    c = ModelConfig.from_preset(name)
    back = ModelConfig.from_hf_config(c.to_hf_config())
    assert back.replace(name=c.name) == c, name


def test_unknown_architecture_and_missing_field(tmp_path):
  with pytest.raises(ConfigError, match="unknown architecture"):
    ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
  hf = ModelConfig.from_preset("tiny").to_hf_config()
  del hf["hidden_size"]
  p = tmp_path / "config.json"
  p.write_text(json.dumps(hf))
  with pytest.raises(ConfigError, match="hidden_size"):
    ModelConfig.from_hf_config(p)


@pytest.mark.parametrize("kw,msg", [
    (dict(num_heads=3), "multiple of"),
    (dict(d_model=0), "positive"),
    (dict(dtype="int8"), "dtype"),
    (dict(architecture="gpt2"), "architecture"),
])
def test_invalid_configs(kw, msg):
  with pytest.raises(ConfigError, match=msg):
    ModelConfig.from_preset("tiny").replace(**kw)


def test_rope_scaling_llama3_matches_reference_formula():
  cfg = ModelConfig.from_preset("llama-3.1-8b")
  inv = cfg.rope_inv_freq()
  base = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
  wavelen = 2 * np.pi / base
  assert np.allclose(inv[wavelen < 8192 / 4], base[wavelen < 8192 / 4])  # high freq untouched
  assert np.allclose(inv[wavelen > 8192], base[wavelen > 8192] / 8.0)  # low freq divided
  with pytest.raises(ConfigError):
    RopeScaling(rope_type="yarn-ish")
