"""icarus-jax: serve many fine-tuned models from one KV cache (ICaRus, arXiv 2603.13281).

Public API (stable names; see README):

    load_hf(path) -> (config, base_params)                   (HF dir, or a .gguf file)
    load_gguf(path, dtype=None) -> (config, base_params)     (llama.cpp GGUF, dequantized)
    forward(config, base_params, tokens, adapter=None) -> logits [B, T, V]
    encode(config, base_params, tokens) -> kv {"k","v": [L, B, T, K, hd]}
    decode(config, base_params, adapter, tokens, kv) -> logits [B, T, V]
    init_adapter(config, key, ...) -> Adapter
    load_adapter(path) / save_adapter(adapter, path)         (PEFT layout)
"""

from icarus_jax.model.adapters import (Adapter, AdapterConfig, check_adapter, init_adapter,
                                 merge_adapter)
from icarus_jax.model.config import ModelConfig, RopeScaling, list_presets, tiny_config
from icarus_jax.errors import (AdapterGateError, CheckpointError, ConfigError,
                               FingerprintMismatchError, IcarusError)
from icarus_jax.checkpoints.gguf_io import load_gguf
from icarus_jax.checkpoints.hf import load_hf, save_hf
from icarus_jax.model.transformer import decode, encode, forward, init_cache
from icarus_jax.checkpoints.orbax_io import load_adapter_orbax, load_base, save_adapter_orbax, save_base
from icarus_jax.model.params import base_fingerprint, init_base_params
from icarus_jax.checkpoints.peft_io import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterConfig", "AdapterGateError", "CheckpointError", "ConfigError",
    "FingerprintMismatchError", "IcarusError", "ModelConfig", "RopeScaling", "base_fingerprint",
    "check_adapter", "decode", "encode", "forward", "init_adapter", "init_base_params",
    "init_cache", "list_presets", "load_adapter", "load_adapter_orbax", "load_base", "load_gguf", "load_hf",
    "merge_adapter", "save_adapter", "save_adapter_orbax", "save_base", "save_hf", "tiny_config",
]
