"""The accuracy study's natural-language tasks: every answer re-derived from the prompt text by an
independent solver (regexes over the sentences, not the generator's variables), the splits
disjoint by prompt, and the answer format the one the prompt states."""

import json
import re

import pytest

from icarus_jax.training.tasks import generate, make_splits

N = 300
SIGN = {"found": 1, "gave": 1, "bought": 1, "gave away": -1, "lost": -1, "sold": -1}


def solve_word_problem(prompt: str) -> str:
  story, question = prompt.split("\n")
  who = re.match(r"(\w+) had (\d+) ", story).group(1)
  total = int(re.match(r"\w+ had (\d+) ", story).group(1))
  for sent in re.split(r"(?<=\.) ", story)[1:]:
    n = int(re.search(r"\b(\d+)\b", sent).group(1))
    if sent.startswith("A friend gave"):
      total += n
    else:
      verb = re.match(rf"{who} (gave away|found|bought|lost|sold)", sent).group(1)
      total += SIGN[verb] * n
  assert total >= 0 and who in question
  return str(total)


def solve_json_extract(prompt: str) -> dict:
  note = prompt.split("\n")[0]
  q, items = re.search(r"\b([2-9]) (\w+)s\b", note).groups()
  city = re.search(r"(?:to|Delivery to|send them to) ([A-Z][a-z]+)", note).group(1)
  not_names = {"Order", "On", "Delivery", "January", "March", "May", "July", "September",
               "November"}
  (name,) = {f"{a} {b}" for a, b in re.findall(r"\b([A-Z][a-z]+) ([A-Z][a-z]+)\b", note)
             if a not in not_names}
  return {"name": name, "item": items, "quantity": int(q), "city": city}


@pytest.mark.parametrize("task", ["word_problem", "json_extract", "word_sort"])
def test_answers_match_an_independent_solver(task):
  for ex in generate(task, "train", N):
    p, r = ex["prompt"], ex["response"]
    if task == "word_problem":
      assert r == solve_word_problem(p)
    elif task == "json_extract":
      got = json.loads(r)
      assert list(got) == ["name", "item", "quantity", "city"]
      assert got == solve_json_extract(p), p
    else:
      words = p.split(": ", 1)[1].split("\n")[0].split(", ")
      assert 4 <= len(words) <= 6 and len(set(words)) == len(words)
      assert r.split(", ") == sorted(words, key=str.lower)


@pytest.mark.parametrize("task", ["word_problem", "json_extract", "word_sort"])
def test_splits_are_disjoint_and_varied(task):
  s = make_splits(task, 400, 100, 100)
  prompts = {k: {e["prompt"] for e in v} for k, v in s.items()}
  assert not prompts["train"] & prompts["test"]
  assert not (prompts["train"] | prompts["test"]) & prompts["validation"]
  answers = [e["response"] for e in s["test"]]
  assert max(answers.count(a) for a in set(answers)) / len(answers) < 0.2  # no dominant answer
