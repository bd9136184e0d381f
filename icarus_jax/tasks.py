"""Synthetic tasks generated locally: prompt/response pairs with exact-match answers.

Every task is a deterministic function of ``(seed, index)``, so splits are reproducible without
downloads. Tasks:

* ``addition``:  ``"417+86="`` -> ``"503"`` (operands 0..999)
* ``sorting``:   ``"sort qdax:"`` -> ``"adqx"`` (4..8 distinct lowercase letters)
* ``reversal``:  ``"rev hello:"`` -> ``"olleh"`` (4..8 lowercase letters)
* ``kv_lookup``: ``"ab=7x;q3=k1;...;q3?"`` -> ``"k1"`` (4..8 pairs of 2-character keys/values)
"""

from __future__ import annotations

import random
import string
from typing import Callable, Iterator

from icarus_jax.errors import IcarusError

Example = dict[str, str]


def _addition(rng: random.Random) -> Example:
  a, b = rng.randint(0, 999), rng.randint(0, 999)
  return {"prompt": f"{a}+{b}=", "response": str(a + b)}


def _sorting(rng: random.Random) -> Example:
  letters = rng.sample(string.ascii_lowercase, rng.randint(4, 8))
  return {"prompt": f"sort {''.join(letters)}:", "response": "".join(sorted(letters))}


def _reversal(rng: random.Random) -> Example:
  word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))
  return {"prompt": f"rev {word}:", "response": word[::-1]}


def _kv_lookup(rng: random.Random) -> Example:
  n = rng.randint(4, 8)
  alphabet = string.ascii_lowercase + string.digits
  keys: list[str] = []
  while len(keys) < n:
    k = "".join(rng.choice(alphabet) for _ in range(2))
    if k not in keys:
      keys.append(k)
  vals = ["".join(rng.choice(alphabet) for _ in range(2)) for _ in range(n)]
  q = rng.randrange(n)
  ctx = ";".join(f"{k}={v}" for k, v in zip(keys, vals))
  return {"prompt": f"{ctx};{keys[q]}?", "response": vals[q]}


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "addition": _addition,
    "sorting": _sorting,
    "reversal": _reversal,
    "kv_lookup": _kv_lookup,
}
SPLIT_SEEDS = {"train": 1, "test": 2, "validation": 3}


def check_task(task: str) -> None:
  if task not in TASKS:
    raise IcarusError(f"unknown task {task!r}; available: {sorted(TASKS)} (or a .jsonl file)")


def generate(task: str, split: str, n: int, *, exclude: set[str] | None = None) -> Iterator[Example]:
  """``n`` examples of ``task`` for ``split``; prompts in ``exclude`` are skipped."""
  check_task(task)
  if split not in SPLIT_SEEDS:
    raise IcarusError(f"unknown split {split!r}; available: {sorted(SPLIT_SEEDS)}")
  rng = random.Random(f"{task}/{split}/{SPLIT_SEEDS[split]}")
  made, tries = 0, 0
  while made < n:
    ex = TASKS[task](rng)
    tries += 1
    if tries > 100 * n + 1000:
      raise IcarusError(f"task {task!r} cannot produce {n} distinct held-out examples")
    if exclude and ex["prompt"] in exclude:
      continue
    made += 1
    yield ex
