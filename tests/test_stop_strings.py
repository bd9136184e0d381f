"""Stop strings and incremental detokenization, without HTTP.

Oracle: ``tokenizer.decode`` of the whole token list and ``str.find`` on it (the text a
non-streaming client must get), for a byte-level tokenizer (every non-ASCII character spans
2-4 tokens) and a byte-level BPE trained here (multi-character tokens).
"""

import pytest

from icarus_jax.serving.stop_strings import StopStringMatcher
from icarus_jax.model.tokenizer import ByteTokenizer, HFTokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog",
         "caf\u00e9 \u4e2d\u6587 na\u00efve \U0001F600 end",
         "to be or not to be, that is the question",
         "\u00e9\u00e9\u00e9 stop\u00e9 here \u4e2dEND\u4e2d tail"]


@pytest.fixture(scope="module", params=["bytes", "bpe"])
def tok(request, tmp_path_factory):
  if request.param == "bytes":
    return ByteTokenizer()
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  d = tmp_path_factory.mktemp("bpe")
  (d / "c.txt").write_text("\n".join(TEXTS * 40))
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train([str(d / "c.txt")], trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  t.save(str(d / "tokenizer.json"))
  return HFTokenizer(d)


def run(tok, ids, stops):
  m = StopStringMatcher(tok, stops)
  pieces = []
  for t in ids:
    pieces.append(m.add(t))
    if m.stopped:
      break
  pieces.append(m.finish())
  return m, pieces


@pytest.mark.parametrize("text", TEXTS)
def test_without_stops_the_stream_is_the_decoded_text(tok, text):
  ids = tok.encode(text)
  m, pieces = run(tok, ids, [])
  assert "".join(pieces) == m.text == tok.decode(ids) == text
  assert all("\ufffd" not in p for p in pieces)  # never half a character
  assert not m.stopped


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stops", [["o"], ["he q", "zzz"], ["\u00e9 "], ["\u4e2dEND"],
                                   ["e", "th"], ["not in the text"], ["d"]])
def test_stream_stops_right_before_the_earliest_stop(tok, text, stops):
  ids = tok.encode(text)
  m, pieces = run(tok, ids, stops)
  hits = [text.find(s) for s in stops if text.find(s) >= 0]
  want = text[:min(hits)] if hits else text
  assert "".join(pieces) == m.text == want
  assert m.stopped == bool(hits)
  for i, p in enumerate(pieces):  # nothing emitted could still be the start of a stop string
    emitted = "".join(pieces[:i + 1])
    assert not any(s in emitted for s in stops)


def test_held_back_prefix_is_released_at_the_end():
  tok = ByteTokenizer()
  ids = tok.encode("abc EN")
  m = StopStringMatcher(tok, ["END"])
  out = "".join(m.add(t) for t in ids)
  assert out == "abc " and m.finish() == "EN" and m.text == "abc EN" and not m.stopped
  with pytest.raises(ValueError, match="non-empty"):
    StopStringMatcher(tok, [""])


def test_invalid_utf8_at_the_end_is_decoded_with_replacement():
  tok = ByteTokenizer()
  ids = tok.encode("ok ") + [0xE4, 0xB8]  # a truncated 3-byte character
  m, pieces = run(tok, ids, [])
  assert pieces[:-1] and "".join(pieces[:-1]) == "ok "
  assert m.text == tok.decode(ids) and m.text.endswith("\ufffd")


def test_cost_per_token_does_not_grow_with_the_output():
  """The matcher decodes a bounded window per token (the old server re-decoded the whole output
  for every token: 2,000 tokens cost ~2M decoded tokens)."""
  class Counting(ByteTokenizer):
    decoded = 0

    def decode(self, ids):
      Counting.decoded += len(ids)
      return super().decode(ids)

  tok = Counting()
  ids = tok.encode("all work and no play makes jack a dull boy. " * 45)  # ~2,000 tokens
  m, _ = run(tok, ids, ["never appears"])
  assert m.text == ByteTokenizer().decode(ids)
  assert Counting.decoded <= 4 * len(ids), Counting.decoded


def test_earliest_stop_wins_when_several_match_in_one_piece_and_nothing_after_a_stop():
  tok = ByteTokenizer()
  m = StopStringMatcher(tok, ["ab", "b"])  # "ab" completes at 0 while "b" matches at 1
  out = "".join(m.add(t) for t in tok.encode("xab"))
  assert out == m.text == "x" and m.stopped
  assert m.add(tok.encode("z")[0]) == "" and m.finish() == "" and m.text == "x"
  assert m.tokens == tok.encode("xab")  # nothing is taken after the stop
