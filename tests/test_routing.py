"""Replica routing policies (``serving/routing.py``) and routed replicas on roofline runners
(``bench/replica_set.py``): no Ray needed."""

import pytest

from icarus_jax.serving.routing import ContextAffinity, ModelAffinity, PowerOfTwo, token_keys


def test_context_affinity_follows_the_longest_prefix_whatever_the_model():
  pol = ContextAffinity(imbalance=2)
  loads = {"a": 0, "b": 0}
  k1 = token_keys(list(range(64)), 16)  # 4 pages
  first = pol.rank(k1, loads)[0]
  assert first == "a"  # new context: lightest, then fewest contexts, then id
  pol.record(k1, first)
  k2 = token_keys(list(range(64)) + [7] * 40, 16)  # the same context, grown by a turn
  assert k2[:4] == k1 and pol.rank(k2, loads)[0] == "a"
  other = token_keys([9] * 64, 16)
  assert pol.rank(other, loads)[0] == "b"  # a new context goes to the replica owning fewer
  assert pol.rank(k2, {"a": 3, "b": 0})[0] == "b"  # overloaded by more than `imbalance`
  assert pol.rank(k2, {"a": 2, "b": 0})[0] == "a"  # within it
  assert pol.counts == {"affinity": 2, "new_context": 2, "overflow": 1}
  pol.forget("a")
  assert pol.rank(k2, {"a": 0, "b": 1})[0] == "a"  # forgotten: new context, lightest


def test_model_affinity_and_power_of_two():
  pol = ModelAffinity()
  loads = {"a": 0, "b": 0}
  assert pol.rank("m1", loads)[0] == "a"
  pol.record("m1", "a")
  assert pol.rank("m2", loads)[0] == "b"  # fewest models loaded
  pol.record("m2", "b")
  assert pol.rank("m1", {"a": 5, "b": 0})[0] == "a"  # where it is loaded, even if busier
  p2 = PowerOfTwo(seed=0)
  ranked = p2.rank(None, {"a": 3, "b": 1, "c": 2})
  assert sorted(ranked) == ["a", "b", "c"]
  assert ranked[0] != "a" or ranked[1] == "a"  # of the two picked, the lighter first


@pytest.mark.parametrize("mode", ["icarus", "isolated"])
def test_replica_set_context_routing_caches_more_than_model_routing(mode):
  """PROJECTION harness (roofline runners): 3-model workflows over 2 replicas. Context routing
  keeps each workflow's turns where its context is cached (ICaRus: any model; isolated: the key
  includes the model), so it computes fewer prefill tokens than model affinity under ICaRus, and
  every workflow completes under every policy."""
  from icarus_jax import tiny_config
  from icarus_jax.bench.harness import run_workflows
  from icarus_jax.bench.replica_set import ReplicaSet
  from icarus_jax.bench.workload import WorkloadConfig, generate_workflows
  from icarus_jax.model.adapters import Adapter, AdapterConfig
  from icarus_jax.serving.cost_model import HARDWARE
  cfg = tiny_config()
  kind = "icarus_lora" if mode == "icarus" else "lora"
  names = [f"m{i}" for i in range(3)]
  ads = [Adapter({}, AdapterConfig(name=n, kind=kind)) for n in names]
  wl = WorkloadConfig(num_workflows=6, num_models=3, request_rate=4.0, num_turns=3,
                      system_len=48, context_len=64, header_len=8, output_len=4,
                      observation_len=16, seed=0)
  got = {}
  for policy in ("context", "model", "pow2"):
    rs = ReplicaSet(cfg, HARDWARE["h100"], 2, policy, ads, mode=mode, num_pages=64,
                    page_size=16, max_batch=4, prefill_chunk=64, max_seq_len=512)
    r = run_workflows(rs, generate_workflows(wl), names)
    assert r["completed"] == 6 * 3
    got[policy] = r["prefill_tokens_computed"]
  if mode == "icarus":
    assert got["context"] < got["model"], got
  with pytest.raises(Exception, match="policy='nearest' is unknown"):
    ReplicaSet(cfg, HARDWARE["h100"], 2, "nearest", ads, mode=mode, num_pages=8)
