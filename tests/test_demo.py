"""The embedded default base and the shipped adapters behave as the demo claims."""

import pytest

from icarus_jax import check_adapter
from icarus_jax.checkpoints.assets import load_any_base
from icarus_jax.bench.harness import load_serving_adapters
from icarus_jax.model.tokenizer import ByteTokenizer
from launch.demo import identical_cache_check


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


def test_smollm2_shipped_adapters_share_one_cache():
  """The ICaRus adapters trained on the real model (``launch.accuracy_real``) pass the gate and
  the base fingerprint, and the engine writes bit-identical K/V for a chat context whichever of
  them (or the base) it serves, while their predictions differ."""
  import pytest

  from icarus_jax.checkpoints.assets import default_adapters_dir, load_base_tokenizer
  from icarus_jax.training.data import prompt_ids
  from icarus_jax.errors import CheckpointError
  from launch.demo import SHARED_CHAT
  try:
    cfg, base = load_any_base("smollm2")
  except CheckpointError as e:
    pytest.skip(f"SmolLM2 not available: {e}")
  tok, chat = load_base_tokenizer("smollm2")
  ads, sources = load_serving_adapters(cfg, base, "icarus", 2, default_adapters_dir("smollm2"))
  assert all(s.startswith("trained") for s in sources), sources
  for a in ads:
    check_adapter(cfg, base, a, require_icarus=True)
  same, spread, n = identical_cache_check(cfg, base, ads, prompt_ids(tok, SHARED_CHAT, chat))
  assert same and spread > 0.5 and n > 50


@pytest.mark.slow
def test_benchmark_compiles_nothing_in_the_timed_window():
  """The demo's benchmark path (reduced size): every program is compiled before timing (no
  compilation event inside the timed runs), and ICaRus computes fewer prefill tokens than the
  conventional baseline under the same KV budget in every repetition."""
  from icarus_jax.bench.workload import WorkloadConfig
  from launch.demo import workflow_benchmark
  cfg, base = load_any_base(None)
  fleets = {m: load_serving_adapters(cfg, base, m, 3) for m in ("icarus", "isolated")}
  wl = WorkloadConfig(num_workflows=3, num_models=3, request_rate=4.0, num_turns=4,
                      system_len=64, context_len=32, header_len=8, output_len=4,
                      observation_len=16, seed=0)
  bench = workflow_benchmark(cfg, base, fleets, wl, kv_pages=96, repeats=2, max_batch=1,
                             prefill_chunk=32)
  assert bench["compiles_in_timed_window"] == 0, bench["compiled_in_window"]
  for a, b in zip(bench["runs"]["icarus"], bench["runs"]["isolated"]):
    assert a["prefill_tokens_computed"] < b["prefill_tokens_computed"]
  assert len(bench["verdict"]) == 7
