"""The engine on every architecture fixture (Hugging Face checkpoints made by transformers):
Qwen2 (q/k/v biases, tied embeddings), Qwen3 (q/k-norm, head_dim != d/heads), Mistral (sliding
window 6, shorter than the prompts) — both attention backends, against the naive reference."""

import jax
import numpy as np
import pytest

from icarus_jax import init_adapter, load_hf
from icarus_jax.serving.engine import Engine
from icarus_jax.serving.reference import reference_generate
from icarus_jax.serving.sampling import SamplingParams

from conftest import HF_FIXTURES

PS = 4


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "mistral"])
def arch(request):
  cfg, params = load_hf(HF_FIXTURES / request.param)
  return request.param, cfg, params


@pytest.mark.parametrize("mode,backend", [("icarus", "reference"), ("icarus", "pallas"),
                                          ("isolated", "reference")])
def test_engine_equals_reference_on_each_architecture(arch, mode, backend):
  name, cfg, params = arch
  if name == "mistral":
    assert cfg.sliding_window == 6  # shorter than every prompt below: the window really cuts
  if name == "qwen2":
    assert cfg.tie_embeddings and cfg.attention_bias
  if name == "qwen3":
    assert cfg.qk_norm
  kind = "icarus_lora" if mode == "icarus" else "lora"
  ads = [init_adapter(cfg, jax.random.key(7 + i), name=f"a{i}", kind=kind, base_params=params,
                      rank=4, b_std=0.3) for i in range(2)]
  eng = Engine(cfg, params, mode=mode, attention_backend=backend, num_pages=48, page_size=PS,
               max_batch=4, prefill_chunk=8)
  for a in ads:
    eng.add_adapter(a)
  rng = np.random.RandomState(0)
  prompts = [list(rng.randint(0, cfg.vocab_size, n)) for n in (7, 12, 9)]
  names = [None, "a0", "a1"]
  outs = eng.generate(prompts, names, SamplingParams(max_tokens=6))
  for o, p, a in zip(outs, prompts, names):
    ad = None if a is None else eng.adapters[a]
    assert o.output_tokens == reference_generate(cfg, params, ad, p, 6), (name, a)
  # the same context again, other adapter: served from the cache in ICaRus mode
  again = eng.generate([prompts[1]], ["a0"], SamplingParams(max_tokens=6))[0]
  assert again.output_tokens == reference_generate(cfg, params, eng.adapters["a0"], prompts[1], 6)
  eng.check_invariants()
