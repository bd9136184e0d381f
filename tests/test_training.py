"""Training: ICaRus objective, baselines, resume, data builders and bad data."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icarus_jax import IcarusError, forward
from icarus_jax.training.data import encode_example, examples_source, load_jsonl, make_dataset
from icarus_jax.model.tokenizer import ByteTokenizer
from icarus_jax.training.trainer import run
from icarus_jax.training.objective import (TrainConfig, init_trainable, loss_fn, make_optimizer, model_logits,
                                 param_diff, train_step)

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reversal_ds(tfds_dir):
  src = examples_source("reversal", "train", data_dir=tfds_dir, tfds_config="small")
  return make_dataset(src, TOK, batch_size=16, seq_len=32, seed=0)


@pytest.mark.parametrize("task", ["addition", "sorting", "reversal", "kv_lookup", "kv_recall",
                                  "add2", "city_year", "topic"])
def test_tfds_builders_produce_expected_counts(tfds_dir, task):
  """Three splits of the expected sizes, pairwise disjoint by prompt."""
  src = {s: examples_source(task, s, data_dir=tfds_dir, tfds_config="small")
         for s in ("train", "validation", "test")}
  assert {s: len(v) for s, v in src.items()} == {"train": 200, "validation": 50, "test": 50}
  prompts = {s: {v[i]["prompt"] for i in range(len(v))} for s, v in src.items()}
  assert not prompts["train"] & prompts["test"]
  assert not prompts["train"] & prompts["validation"]
  assert not prompts["test"] & prompts["validation"]
  test = src["test"]
  ex = test[0]
  assert isinstance(ex["prompt"], bytes) and ex["response"]


def test_new_task_answers_are_correct():
  """kv_recall: the answer is the value written after the queried key; add2: the sum."""
  from icarus_jax.training.tasks import generate
  for ex in generate("kv_recall", "test", 50):
    *pairs, query = ex["prompt"].split(";")
    assert query.endswith("=") and 3 <= len(pairs) <= 4
    assert dict(p.split("=") for p in pairs)[query[:-1]] == ex["response"]
  for ex in generate("add2", "test", 50):
    a, b = ex["prompt"].rstrip("=").split("+")
    assert int(a) < 100 and int(b) < 100 and int(ex["response"]) == int(a) + int(b)


def test_task_answers_are_correct(tfds_dir):
  src = examples_source("addition", "test", data_dir=tfds_dir, tfds_config="small")
  for i in range(10):
    a, b = src[i]["prompt"].decode().rstrip("=").split("+")
    assert int(src[i]["response"]) == int(a) + int(b)
  src = examples_source("sorting", "test", data_dir=tfds_dir, tfds_config="small")
  p = src[0]["prompt"].decode()
  assert src[0]["response"].decode() == "".join(sorted(p[5:-1]))


@pytest.mark.parametrize("mode", ["icarus_lora", "lora", "icarus_full", "full"])
def test_step_zero_equals_base(tiny, mode):
  cfg, params = tiny
  ad = init_trainable(cfg, params, TrainConfig(mode=mode))
  toks = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))
  base = np.asarray(forward(cfg, params, toks))
  assert np.abs(np.asarray(model_logits(cfg, params, ad, jnp.asarray(toks))) - base).max() <= 1e-6


def test_icarus_training_lowers_loss_and_never_touches_the_base(tiny, reversal_ds, tmp_path):
  cfg, params = tiny
  before = jax.tree.map(lambda x: np.array(x, copy=True), params)
  tc = TrainConfig(mode="icarus_lora", total_steps=40, batch_size=16, seq_len=32,
                   learning_rate=1e-2, warmup_steps=5)
  ad, hist = run(cfg, params, tc, reversal_ds, tmp_path, save_every=1000, log_every=5,
                 progress=False)
  assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, np.asarray(y))
  assert (tmp_path / "metrics.jsonl").exists()
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 8


def test_no_gradient_reaches_the_encoder(tiny, reversal_ds):
  """Differentiating the ICaRus loss w.r.t. the base: weights used only by the encoder (k, v)
  get exactly zero gradient; with standard LoRA they do not."""
  cfg, params = tiny
  batch = reversal_ds[0]
  for mode, zero in (("icarus_lora", True), ("lora", False)):
    ad = init_trainable(cfg, params, TrainConfig(mode=mode))
    ad = jax.tree.map(lambda x: x + 0.01, ad)  # make B non-zero
    g = jax.grad(lambda p: loss_fn(ad, cfg, p, batch)[0])(params)
    kv_grad = float(jnp.abs(g["layers"]["k"]).max() + jnp.abs(g["layers"]["v"]).max())
    assert (kv_grad == 0.0) == zero, (mode, kv_grad)


def test_optimizer_holds_only_adapter_leaves(tiny):
  cfg, params = tiny
  tc = TrainConfig(mode="icarus_lora", grad_accum=2)
  ad = init_trainable(cfg, params, tc)
  tx = make_optimizer(tc)
  state = tx.init(ad.params)
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  n_adapter = sum(x.size for x in jax.tree.leaves(ad.params))
  n_base = sum(x.size for x in jax.tree.leaves(params))
  assert n_state <= 4 * n_adapter < n_base  # adam mu/nu (+ accumulation), no base copy
  batch = {"inputs": jnp.zeros((2, 8), jnp.int32), "targets": jnp.ones((2, 8), jnp.int32),
           "mask": jnp.ones((2, 8))}
  ad2, state, m = train_step(cfg, ad, state, params, batch, tx=tx)
  assert np.isfinite(float(m["loss"]))


@pytest.mark.parametrize("mode", ["icarus_lora", "full"])
def test_resume_reaches_same_parameters(tiny, reversal_ds, tmp_path, mode):
  cfg, params = tiny
  tc = TrainConfig(mode=mode, total_steps=6, batch_size=16, seq_len=32, warmup_steps=2,
                   grad_accum=2 if mode == "full" else 1)
  straight, _ = run(cfg, params, tc, reversal_ds, tmp_path / "a", save_every=100, log_every=1,
                    progress=False)
  run(cfg, params, tc, reversal_ds, tmp_path / "b", save_every=100, log_every=1, progress=False,
      stop_after=3)  # "killed" after step 3 (checkpoint saved)
  resumed, hist = run(cfg, params, tc, reversal_ds, tmp_path / "b", save_every=100, log_every=1,
                      progress=False)
  assert param_diff(straight.params, resumed.params) == 0.0
  assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]


def test_bad_data_errors(tmp_path, tfds_dir):
  with pytest.raises(IcarusError, match="empty response"):
    encode_example(TOK, {"prompt": "2+2=", "response": ""}, 64)
  with pytest.raises(IcarusError, match="more than max_len=8"):
    encode_example(TOK, {"prompt": "a very long prompt", "response": "x"}, 8)
  with pytest.raises(IcarusError, match="unknown task 'poetry'"):
    examples_source("poetry", "train", data_dir=tfds_dir)
  f = tmp_path / "d.jsonl"
  f.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
  with pytest.raises(IcarusError, match=r"d.jsonl:2: expected keys"):
    load_jsonl(f)
  f.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
  with pytest.raises(IcarusError, match=r"d.jsonl:2: malformed JSON"):
    load_jsonl(f)
  src = [{"prompt": "ok", "response": "fine"}, {"prompt": "x" * 100, "response": "y"}]
  with pytest.raises(IcarusError, match="more than max_len"):
    make_dataset(src, TOK, batch_size=2, seq_len=32, seed=0)


def test_jsonl_chat_and_plain(tmp_path):
  f = tmp_path / "c.jsonl"
  f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "hello"}]}) + "\n"
               + json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
  exs = load_jsonl(f)
  assert exs[0]["messages"][1] == {"role": "assistant", "content": "hello"}  # kept as a chat
  assert exs[1]["response"] == "2"
  ds = make_dataset(exs, TOK, batch_size=2, seq_len=32, seed=0)
  b = ds[0]
  assert b["inputs"].shape == (2, 32) and b["mask"].sum() == len("hello") + 1 + len("2") + 1


@pytest.mark.parametrize("target", ["k", "v", "q"])
def test_lora_gradient_matches_finite_differences(tiny, target):
  """The conventional-LoRA gradient through the K/V path is the true derivative of the loss (a
  central finite difference in float64-free float32, on random entries of ``a`` and ``b``): the
  slow k/v training of docs/results/kv_lora_anomaly.md is an optimisation effect, not a broken
  gradient."""
  from icarus_jax.model.adapters import Adapter, init_adapter
  cfg, base = tiny
  ad = init_adapter(cfg, jax.random.key(5), kind="lora", targets=("q", "k", "v", "o"), rank=4,
                    alpha=8, base_params=base, b_std=0.05)
  rs = np.random.RandomState(0)
  toks = rs.randint(0, cfg.vocab_size, (2, 13)).astype(np.int32)
  batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
           "mask": jnp.ones((2, 12), jnp.float32)}
  loss = lambda a: loss_fn(a, cfg, base, batch)[0]
  grads = jax.grad(loss)(ad).params["layers"][target]
  for factor in ("a", "b"):
    x = np.asarray(ad.params["layers"][target][factor])
    for _ in range(3):
      idx = tuple(rs.randint(0, n) for n in x.shape)
      eps = 1e-2
      vals = []
      for sgn in (1, -1):
        y = x.copy()
        y[idx] += sgn * eps
        p = {**ad.params, "layers": {**ad.params["layers"],
                                     target: {**ad.params["layers"][target], factor: jnp.asarray(y)}}}
        vals.append(float(loss(Adapter(p, ad.config))))
      fd = (vals[0] - vals[1]) / (2 * eps)
      g = float(grads[factor][idx])
      assert abs(fd - g) <= 2e-3 + 2e-2 * abs(g), (target, factor, idx, fd, g)


def test_lora_matched_trains_exactly_icarus_targets_in_one_stream(tiny):
  """The matched control differs from ICaRus-LoRA only in the frozen encoder: same trainable
  leaves, but a single stream (its K/V move with the adapter)."""
  from icarus_jax.training.finetune import method_config
  cfg, base = tiny
  (m_mode, m_targets), (i_mode, i_targets) = method_config("lora_matched"), method_config(
      "icarus_lora")
  assert m_targets == i_targets and "k" not in m_targets and "v" not in m_targets
  assert (m_mode, i_mode) == ("lora", "icarus_lora")
  mk = lambda mode, t: init_trainable(cfg, base, TrainConfig(mode=mode, targets=t, rank=4))
  matched, icarus = mk(m_mode, m_targets), mk(i_mode, i_targets)
  shapes = lambda a: jax.tree.map(lambda x: x.shape, a.params)
  assert shapes(matched) == shapes(icarus)
  assert not matched.config.is_icarus and icarus.config.is_icarus
  assert set(method_config("lora")[1]) == set(m_targets) | {"k", "v"}
  with pytest.raises(IcarusError, match="unknown method 'lora_kv'; accepted"):
    method_config("lora_kv")
