"""Tokenizers: byte-level default and Hugging Face tokenizer.json (built locally, no hub)."""

import pytest

from icarus_jax import IcarusError
from icarus_jax.model.tokenizer import ByteTokenizer, HFTokenizer


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  assert tok.vocab_size == 272
  ids = tok.encode("héllo, wörld", add_bos=True)
  assert ids[0] == tok.bos_id and all(0 <= i < 256 for i in ids[1:])
  assert tok.decode(ids + [tok.eos_id]) == "héllo, wörld"


def test_hf_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  corpus = tmp_path / "c.txt"
  corpus.write_text("to be or not to be, that is the question\n" * 50)
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False))
  t.save(str(tmp_path / "tokenizer.json"))
  tok = HFTokenizer(tmp_path)
  assert tok.eos_id == 0 and tok.vocab_size <= 300
  ids = tok.encode("that is the question")
  assert tok.decode(ids) == "that is the question"
  with pytest.raises(IcarusError, match="cannot load tokenizer"):
    HFTokenizer(tmp_path / "missing.json")
