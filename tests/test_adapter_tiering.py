"""Many adapters over few device slots: registered adapters live in host memory and are swapped
into the device pool (LRU over idle slots) when a request for them is admitted.

Oracle: the same requests served with every adapter resident (one slot each), and the naive
reference for a sample.
"""

import jax
import numpy as np
import pytest

from icarus_jax import IcarusError, init_adapter
from icarus_jax.serving.engine import Engine
from icarus_jax.serving.reference import reference_generate
from icarus_jax.serving.sampling import SamplingParams

PS = 8
N_ADAPTERS = 256


@pytest.fixture(scope="module")
def many(tiny):
  cfg, params = tiny
  return [init_adapter(cfg, jax.random.key(200 + i), name=f"m{i}", base_params=params, rank=4,
                       b_std=0.06) for i in range(N_ADAPTERS)]


def engine(tiny, ads, slots, **kw):
  cfg, params = tiny
  eng = Engine(cfg, params, num_pages=96, page_size=PS, max_batch=4, prefill_chunk=16,
               max_adapters=slots, **kw)
  for a in ads:
    eng.add_adapter(a)
  return eng


def zipf_requests(seed, n):
  rng = np.random.RandomState(seed)
  ranks = np.arange(1, N_ADAPTERS + 1)
  p = (1.0 / ranks) / (1.0 / ranks).sum()
  names = [f"m{i}" for i in rng.choice(N_ADAPTERS, n, p=p)]
  prompts = [list(rng.randint(0, 256, rng.randint(4, 14))) for _ in range(n)]
  return prompts, names


def test_zipf_load_of_256_adapters_over_4_slots_equals_all_resident(tiny, many):
  prompts, names = zipf_requests(0, 40)
  sp = SamplingParams(max_tokens=4)
  full = engine(tiny, many, slots=N_ADAPTERS)
  assert len(full.resident_adapters) == N_ADAPTERS
  want = [o.output_tokens for o in full.generate(prompts, names, sp)]

  eng = engine(tiny, many, slots=4)
  assert eng.adapter_names == [a.name for a in many]   # all registered
  assert len(eng.resident_adapters) == 4               # 4 on device
  rids = [eng.submit(p, n, sp) for p, n in zip(prompts, names)]
  while eng.has_work:
    eng.step()
    eng.check_invariants()
    assert len(eng.resident_adapters) <= 4
    assert {s.adapter for s in eng.running} <= set(eng.resident_adapters)
  assert [eng.outputs[r].output_tokens for r in rids] == want
  snap = eng.snapshot()
  assert snap["adapter_evictions"] > 0 and snap["adapter_loads"] == 4 + snap["adapter_evictions"]
  # Swapping adapters never recompiles: the same requests with other adapters, more swaps.
  compiled = eng.runner.compiled_steps()
  evictions = snap["adapter_evictions"]
  eng.generate(prompts, names[::-1], sp)
  assert eng.stats.adapter_evictions > evictions
  assert eng.runner.compiled_steps() == compiled
  for i in (0, 7, 23):  # and a sample against the independent reference
    cfg, params = tiny
    assert want[i] == reference_generate(cfg, params, eng.adapters[names[i]], prompts[i], 4)


def test_a_request_waits_while_every_slot_is_busy(tiny, many):
  """Two slots, both serving running requests: a third adapter's request is admitted only once
  one of them finishes; it is never refused."""
  eng = engine(tiny, many[:3], slots=2)
  long = SamplingParams(max_tokens=10)
  r0 = eng.submit([1, 2, 3, 4], "m0", long)
  r1 = eng.submit([5, 6, 7, 8], "m1", SamplingParams(max_tokens=3))
  eng.step()
  r2 = eng.submit([9, 10, 11], "m2", SamplingParams(max_tokens=3))
  eng.step()
  assert [s.rid for s in eng.waiting] == [r2]          # no slot: waits
  while eng.has_work:
    eng.step()
  assert all(eng.outputs[r].finish_reason == "length" for r in (r0, r1, r2))
  assert "m2" in eng.resident_adapters and eng.stats.adapter_evictions == 1


def test_removing_a_swapped_out_adapter_and_refusals(tiny, many):
  eng = engine(tiny, many[:3], slots=1)
  assert eng.resident_adapters == ["m0"]
  eng.remove_adapter("m2")                              # registered, never loaded
  assert "m2" not in eng.adapter_names
  with pytest.raises(IcarusError, match="is not registered"):
    eng.submit([1, 2], "m2")
  out = eng.generate([[1, 2, 3]], ["m1"], SamplingParams(max_tokens=2))[0]
  assert out.finish_reason == "length" and eng.resident_adapters == ["m1"]
