from launch.demo import run


def test_demo_shows_identical_cache_and_differing_predictions():
  r = run(num_adapters=3, context_len=40, seed=0)
  assert r["kv_bitwise_identical"] is True
  assert r["max_logit_difference_between_adapters"] > 0.1
  assert r["kv_bytes_one_cache_per_model"] == 3 * r["kv_bytes_shared_cache"]
  assert r["kv_bytes_shared_cache"] == 40 * 2 * 2 * 2 * 16 * 4  # T * (k,v) * L * K * hd * f32
