"""The model the CPU measurements use: large enough that compute, not per-step dispatch,
dominates a step on XLA:CPU (d_model 512, 8 layers: about 34M parameters, float32), small
enough that a workflow sweep fits minutes. Shared by ``cost_model_cpu`` and ``workflow_cpu``."""

from __future__ import annotations

import jax


def cpu_model(d_model: int = 512, layers: int = 8, seed: int = 0):
  """``(config, base params)``: a random base (the weights do not change a step's cost)."""
  from icarus_jax import init_base_params, tiny_config
  d = d_model
  cfg = tiny_config(d_model=d, num_layers=layers, num_heads=8, num_kv_heads=4,
                    head_dim=d // 8, mlp_dim=3 * d, vocab_size=8192, max_seq_len=2048)
  return cfg, init_base_params(cfg, jax.random.key(seed), scale=0.05)
