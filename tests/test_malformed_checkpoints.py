"""Every malformed-checkpoint case raises a clear error naming the file and tensor."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from icarus_jax import (AdapterGateError, CheckpointError, ConfigError, load_adapter,
                        load_adapter_orbax, load_base, load_hf)

from conftest import HF_FIXTURES


@pytest.fixture
def llama_copy(tmp_path):
  d = tmp_path / "llama"
  shutil.copytree(HF_FIXTURES / "llama", d)
  return d


def _edit_tensors(path, fn):
  t = load_file(str(path))
  fn(t)
  save_file(t, str(path))


def test_missing_tensor(llama_copy):
  _edit_tensors(llama_copy / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    load_hf(llama_copy)


def test_wrong_shape(llama_copy):
  def f(t):
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 32), np.float32)
  _edit_tensors(llama_copy / "model.safetensors", f)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn"
                                            r"\.k_proj\.weight' has shape \(3, 32\), expected \(16, 32\)"):
    load_hf(llama_copy)


def test_unknown_architecture(llama_copy):
  cfg = json.loads((llama_copy / "config.json").read_text())
  cfg["architectures"] = ["FalconForCausalLM"]
  cfg["model_type"] = "falcon"
  (llama_copy / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="unknown architecture.*FalconForCausalLM.*supported"):
    load_hf(llama_copy)


def test_truncated_file(llama_copy):
  f = llama_copy / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
    load_hf(llama_copy)


def test_truncated_header(llama_copy):
  (llama_copy / "model.safetensors").write_bytes(b"\x10\x00")
  with pytest.raises(CheckpointError, match=r"model\.safetensors.*cannot read"):
    load_hf(llama_copy)


def test_missing_config_and_weights(tmp_path, llama_copy):
  with pytest.raises(CheckpointError, match="not a directory"):
    load_hf(tmp_path / "nope")
  (llama_copy / "config.json").unlink()
  with pytest.raises(CheckpointError, match="missing config.json"):
    load_hf(llama_copy)
  d = tmp_path / "empty"
  d.mkdir()
  shutil.copy(HF_FIXTURES / "llama" / "config.json", d)
  with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
    load_hf(d)


def test_sharded_index_problems(tmp_path):
  d = tmp_path / "mistral"
  shutil.copytree(HF_FIXTURES / "mistral", d)
  shard = sorted(d.glob("model-0000*.safetensors"))[2]
  shard.unlink()
  with pytest.raises(CheckpointError, match=f"lists shard {shard.name}, which does not exist"):
    load_hf(d)
  (d / "model.safetensors.index.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="malformed index"):
    load_hf(d)


# ---------------------------------------------------------------- PEFT adapters
@pytest.fixture
def peft_copy(tmp_path):
  d = tmp_path / "peft"
  shutil.copytree(HF_FIXTURES / "peft_icarus", d)
  return d


def test_peft_missing_tensor(peft_copy):
  key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
  _edit_tensors(peft_copy / "adapter_model.safetensors", lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
    load_adapter(peft_copy)


def test_peft_wrong_shape(peft_copy):
  key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
  def f(t):
    t[key] = np.zeros((5, 32), np.float32)
  _edit_tensors(peft_copy / "adapter_model.safetensors", f)
  with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.q_proj has lora_A \(5, 32\)"):
    load_adapter(peft_copy)


def test_peft_truncated(peft_copy):
  f = peft_copy / "adapter_model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match="adapter_model.safetensors.*truncated"):
    load_adapter(peft_copy)


def test_peft_bad_config(peft_copy):
  cfgf = peft_copy / "adapter_config.json"
  cfg = json.loads(cfgf.read_text())
  cfgf.write_text(json.dumps({**cfg, "target_modules": ["q_proj", "fc1"]}))
  with pytest.raises(CheckpointError, match=r"target_modules \['fc1'\] are not supported"):
    load_adapter(peft_copy)
  cfgf.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
  with pytest.raises(CheckpointError, match="peft_type='IA3' is not supported"):
    load_adapter(peft_copy)
  cfgf.write_text(json.dumps({**cfg, "use_dora": True}))
  with pytest.raises(CheckpointError, match="use_dora"):
    load_adapter(peft_copy)
  cfgf.write_text("{")
  with pytest.raises(CheckpointError, match="malformed JSON"):
    load_adapter(peft_copy)
  cfgf.unlink()
  with pytest.raises(CheckpointError, match="missing adapter_config.json"):
    load_adapter(peft_copy)


def test_peft_kv_targets_refused_for_icarus():
  with pytest.raises(AdapterGateError, match=r"k_proj.*v_proj|v_proj.*k_proj"):
    load_adapter(HF_FIXTURES / "peft_kv")
  ad = load_adapter(HF_FIXTURES / "peft_kv", kind="lora")  # fine as a conventional adapter
  assert set(ad.config.targets) == {"q", "k", "v", "o"}


# ---------------------------------------------------------------- Orbax
def test_orbax_missing_parts(tmp_path, tiny):
  from icarus_jax import save_base
  cfg, params = tiny
  with pytest.raises(CheckpointError, match="missing model_config.json"):
    load_base(tmp_path)
  with pytest.raises(CheckpointError, match="missing adapter.json"):
    load_adapter_orbax(tmp_path)
  save_base(tmp_path / "b", cfg, params)
  shutil.rmtree(tmp_path / "b" / "params")
  with pytest.raises(CheckpointError, match="missing Orbax 'params'"):
    load_base(tmp_path / "b")


def test_orbax_wrong_config_for_params(tmp_path, tiny):
  from icarus_jax import save_base
  cfg, params = tiny
  save_base(tmp_path / "b", cfg, params)
  cfg.replace(mlp_dim=cfg.mlp_dim * 2).to_json(tmp_path / "b" / "model_config.json")
  with pytest.raises(CheckpointError, match=r"tensor 'layers\.down' has shape \(2, 192, 64\), expected \(2, 384, 64\)"):
    load_base(tmp_path / "b")
