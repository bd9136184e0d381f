"""Sharded serving and training steps on 8 forced CPU devices, and a 2-process distributed run.

Both run in subprocesses because XLA_FLAGS must be set before jax starts.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


def _result(stdout: str) -> dict:
  lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, stdout[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_sharded_steps_equal_unsharded_on_every_mesh():
  """One subprocess (8 forced devices; ~5 minutes on 2 cores) checks every mesh: one test, so
  that pytest-xdist never runs it twice on two workers."""
  p = subprocess.run([sys.executable, str(HERE / "sharding_check.py")], capture_output=True,
                     text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
  assert p.returncode == 0, p.stderr[-3000:]
  sharded = _result(p.stdout)
  assert sharded["devices"] == 8
  for spec in ("data:1,model:8", "data:2,model:4", "data:8,model:1"):
    _check_mesh(sharded[spec], spec)
  assert "needs 16 devices, but only 8 are visible" in sharded["too_large_error"]
  assert "num_kv_heads=2 is not divisible by the mesh's model axis (4)" in sharded["kv_heads_error"]


def _check_mesh(r: dict, spec: str) -> None:
  assert r["tokens_equal"]                       # greedy engine outputs identical
  assert r["step_logits_max_diff"] <= 1e-5       # one fused prefill step, logits
  # the engine's step (StepBatch, jitted with explicit in/out shardings), both backends
  assert r["runner_logits_max_diff"]["reference"] <= 1e-5
  assert r["runner_logits_max_diff"]["pallas"] <= 1e-5
  assert r["sharded_step_programs"] > 0          # the mesh-jitted step served generate()
  assert r["train_params_max_diff"] <= 1e-5 and r["train_loss_diff"] <= 1e-5
  assert r["pages_devices"] == 8
  # K/V written in place under sharding too: no pool-shaped copy or all-gather, temporaries flat
  # when the pool grows 64x (observed growth: 0 bytes).
  assert r["pool_copies"] == 0
  assert abs(r["pool_temp_growth_bytes"]) < 0.01 * r["large_pool_bytes"]
  # The Pallas backend: shard_map over KV heads when the model axis is > 1, same tokens as the
  # unsharded Pallas engine, and in place as well (no pool gathered to one device).
  assert r["pallas_tokens_equal"]
  assert r["pallas"]["pool_copies"] == 0
  assert abs(r["pallas"]["pool_temp_growth_bytes"]) < 0.01 * r["large_pool_bytes"]
  # attention inside shard_map on every mesh: an 8-row bucket's rows over data (when data > 1),
  # heads over model (when model > 1)
  assert r["sharded_attention_axes"] == [None if spec.startswith("data:1,") else "data",
                                         None if spec.endswith("model:1") else "model"]
  if spec != "data:8,model:1":                   # really sharded over the model axis
    assert not r["q_weight_replicated"]
    assert "model" in r["q_weight_sharding"] and "model" in r["pages_sharding"]
    assert "model" in r["pool_sharding"]


def test_mesh_spec_parsing():
  from icarus_jax import IcarusError
  from icarus_jax.model.sharding import load_rules, parse_mesh_spec
  assert parse_mesh_spec("data:2,model:4") == {"data": 2, "model": 4}
  assert parse_mesh_spec("model:8") == {"data": 1, "model": 8}
  with pytest.raises(IcarusError, match="bad mesh spec"):
    parse_mesh_spec("tensor:2")
  assert load_rules()["kv_heads"] == "model"


def test_two_processes_join_one_runtime(tiny):
  """Two processes (2 CPU devices each) on loopback run one model-sharded forward together;
  both get the single-process result."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
  procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_check.py"), str(i), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  res = [_result(o) for o, _ in outs]
  assert {r["process_id"] for r in res} == {0, 1}
  assert all(r["process_count"] == 2 and r["global_devices"] == 4 and r["local_devices"] == 2
             for r in res)
  assert res[0]["checksum"] == res[1]["checksum"]
  import jax
  from icarus_jax import forward, init_base_params, tiny_config
  cfg = tiny_config(num_heads=4, num_kv_heads=4, head_dim=16, mlp_dim=128)
  base = init_base_params(cfg, jax.random.key(0), scale=0.1)
  toks = np.arange(24, dtype=np.int32).reshape(2, 12) % cfg.vocab_size
  ref = np.asarray(forward(cfg, base, toks))
  assert np.allclose(res[0]["first"], ref[0, 0, :3], atol=1e-5)
  total = float(np.abs(ref).sum())
  # float32 sums of ~6.5k logits in two orders: observed |diff| 4.9e-4 on a sum of ~4e3, i.e.
  # one ulp (1.2e-7 relative); 1e-6 relative allows a few ulps, not a wrong logit.
  assert abs(res[0]["checksum"] - total) <= 1e-6 * total
