"""The scheduler (``Engine``) and its runners: one schedule whatever executes it, the step as a
pytree, and the disk tier of the adapter store.

Oracles: the device runner's own schedule (for the roofline runner), hand-computed bucket
arrays (for ``step_batch.build``), all-resident serving and the naive reference (for the disk
tier).
"""

import math

import jax
import numpy as np
import pytest

from icarus_jax import IcarusError, init_adapter
from icarus_jax.serving import step_batch
from icarus_jax.serving.cost_model import HARDWARE, RooflineSimulator
from icarus_jax.serving.engine import Engine
from icarus_jax.checkpoints.peft_io import save_adapter
from icarus_jax.serving.reference import reference_generate
from icarus_jax.serving.runner import DeviceRunner, RooflineRunner
from icarus_jax.serving.sampling import SAMPLING_FIELDS, SamplingParams
from icarus_jax.serving.step_batch import StepBatch, StepRow

PS = 8


def seeded_workload(seed, n, names):
  """Prompts of 3..40 tokens, half of them sharing a 17-token prefix (cache hits, fan-out and a
  partial-page copy), outputs of 1..20 tokens, adapters drawn from ``names``."""
  rng = np.random.RandomState(seed)
  shared = list(rng.randint(0, 256, 17))
  reqs = []
  for i in range(n):
    body = list(rng.randint(0, 256, rng.randint(3, 24)))
    prompt = shared + body if i % 2 else body
    reqs.append((prompt, names[rng.randint(len(names))], int(rng.randint(1, 21))))
  return reqs


def drive(eng, reqs, late_every=3):
  """Submits a third of the requests up front and one more after every ``late_every`` steps."""
  reqs = list(reqs)
  first = len(reqs) // 3
  for p, a, m in reqs[:first]:
    eng.submit(p, a, SamplingParams(max_tokens=m))
  pending, k = reqs[first:], 0
  while eng.has_work or pending:
    eng.step()
    eng.check_invariants()
    k += 1
    if pending and k % late_every == 0:
      p, a, m = pending.pop(0)
      eng.submit(p, a, SamplingParams(max_tokens=m))


@pytest.mark.parametrize("mode", ["icarus", "isolated"])
def test_roofline_runner_follows_the_device_runners_schedule(tiny, mode):
  """Same scheduler, two runners: identical admissions, preemptions, adapter loads and step
  rows on a seeded workload under page pressure (preemptions happen) with 5 adapters over 2
  device slots. Outputs do not feed later prompts, so the roofline's stand-in tokens cannot
  change the schedule."""
  cfg, params = tiny
  kind = "icarus_lora" if mode == "icarus" else "lora"
  ads = [init_adapter(cfg, jax.random.key(70 + i), name=f"r{i}", kind=kind, base_params=params,
                      rank=4, b_std=0.05) for i in range(5)]
  reqs = seeded_workload(3, 24, [None] + [a.name for a in ads])
  kw = dict(mode=mode, num_pages=10, page_size=PS, max_batch=4, prefill_chunk=16,
            max_adapters=2, record_schedule=True)
  logs, stats = [], []
  for sim in (None, RooflineSimulator(cfg, HARDWARE["h100"])):
    eng = Engine(cfg, params, simulator=sim, **kw)
    for a in ads:
      eng.add_adapter(a)
    drive(eng, reqs)
    logs.append(eng.schedule_log)
    st = eng.snapshot()
    stats.append({k: st[k] for k in ("preemptions", "steps", "adapter_loads", "adapter_evictions",
                                     "prefill_tokens_computed", "cached_prompt_tokens",
                                     "decode_tokens")})
  device, roofline = logs
  assert device == roofline
  assert stats[0] == stats[1]
  kinds = {e[0] for e in device}
  assert {"admit", "preempt", "step", "load"} <= kinds  # the workload exercises all of them
  assert stats[0]["preemptions"] > 0 and stats[0]["adapter_evictions"] > 0
  assert stats[0]["cached_prompt_tokens"] > 0


def test_runners_are_chosen_by_the_constructor_only(tiny):
  cfg, params = tiny
  assert isinstance(Engine(cfg, params, num_pages=8).runner, DeviceRunner)
  sim = RooflineSimulator(cfg, HARDWARE["a100"])
  eng = Engine(cfg, params, num_pages=8, simulator=sim)
  assert isinstance(eng.runner, RooflineRunner) and eng.clock is sim.clock
  with pytest.raises(IcarusError, match="needs the device runner"):
    eng.context_kv([1, 2, 3])


def test_step_batch_build_matches_hand_computed_arrays():
  seq_a = list(range(10, 30))   # 20 tokens, 5 computed, 7 new from position 5
  seq_b = list(range(40, 49))   # 9 tokens fully cached: decoder row only, at position 8
  st = step_batch.build([StepRow(seq_a, 5, 7, [3, 9], 2), StepRow(seq_b, 9, 0, [4, 5], 0)],
                        decode=False, max_batch=8, prefill_chunk=32, max_pages=16)
  b = st.batch
  assert st.num_rows == 2 and not st.decode
  assert b.shape == (2, 8, 2)                   # B bucket 2, T bucket 8 (>= 7), N bucket 2
  assert b.tokens[0].tolist() == [15, 16, 17, 18, 19, 20, 21, 0]
  assert b.positions[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 11]   # padding at the last position
  assert b.valid[0].tolist() == [True] * 7 + [False]
  assert not b.valid[1].any() and b.tokens[1].tolist() == [0] * 8
  assert b.page_table.tolist() == [[3, 9], [4, 5]]
  assert b.slots.tolist() == [2, 0]
  assert b.dec_pos.tolist() == [11, 8] and b.dec_token.tolist() == [21, 48]
  assert b.last_idx.tolist() == [6, 0]
  assert st.row_costs() == [(12, 7, 2), (9, 0, 0)]
  # decode: T = 1; three rows pad to the bucket 4 with null pages and base slots
  d = step_batch.build([StepRow(seq_a, i, 1, [1, 2, 3], 1) for i in (4, 5, 6)], decode=True,
                       max_batch=8, prefill_chunk=32, max_pages=16)
  assert d.batch.shape == (4, 1, 4) and d.num_rows == 3
  assert d.batch.page_table[3].tolist() == [0, 0, 0, 0] and d.batch.page_table[0].tolist() == [1, 2, 3, 0]
  with pytest.raises(ValueError, match="1..2 rows"):
    step_batch.build([StepRow(seq_a, 0, 1, [1], 0)] * 3, decode=True, max_batch=2,
                     prefill_chunk=8, max_pages=4)


def test_step_batch_is_a_pytree_of_its_arrays_only():
  """Only the arrays enter the jitted step: the treedef (hence the compiled program) does not
  depend on how many rows are real."""
  rows = lambda n: [StepRow(list(range(9)), 8, 1, [1, 2], 0)] * n  # noqa: E731
  s3 = step_batch.build(rows(3), decode=True, max_batch=4, prefill_chunk=8, max_pages=4)
  s4 = step_batch.build(rows(4), decode=True, max_batch=4, prefill_chunk=8, max_pages=4)
  leaves, tree = jax.tree_util.tree_flatten(s3.batch)
  assert len(leaves) == len(step_batch.ARRAY_FIELDS) - 1 + len(SAMPLING_FIELDS) == 8 + 14
  assert tree == jax.tree_util.tree_flatten(s4.batch)[1]
  doubled = jax.tree_util.tree_map(lambda x: x * 2, s3.batch)
  assert isinstance(doubled, StepBatch) and doubled.dec_pos.tolist() == [16, 16, 16, 0]


# ------------------------------------------------------------------------------ disk tier
@pytest.fixture(scope="module")
def disk_adapters(tiny, tmp_path_factory):
  cfg, params = tiny
  root = tmp_path_factory.mktemp("adapters")
  ads = [init_adapter(cfg, jax.random.key(300 + i), name=f"d{i}", base_params=params, rank=4,
                      b_std=0.06) for i in range(8)]
  for a in ads:
    save_adapter(a, root / a.name)
  return root, ads


def test_disk_tier_serves_like_all_resident(tiny, disk_adapters):
  """8 adapters registered by path, 2 host copies, 2 device slots: outputs equal serving with
  every adapter resident; adapters are re-read from disk when the host tier dropped them."""
  cfg, params = tiny
  root, ads = disk_adapters
  rng = np.random.RandomState(5)
  names = [f"d{i}" for i in rng.randint(0, 8, 20)]
  prompts = [list(rng.randint(0, 256, rng.randint(4, 14))) for _ in names]
  sp = SamplingParams(max_tokens=4)
  kw = dict(num_pages=64, page_size=PS, max_batch=4, prefill_chunk=16)
  full = Engine(cfg, params, max_adapters=8, **kw)
  for a in ads:
    full.add_adapter(a)
  want = [o.output_tokens for o in full.generate(prompts, names, sp)]

  eng = Engine(cfg, params, max_adapters=2, max_host_adapters=2, **kw)
  for a in ads:
    eng.register_adapter(root / a.name)
  assert eng.adapter_names == [a.name for a in ads]
  assert len(eng.host_adapters) == 2 and len(eng.resident_adapters) == 2
  reads = eng.snapshot()["adapter_disk_reads"]
  assert reads == 8
  got = [o.output_tokens for o in eng.generate(prompts, names, sp)]
  assert got == want
  snap = eng.snapshot()
  assert snap["adapter_disk_reads"] > reads and snap["host_adapters"] <= 2
  assert snap["adapter_evictions"] > 0
  i = names.index("d5")  # and one against the independent reference
  assert got[i] == reference_generate(cfg, params, ads[5], prompts[i], 4)


def test_disk_tier_refuses_bad_adapters_at_registration(tiny, disk_adapters, tmp_path):
  cfg, params = tiny
  root, _ = disk_adapters
  eng = Engine(cfg, params, num_pages=16, page_size=PS, max_adapters=2, max_rank=2)
  with pytest.raises(IcarusError, match="rank 4 > the pool's max_rank 2"):
    eng.register_adapter(root / "d0")
  with pytest.raises((IcarusError, OSError)):
    eng.register_adapter(tmp_path / "missing")
  assert eng.adapter_names == []
  with pytest.raises(IcarusError, match="max_host_adapters must be >= 0"):
    Engine(cfg, params, num_pages=8, max_host_adapters=-1)


def test_adapter_vanishing_from_disk_fails_only_its_requests(tiny, disk_adapters, tmp_path):
  """The host tier dropped ``d1`` and its directory is gone: its request ends with a clear error
  at admission, the other requests are served."""
  import shutil
  cfg, params = tiny
  root, _ = disk_adapters
  for n in ("d0", "d1", "d2"):
    shutil.copytree(root / n, tmp_path / n)
  eng = Engine(cfg, params, num_pages=32, page_size=PS, max_adapters=1, max_host_adapters=1)
  for n in ("d0", "d1", "d2"):
    eng.register_adapter(tmp_path / n)
  assert "d1" not in eng.host_adapters and "d1" not in eng.resident_adapters
  shutil.rmtree(tmp_path / "d1")
  outs = eng.generate([[1, 2, 3], [4, 5, 6], [7, 8, 9]], ["d0", "d1", "d2"],
                      SamplingParams(max_tokens=3))
  assert [o.finish_reason for o in outs] == ["length", "error", "length"]
  assert "cannot load adapter 'd1'" in outs[1].error
  assert math.isfinite(len(outs[0].output_tokens)) and len(outs[2].output_tokens) == 3
