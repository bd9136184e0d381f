"""launch.pretrain resumes: killed after a checkpoint and rerun, it ends with exactly the
parameters of an uninterrupted run (batch i is a function of (seed, i); params, optimizer state
and step are checkpointed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pretrain_resume_equals_uninterrupted(tmp_path):
  text = tmp_path / "texts"
  text.mkdir()
  (text / "play_gut.txt").write_text("To be, or not to be, that is the question.\n" * 200)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def run(name, *extra):
    args = [sys.executable, "-m", "launch.pretrain", "--preset=tiny", "--steps=6",
            "--batch_size=4", "--seq_len=32", "--save_every=2", f"--shakespeare={text}",
            f"--out={tmp_path / name / 'base'}", f"--workdir={tmp_path / name / 'work'}", *extra]
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout

  run("straight")
  out = run("resumed", "--stop_after=3")
  assert "stopped at step 3" in out and not (tmp_path / "resumed" / "base").exists()
  assert "resumed from step 3" in run("resumed")
  from safetensors.numpy import load_file
  a = load_file(str(tmp_path / "straight" / "base" / "model.safetensors"))
  b = load_file(str(tmp_path / "resumed" / "base" / "model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  steps = [json.loads(l)["step"] for l in
           (tmp_path / "resumed" / "work" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [3, 6]
