"""Tokenizers: a byte-level one for the embedded default model, and Hugging Face ``tokenizer.json``.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eos_id``,
``bos_id``, ``pad_id``.
"""

from __future__ import annotations

import os

from icarus_jax.errors import IcarusError


class ByteTokenizer:
  """UTF-8 bytes 0..255 plus special ids from 256 (``<pad>``, ``<bos>``, ``<eos>``, ``<sep>``...).

  ``vocab_size`` is 256 + ``num_special`` (272 by default, the ``tiny`` preset's vocabulary).
  """

  SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>", "<user>", "<assistant>", "<system>", "<tool>")

  def __init__(self, num_special: int = 16):
    if num_special < len(self.SPECIALS):
      raise IcarusError(f"num_special must be >= {len(self.SPECIALS)}")
    self.vocab_size = 256 + num_special
    self.special = {name: 256 + i for i, name in enumerate(self.SPECIALS)}
    self.pad_id = self.special["<pad>"]
    self.bos_id = self.special["<bos>"]
    self.eos_id = self.special["<eos>"]
    self.sep_id = self.special["<sep>"]

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return ([self.bos_id] if add_bos else []) + ids

  def decode(self, ids) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if 0 <= i < 256:
        out.append(i)
    return out.decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face ``tokenizer.json`` (via the ``tokenizers`` library; no hub access), or any
  ``tokenizers.Tokenizer`` with explicit special ids (``from_tokenizer``, used for GGUF files).

  ``add_bos``: whether the model expects BOS in front of a prompt (``encode(add_bos=True)`` only
  adds one when this is set and a BOS id exists).
  """

  def __init__(self, path: str | os.PathLike, *, eos_token: str | None = None):
    from tokenizers import Tokenizer
    p = os.fspath(path)
    if os.path.isdir(p):
      p = os.path.join(p, "tokenizer.json")
    try:
      tok = Tokenizer.from_file(p)
    except Exception as e:
      raise IcarusError(f"cannot load tokenizer {p}: {e}") from None
    vocab = tok.get_vocab()
    def find(*names):
      for n in names:
        if n in vocab:
          return vocab[n]
      return None
    self._init(tok, eos_id=vocab.get(eos_token) if eos_token else
               find("<|endoftext|>", "</s>", "<|eot_id|>", "<|im_end|>"),
               bos_id=find("<|begin_of_text|>", "<s>"),
               pad_id=find("<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>"), add_bos=True)

  @classmethod
  def from_tokenizer(cls, tok, *, eos_id: int | None, bos_id: int | None = None,
                     pad_id: int | None = None, add_bos: bool = False) -> "HFTokenizer":
    self = cls.__new__(cls)
    self._init(tok, eos_id=eos_id, bos_id=bos_id, pad_id=pad_id, add_bos=add_bos)
    return self

  def _init(self, tok, *, eos_id, bos_id, pad_id, add_bos):
    self._tok = tok
    self.vocab_size = tok.get_vocab_size()
    self.eos_id, self.bos_id, self.pad_id, self.add_bos = eos_id, bos_id, pad_id, add_bos
    if self.pad_id is None:
      self.pad_id = eos_id

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    bos = add_bos and self.add_bos and self.bos_id is not None
    return ([self.bos_id] if bos else []) + ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  @property
  def backend(self):
    """The ``tokenizers.Tokenizer`` (e.g. for a grammar engine that reads its JSON form)."""
    return self._tok

  def token_text(self, token_id: int) -> str:
    """The vocabulary string of one id (e.g. ``"<|im_end|>"``)."""
    return self._tok.id_to_token(int(token_id))
