"""The embedded default base and the shipped adapters behave as the demo claims."""

from icarus_jax import check_adapter
from icarus_jax.assets import load_any_base
from icarus_jax.bench import load_serving_adapters
from icarus_jax.tokenizer import ByteTokenizer
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
