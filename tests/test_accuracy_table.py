"""launch.accuracy_table: LR selection never reads the test split, runs resume after an
interruption, and the summary is computed from the JSONL records alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Runs the table with the test split poisoned: any read of a test example raises.
DRIVER = """
import sys
import icarus_jax.training.data as data
orig = data.examples_source
class Poisoned:
    def __init__(self, src): self.src = src
    def __len__(self): return len(self.src)
    def __getitem__(self, i): raise RuntimeError("POISON: the test split was read")
def examples_source(task, split, **kw):
    src = orig(task, split, **kw)
    return Poisoned(src) if split == "test" else src
data.examples_source = examples_source
from absl import app
import launch.accuracy_table as table
sys.argv = ["accuracy_table"] + sys.argv[1:]
app.run(table.main)
"""


@pytest.mark.slow
def test_selection_never_reads_test_and_runs_resume(tmp_path):
  args = ["--tasks=reversal", "--methods=icarus_lora,lora_matched", "--lora_lrs=1e-3,3e-3",
          "--seeds=0", "--steps=4", "--log_every=2", "--val_examples=6", "--eval_examples=6",
          "--tfds_config=small", f"--out={tmp_path / 'out'}", f"--workdir={tmp_path / 'runs'}",
          "--export_adapters=", "--base=small_base", f"--tfds_dir={tmp_path / 'tfds'}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  # 1. test split poisoned: the LR sweep of the first method completes, then the first final run
  #    (the first test read) stops the process
  r = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode != 0 and "POISON: the test split was read" in r.stderr
  jsonl = tmp_path / "out" / "accuracy.jsonl"
  recs = [json.loads(l) for l in jsonl.read_text().splitlines()]
  assert [(x["phase"], x["method"], x["lr"]) for x in recs] == [
      ("sweep", "icarus_lora", 1e-3), ("sweep", "icarus_lora", 3e-3)]
  assert all(not any(k.startswith("test") for k in x) for x in recs)
  # 2. the same command, unpoisoned, resumes: the two sweep runs are not repeated
  r = subprocess.run([sys.executable, "-m", "launch.accuracy_table", *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  recs = [json.loads(l) for l in jsonl.read_text().splitlines()]
  assert len(recs) == 8 and len({(x["phase"], x["method"], x["seed"], x["lr"]) for x in recs}) == 8
  assert recs[:2] == [json.loads(l) for l in jsonl.read_text().splitlines()[:2]]
  sweeps = {m: [x for x in recs if x["phase"] == "sweep" and x["method"] == m]
            for m in ("icarus_lora", "lora_matched")}
  for m, sw in sweeps.items():  # the final runs use the LR with the best validation result
    best = max(sw, key=lambda x: (x["val_acc"], -x["val_loss"]))["lr"]
    assert {x["lr"] for x in recs if x["phase"] == "final" and x["method"] == m} == {best}
  # 3. the summary is a function of the records: rebuild it from a copy of the JSONL alone
  summary = json.loads((tmp_path / "out" / "accuracy.json").read_text())
  copy = tmp_path / "copy"
  copy.mkdir()
  (copy / "accuracy.jsonl").write_text(jsonl.read_text())
  r = subprocess.run([sys.executable, "-m", "launch.accuracy_table", "--summarize_only",
                      f"--out={copy}"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  rebuilt = json.loads((copy / "accuracy.json").read_text())
  assert rebuilt["table"] == summary["table"] and rebuilt["records"] == summary["records"]
  assert {(x["method"], x["seed"]) for x in summary["records"]} == {
      ("icarus_lora", 0), ("lora_matched", 0), ("base", 0), ("chance", 0)}
  # the majority-answer row: the most frequent train answer, scored on the test prompts
  chance = next(x for x in recs if x["method"] == "chance")
  import collections

  from icarus_jax.training import tasks
  splits = tasks.make_splits("reversal", 200, 50, 50)  # the "small" TFDS config's sizes
  counts = collections.Counter(e["response"] for e in splits["train"])
  guess = min(counts, key=lambda a: (-counts[a], a))
  assert chance["samples"] == [guess] and chance["test_n"] == 6
  assert chance["test_correct"] == sum(e["response"] == guess for e in splits["test"][:6])
  for x in summary["records"]:
    assert set(x) >= {"method", "task", "seed", "lr", "val_acc", "test_acc",
                      "final_train_loss", "steps"}


def test_wilson_interval_against_known_values():
  from icarus_jax.training.accuracy_report import wilson
  lo, hi = wilson(50, 100)
  assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
  lo, hi = wilson(0, 20)
  assert lo == 0.0 and abs(hi - 0.1611) < 1e-3
