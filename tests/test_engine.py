"""Serving engine: equality with the naive reference, cross-model reuse, fan-out, page
accounting, preemption, tenant isolation, errors and the bounded number of compiled programs."""

import jax
import numpy as np
import pytest

from icarus_jax import FingerprintMismatchError, IcarusError, init_adapter, init_base_params
from icarus_jax.serving import engine_steps
from icarus_jax.serving.engine import Engine
from icarus_jax.errors import RequestTooLargeError, UnknownAdapterError
from icarus_jax.serving.reference import reference_generate
from icarus_jax.serving.sampling import SamplingParams

PS = 8          # page size
NUM_PAGES = 64
MODES = ["icarus", "isolated"]
# The equality tests run with both attention backends (Pallas in interpret mode on CPU).
BACKENDS = pytest.mark.parametrize("backend", ["reference", "pallas"])


@pytest.fixture(scope="module")
def setup(tiny):
  cfg, params = tiny
  ads = {}
  for mode in MODES:
    kind = "icarus_lora" if mode == "icarus" else "lora"
    ads[mode] = [init_adapter(cfg, jax.random.key(20 + i), name=f"agent{i}", kind=kind,
                              base_params=params, rank=4 + 2 * i, b_std=0.05) for i in range(3)]
  return cfg, params, ads


def make_engine(setup, mode, num_pages=NUM_PAGES, n_adapters=3, **kw):
  cfg, params, ads = setup
  kw = {"page_size": PS, "max_batch": 4, "prefill_chunk": 16, **kw}
  eng = Engine(cfg, params, mode=mode, num_pages=num_pages, **kw)
  for a in ads[mode][:n_adapters]:
    eng.add_adapter(a)
  return eng


def ref(setup, eng, adapter, prompt, n):
  cfg, params, _ = setup
  ad = None if adapter is None else eng.adapters[adapter]
  return reference_generate(cfg, params, ad, prompt, n)


def prompts(seed, lengths):
  rng = np.random.RandomState(seed)
  return [list(rng.randint(0, 256, n)) for n in lengths]


@pytest.mark.parametrize("mode", MODES)
@BACKENDS
def test_mixed_batches_equal_naive_reference(setup, mode, backend):
  """Base + 3 adapters, prompt lengths around page boundaries, different output lengths, and
  requests joining while others run."""
  eng = make_engine(setup, mode, attention_backend=backend)
  names = [None, "agent0", "agent1", "agent2"]
  first = prompts(1, [PS - 1, PS, PS + 1, 2 * PS + 3])
  max_toks = [9, 4, 12, 7]
  rids = [eng.submit(p, names[i], SamplingParams(max_tokens=max_toks[i])) for i, p in enumerate(first)]
  for _ in range(3):
    eng.step()
  late = prompts(2, [1, 3 * PS, 37])
  late_names = ["agent2", None, "agent1"]
  rids += [eng.submit(p, n, SamplingParams(max_tokens=6)) for p, n in zip(late, late_names)]
  list(eng.run())
  for rid, p, n, m in zip(rids, first + late, names + late_names, max_toks + [6, 6, 6]):
    out = eng.outputs[rid]
    assert out.finish_reason == "length"
    assert out.output_tokens == ref(setup, eng, n, p, m), (mode, n, len(p))


@pytest.mark.parametrize("mode", MODES)
@BACKENDS
def test_long_prompt_is_chunked(setup, mode, backend):
  eng = make_engine(setup, mode, attention_backend=backend)
  p = prompts(3, [53])[0]  # 4 chunks of <= 16 tokens
  out = eng.generate([p], ["agent1"], SamplingParams(max_tokens=5))[0]
  assert out.output_tokens == ref(setup, eng, "agent1", p, 5)
  assert eng.stats.prefill_tokens_computed == 53


@BACKENDS
def test_cross_model_reuse_icarus(setup, backend):
  """Agent A answers; agent B gets A's prompt + answer + a new question and computes only the
  new tokens; its output equals the naive reference."""
  eng = make_engine(setup, "icarus", attention_backend=backend)
  prompt_a = prompts(4, [21])[0]
  out_a = eng.generate([prompt_a], ["agent0"], SamplingParams(max_tokens=6))[0]
  question = prompts(5, [11])[0]
  # The K/V of A's final sampled token were never computed (generation stopped right after
  # sampling it), so B computes that one token plus the question.
  prompt_b = prompt_a + out_a.output_tokens + question
  before = eng.stats.prefill_tokens_computed
  out_b = eng.generate([prompt_b], ["agent1"], SamplingParams(max_tokens=6))[0]
  computed = eng.stats.prefill_tokens_computed - before
  assert computed == len(question) + 1
  assert out_b.num_cached_tokens == len(prompt_b) - len(question) - 1
  assert out_b.output_tokens == ref(setup, eng, "agent1", prompt_b, 6)
  # When the reused context ends at a token whose K/V exist (A's answer without its final
  # token, as when that token is a stop token), B computes exactly the question's tokens.
  prompt_c = prompt_a + out_a.output_tokens[:-1] + question
  before = eng.stats.prefill_tokens_computed
  out_c = eng.generate([prompt_c], ["agent2"], SamplingParams(max_tokens=4))[0]
  assert eng.stats.prefill_tokens_computed - before == len(question)
  assert out_c.output_tokens == ref(setup, eng, "agent2", prompt_c, 4)
  assert eng.stats.hit_rate("agent2") == pytest.approx((len(prompt_c) - len(question)) / len(prompt_c))


@BACKENDS
def test_cross_model_reuse_isolated_recomputes(setup, backend):
  eng = make_engine(setup, "isolated", attention_backend=backend)
  prompt_a = prompts(4, [21])[0]
  out_a = eng.generate([prompt_a], ["agent0"], SamplingParams(max_tokens=6))[0]
  prompt_b = prompt_a + out_a.output_tokens + prompts(5, [11])[0]
  before = eng.stats.prefill_tokens_computed
  out_b = eng.generate([prompt_b], ["agent1"], SamplingParams(max_tokens=6))[0]
  assert eng.stats.prefill_tokens_computed - before == len(prompt_b)
  assert out_b.num_cached_tokens == 0
  assert out_b.output_tokens == ref(setup, eng, "agent1", prompt_b, 6)


@pytest.fixture(scope="module")
def eight(setup):
  cfg, params, ads = setup
  out = {}
  for mode in MODES:
    kind = "icarus_lora" if mode == "icarus" else "lora"
    out[mode] = [init_adapter(cfg, jax.random.key(40 + i), name=f"fan{i}", kind=kind,
                              base_params=params, rank=4, b_std=0.05) for i in range(8)]
  return out


@pytest.mark.parametrize("mode,copies", [("icarus", 1), ("isolated", 8)])
@BACKENDS
def test_fan_out_prefills_once(setup, eight, mode, copies, backend):
  eng = make_engine(setup, mode, n_adapters=0, max_batch=8, attention_backend=backend)
  for a in eight[mode]:
    eng.add_adapter(a)
  context = prompts(6, [4 * PS])[0]
  outs = eng.generate([context] * 8, [a.name for a in eight[mode]], SamplingParams(max_tokens=1))
  assert eng.stats.prefill_tokens_computed == copies * len(context)
  assert eng.stats.peak_pages_used == copies * 4
  assert eng.kv_bytes_resident() == copies * 4 * eng.bytes_per_page()
  for a, o in zip(eight[mode], outs):
    assert o.output_tokens == ref(setup, eng, a.name, context, 1)
  if mode == "icarus":
    assert len({o.output_tokens[0] for o in outs}) > 1  # different adapters, different answers


@pytest.mark.parametrize("mode", MODES)
@BACKENDS
def test_page_accounting_and_preemption(setup, mode, backend):
  """A pool far too small for the load completes every request by preemption; afterwards, with
  the cache flushed, every page is free and no refcount is negative."""
  eng = make_engine(setup, mode, num_pages=12, attention_backend=backend)  # 11 usable pages of 8 tokens
  ps = prompts(7, [20, 13, 25, 9, 30, 17])
  names = ["agent0", "agent1", None, "agent2", "agent0", "agent1"]
  # 20 tokens each: with chunked prefill, admission's watermark alone absorbs 12 (no preemption)
  rids = [eng.submit(p, n, SamplingParams(max_tokens=20)) for p, n in zip(ps, names)]
  while eng.has_work:
    eng.step()
    eng.check_invariants()  # refcount == holders, never negative, free + used == capacity
  outs = [eng.outputs[r] for r in rids]
  assert eng.stats.preemptions > 0
  for p, n, o in zip(ps, names, outs):
    assert o.finish_reason == "length"
    assert o.output_tokens == ref(setup, eng, n, p, 20)
  assert (eng.alloc.refcount >= 0).all()
  assert (eng.alloc.refcount == 0).all()
  eng.flush_cache()
  assert eng.alloc.num_free == eng.alloc.capacity
  assert eng.pages_used() == 0


def test_request_larger_than_pool_is_refused(setup):
  eng = make_engine(setup, "icarus", num_pages=12)
  with pytest.raises(RequestTooLargeError, match="needs 12 KV pages .* whole pool has 11"):
    eng.submit(prompts(8, [90])[0], "agent0", SamplingParams(max_tokens=6))
  assert not eng.has_work


def test_tenants_never_share_pages(setup):
  eng = make_engine(setup, "icarus")
  p = prompts(9, [3 * PS + 2])[0]
  a = eng.generate([p], ["agent0"], SamplingParams(max_tokens=3), tenant="alice")[0]
  pages_alice = set(eng.cache.page_to_node)
  b = eng.generate([p], ["agent0"], SamplingParams(max_tokens=3), tenant="bob")[0]
  pages_bob = set(eng.cache.page_to_node) - pages_alice
  assert b.num_cached_tokens == 0
  assert pages_bob and not (pages_bob & pages_alice)
  assert all(n.namespace[1] == "alice" for n in eng.cache.page_to_node.values() if n.page in pages_alice)
  c = eng.generate([p], ["agent1"], SamplingParams(max_tokens=3), tenant="alice")[0]
  assert c.num_cached_tokens == len(p)  # same tenant, other adapter: full reuse
  assert a.output_tokens == b.output_tokens


def test_bad_requests_are_refused_and_others_unharmed(setup):
  cfg, params, ads = setup
  eng = make_engine(setup, "icarus")
  good = prompts(10, [12, 19])
  rids = [eng.submit(good[0], "agent0", SamplingParams(max_tokens=8)),
          eng.submit(good[1], "agent1", SamplingParams(max_tokens=8))]
  eng.step()
  with pytest.raises(UnknownAdapterError, match="'nope' is not registered; available"):
    eng.submit([1, 2, 3], "nope")
  with pytest.raises(IcarusError, match="prompt is empty"):
    eng.submit([], "agent0")
  with pytest.raises(IcarusError, match=r"token ids must be in \[0, 272\)"):
    eng.submit([5, 272, -1], "agent0")
  with pytest.raises(RequestTooLargeError, match="model's context is 512"):
    eng.submit([1] * 600, "agent0")
  with pytest.raises(IcarusError, match="max_tokens must be a positive int"):
    eng.submit([1, 2], "agent0", SamplingParams(max_tokens=0))
  other = init_base_params(cfg, jax.random.key(77), scale=0.1)
  foreign = init_adapter(cfg, jax.random.key(1), name="foreign", base_params=other, b_std=0.05)
  with pytest.raises(FingerprintMismatchError):
    eng.add_adapter(foreign)
  with pytest.raises(IcarusError, match="already registered"):
    eng.add_adapter(ads["icarus"][0])
  list(eng.run())
  for rid, p, n in zip(rids, good, ["agent0", "agent1"]):
    assert eng.outputs[rid].output_tokens == ref(setup, eng, n, p, 8)
  assert len(eng.outputs) == 2


def test_isolated_mode_refuses_icarus_and_icarus_mode_refuses_conventional(setup):
  cfg, params, ads = setup
  eng = make_engine(setup, "icarus", n_adapters=0)
  with pytest.raises(IcarusError, match="owns its KV cache"):
    eng.add_adapter(ads["isolated"][0])
  eng = make_engine(setup, "isolated", n_adapters=0)
  with pytest.raises(IcarusError, match="isolated mode serves conventional models"):
    eng.add_adapter(ads["icarus"][0])


def test_adapter_removal_drains(setup):
  eng = make_engine(setup, "icarus")
  p = prompts(11, [10])[0]
  rid = eng.submit(p, "agent2", SamplingParams(max_tokens=6))
  eng.step()
  eng.remove_adapter("agent2")
  with pytest.raises(UnknownAdapterError):
    eng.submit(p, "agent2")
  assert "agent2" in eng.adapters  # still held by the running request
  list(eng.run())
  assert eng.outputs[rid].output_tokens == reference_generate(
      setup[0], setup[1], setup[2]["icarus"][2], p, 6)
  assert "agent2" not in eng.adapters and "agent2" not in eng.resident_adapters


def test_invariants_hold_under_a_simulated_heavy_load():
  """Thousands of scheduler steps (roofline simulator, no arrays): after every step the page
  bookkeeping is consistent, including copy-on-write, eviction and preemption paths."""
  from icarus_jax.model.adapters import Adapter, AdapterConfig
  from icarus_jax.bench.harness import run_workflows
  from icarus_jax.model.config import ModelConfig
  from icarus_jax.serving.cost_model import HARDWARE, RooflineSimulator
  from icarus_jax.bench.workload import WorkloadConfig, generate_workflows
  cfg = ModelConfig.from_preset("llama-3.1-8b")
  for mode in ("icarus", "isolated"):
    eng = Engine(cfg, None, mode=mode, num_pages=300, page_size=16, max_batch=16,
                 prefill_chunk=512, simulator=RooflineSimulator(cfg, HARDWARE["h100"]),
                 max_seq_len=4096)
    kind = "icarus_lora" if mode == "icarus" else "lora"
    for i in range(4):
      eng.add_adapter(Adapter({}, AdapterConfig(name=f"m{i}", kind=kind)))
    step = eng.step
    def checked_step():
      out = step()
      eng.check_invariants()
      return out
    eng.step = checked_step
    wl = WorkloadConfig(num_workflows=24, num_models=4, request_rate=2.0, num_turns=6,
                        system_len=256, context_len=128, header_len=16, output_len=32,
                        observation_len=64, seed=5)
    m = run_workflows(eng, generate_workflows(wl), [f"m{i}" for i in range(4)])
    assert m["completed"] == 24 * 6 and m["pages_evicted"] > 0
    eng.flush_cache()
    assert eng.pages_used() == 0


def test_compiled_programs_stay_within_buckets(setup):
  """Two different mixed workloads (prompt lengths 1..60, outputs 1..10, four models): every
  compiled step program is one of the engine's buckets, so nothing compiles per request."""
  eng = make_engine(setup, "icarus", max_batch=4)
  before = eng.runner.compiled_steps()
  names = [None, "agent0", "agent1", "agent2"]
  for seed in (0, 1):
    rng = np.random.RandomState(seed)
    for i in range(12):
      eng.submit(list(rng.randint(0, 256, rng.randint(1, 60))), names[i % 4],
                 SamplingParams(max_tokens=int(rng.randint(1, 10))))
    list(eng.run())
  grown = eng.runner.compiled_steps() - before
  assert 0 < len(eng.shapes_seen) <= eng.num_buckets()
  assert grown <= len(eng.shapes_seen)  # one program per bucket shape at most, never per request
  assert eng.num_buckets() == 3 * 7 * (2 + 1)  # batch {1,2,4} x pages {1..64} x T {8,16} + decode


@pytest.mark.parametrize("mode,mixed", [("icarus", True),
                                        pytest.param("isolated", False, marks=pytest.mark.slow)])
def test_warm_up_compiles_every_program_a_run_needs_and_changes_no_output(setup, mode, mixed):
  """After ``warm_up(max_context)``, a mixed workload within that context compiles nothing
  (oracle: the jit cache's size), and its outputs still equal the naive reference although
  warm-up wrote garbage K/V into free pages."""
  eng = make_engine(setup, mode, max_batch=2, mixed_steps=mixed)
  # B {1, 2} x pages {1, 2, 4, 8} x T {1, 8, 16}, less T = 16 on one page (needs 9+ tokens)
  assert eng.warm_up(max_context=40) == 2 * (4 * 3 - 1)
  compiled = eng.runner.compiled_steps()
  names = [None, "agent0", "agent1", "agent2"]
  rng = np.random.RandomState(3)
  reqs = [(list(rng.randint(0, 256, rng.randint(1, 30))), names[i % 4], int(rng.randint(1, 10)))
          for i in range(8)]
  rids = [eng.submit(p, n, SamplingParams(max_tokens=k)) for p, n, k in reqs]
  list(eng.run())
  assert eng.runner.compiled_steps() == compiled
  for rid, (p, n, k) in list(zip(rids, reqs))[:6]:
    assert eng.outputs[rid].output_tokens == ref(setup, eng, n, p, k)
  eng.submit([1, 2, 3], None, SamplingParams(max_tokens=2))
  with pytest.raises(IcarusError, match="idle engine"):
    eng.warm_up()


def test_min_page_bucket_fewer_programs_same_tokens(setup):
  """``min_page_bucket=4``: no step reads fewer than 4 page slots, the bound on programs drops
  by the page buckets below it, warm-up compiles only those, and greedy outputs still equal the
  naive reference (the extra slots are masked)."""
  eng = make_engine(setup, "icarus", max_batch=2, min_page_bucket=3)  # rounded up to 4
  assert eng.num_buckets() == 2 * 5 * 3  # B {1,2} x pages {4..64} x T {8,16} + decode
  assert eng.warm_up(max_context=40) == 2 * 2 * 3  # pages {4, 8} (40 tokens: 5 pages)
  rng = np.random.RandomState(5)
  reqs = [(list(rng.randint(0, 256, rng.randint(1, 30))), n, 4) for n in (None, "agent0", "agent1")]
  rids = [eng.submit(p, n, SamplingParams(max_tokens=k)) for p, n, k in reqs]
  list(eng.run())
  assert all(shape[-1] >= 4 for shape in eng.shapes_seen), eng.shapes_seen
  for rid, (p, n, k) in zip(rids, reqs):
    assert eng.outputs[rid].output_tokens == ref(setup, eng, n, p, k)


def test_warm_up_rejects_an_empty_context_range(setup):
  eng = make_engine(setup, "icarus", max_batch=2)
  before = eng.runner.compiled_steps()
  with pytest.raises(ValueError, match="min_context <= max_context.*min_context=30, max_context=20"):
    eng.warm_up(max_context=20, min_context=30)
  with pytest.raises(ValueError, match="got min_context=0"):
    eng.warm_up(min_context=0)
  assert eng.runner.compiled_steps() == before and not eng.shapes_seen  # nothing was run


def test_sampling_seeded_and_filters(setup):
  eng = make_engine(setup, "icarus")
  p = prompts(12, [9])[0]
  greedy = ref(setup, eng, "agent0", p, 6)
  hot = SamplingParams(temperature=1.5, seed=3, max_tokens=6)
  a = eng.generate([p, p], ["agent0", "agent0"], hot)
  assert a[0].output_tokens == a[1].output_tokens  # same seed, same tokens, whatever the batch
  b = eng.generate([p], ["agent0"], SamplingParams(temperature=1.5, seed=4, max_tokens=6))[0]
  assert b.output_tokens != a[0].output_tokens
  k1 = eng.generate([p], ["agent0"], SamplingParams(temperature=2.0, top_k=1, seed=5, max_tokens=6))[0]
  assert k1.output_tokens == greedy
  p_small = eng.generate([p], ["agent0"], SamplingParams(temperature=2.0, top_p=1e-6, seed=5,
                                                         max_tokens=6))[0]
  assert p_small.output_tokens == greedy


def test_stop_tokens_and_streaming_callback(setup):
  eng = make_engine(setup, "icarus")
  p = prompts(13, [14])[0]
  full = ref(setup, eng, "agent1", p, 8)
  stop = full[3]
  streamed = []
  rid = eng.submit(p, "agent1", SamplingParams(max_tokens=8, stop_token_ids=(stop,)),
                   callback=lambda r, t, done: streamed.append((r, t, done)))
  list(eng.run())
  out = eng.outputs[rid]
  expect = full[:full.index(stop) + 1]
  assert out.output_tokens == expect and out.finish_reason == "stop"
  assert [t for _, t, _ in streamed] == expect
  assert [d for _, _, d in streamed] == [False] * (len(expect) - 1) + [True]
  assert len(out.token_times) == len(expect) and out.first_token_time >= out.arrival_time


def test_abort_frees_pages(setup):
  eng = make_engine(setup, "icarus")
  rid = eng.submit(prompts(14, [30])[0], "agent0", SamplingParams(max_tokens=50))
  eng.step()
  eng.step()
  assert eng.abort(rid)
  assert eng.outputs[rid].finish_reason == "abort"
  assert (eng.alloc.refcount == 0).all()
  eng.flush_cache()
  assert eng.pages_used() == 0


def test_text_prompts_with_a_tokenizer(setup):
  from icarus_jax.model.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  eng = make_engine(setup, "icarus", tokenizer=tok)
  out = eng.generate(["sort qdax:"], ["agent0"], SamplingParams(max_tokens=3))[0]
  assert out.prompt_tokens == tok.encode("sort qdax:")
  assert out.output_tokens == ref(setup, eng, "agent0", tok.encode("sort qdax:"), 3)
  with pytest.raises(IcarusError, match="no tokenizer"):
    make_engine(setup, "icarus").submit("text", "agent0")


def test_unknown_attention_backend_is_refused(setup):
  cfg, params, _ = setup
  with pytest.raises(IcarusError, match=r"attention_backend='triton' is unknown; accepted: "
                                        r"\('reference', 'pallas'\)"):
    Engine(cfg, params, attention_backend="triton")
  assert Engine(cfg, params, attention_backend="pallas", num_pages=4).runner.attn is (
      engine_steps.paged_attention_pallas)


@pytest.mark.parametrize("mode", MODES)
@BACKENDS
def test_mixed_steps_equal_naive_reference(setup, mode, backend):
  """``mixed_steps=True``: decode rows ride along the prefill of requests joining mid-run (one
  program runs both), with chunked prompts: outputs equal the
  naive reference and some steps really mixed decode and prefill rows."""
  eng = make_engine(setup, mode, num_pages=40, attention_backend=backend, mixed_steps=True,
                    record_schedule=True)
  names = [None, "agent0", "agent1", "agent2"]
  first = prompts(7, [PS + 3, 2 * PS, 3 * PS + 1])
  rids = [eng.submit(p, names[i], SamplingParams(max_tokens=9)) for i, p in enumerate(first)]
  eng.step()
  late = prompts(8, [37, 5, 2 * PS + 2])
  late_names = ["agent2", None, "agent1"]
  for p, n in zip(late, late_names):
    eng.step()
    rids.append(eng.submit(p, n, SamplingParams(max_tokens=6)))
  while eng.has_work:
    eng.step()
    eng.check_invariants()
  for rid, p, n in zip(rids, first + late, names[:3] + late_names):
    out = eng.outputs[rid]
    assert out.finish_reason == "length"
    assert out.output_tokens == ref(setup, eng, n, p, len(out.output_tokens)), (mode, n, len(p))
  mixed = 0
  for e in eng.schedule_log:
    if e[0] == "step" and not e[1]:
      lens = [k for _, _, k in e[2]]
      mixed += 1 in lens and any(k > 1 for k in lens)
  assert mixed > 0


@pytest.mark.parametrize("mixed", [False, True])
def test_token_budget_bounds_every_step_and_keeps_decodes_running(setup, mixed):
  """``max_num_batched_tokens``: while a long prompt is prefilled, every step still decodes every
  running request (decode rows are planned first) and computes at most the budget; the long
  prompt runs in chunks of what is left; outputs still equal the naive reference."""
  budget = 12
  eng = make_engine(setup, "icarus", max_num_batched_tokens=budget, mixed_steps=mixed,
                    record_schedule=True)
  names = ["agent0", "agent1", None]
  short = prompts(7, [5, 9, 6])
  sp = SamplingParams(max_tokens=24)
  rids = [eng.submit(p, a, sp) for p, a in zip(short, names)]
  while min(len(eng.outputs[r].output_tokens) for r in rids) < 2:
    eng.step()
  (long_prompt,) = prompts(8, [150])
  long_rid = eng.submit(long_prompt, "agent2", SamplingParams(max_tokens=3))
  steps = []
  while eng.outputs[long_rid].first_token_time is None:
    before, live = len(eng.schedule_log), {r for r in rids if not eng.outputs[r].finished}
    eng.step()
    eng.check_invariants()
    steps.append((live, [e for e in eng.schedule_log[before:] if e[0] == "step"]))
  for live, calls in steps:
    rows = [r for _, _, rs in calls for r in rs]
    assert sum(n for _, _, n in rows) <= budget
    # every running request got its token in the step
    assert {rid for rid, _, n in rows if n == 1 and rid != long_rid} == live, rows
    assert all(n <= budget - len(live) for rid, _, n in rows if rid == long_rid)
  assert len(steps) >= 150 // (budget - len(rids))  # chunked by the budget, not by prefill_chunk
  for _ in eng.run():
    pass
  for r, p, a in zip(rids, short, names):
    assert eng.outputs[r].output_tokens == ref(setup, eng, a, p, 24)
  assert eng.outputs[long_rid].output_tokens == ref(setup, eng, "agent2", long_prompt, 3)


def test_token_budget_is_checked(setup):
  with pytest.raises(IcarusError, match="max_num_batched_tokens must be an int >= max_batch"):
    make_engine(setup, "icarus", max_num_batched_tokens=2)  # max_batch 4: decodes would not fit


def test_request_status_follows_the_request(setup):
  """WAITING -> PREFILLING -> DECODING -> gone from the queues, as the public views show."""
  from icarus_jax.serving.request import RequestStatus
  eng = make_engine(setup, "icarus", prefill_chunk=8)
  rid = eng.submit(prompts(3, [20])[0], "agent0", SamplingParams(max_tokens=3))
  (req,) = eng.waiting
  seen = [req.status]
  while eng.has_work:
    eng.step()
    eng.check_invariants()
    seen.append(req.status)
  assert [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]] == [
      RequestStatus.WAITING, RequestStatus.PREFILLING, RequestStatus.DECODING,
      RequestStatus.FINISHED]
  assert seen.count(RequestStatus.PREFILLING) == 2  # 20 tokens in chunks of 8: 3 calls
  assert eng.outputs[rid].finish_reason == "length" and not eng.running and not eng.waiting
