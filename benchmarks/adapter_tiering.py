r"""Hundreds of adapters over a few device slots: swap-ins, their cost, and throughput.

  python -m benchmarks.adapter_tiering --out docs/results/adapter_tiering.json

Registers ``--adapters`` (256) LoRA adapters on one base and serves a Zipf-distributed request
mix (``--zipf`` exponent over adapter ranks, ``--requests`` requests, short prompts and outputs,
greedy) twice with the same requests (each timed on its second pass, after a first pass that
compiled every bucket shape): with ``--slots`` (16) device slots, adapters swapped in
from host memory on admission (LRU over idle slots); the same with adapters registered by path
and ``--host`` (32) host copies (the disk tier: an adapter the host tier dropped is read from
disk again); and with every adapter resident. Reports
swap-ins (loads, evictions), the time of one slot write (host -> device, in place; median of
timed writes, ``block_until_ready``), requests/s and output tokens/s of both runs, and checks
that both runs produced the same tokens. JSON with command, seed, machine and date.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from icarus_jax import init_adapter, init_base_params, tiny_config
from icarus_jax.serving.engine import Engine
from icarus_jax.checkpoints.peft_io import load_adapter, save_adapter
from icarus_jax.serving.sampling import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs/results/adapter_tiering.json", "JSON output")
flags.DEFINE_integer("adapters", 256, "registered adapters")
flags.DEFINE_integer("slots", 16, "device slots (max_adapters) in the tiered run")
flags.DEFINE_integer("requests", 512, "requests in the mix")
flags.DEFINE_float("zipf", 1.0, "Zipf exponent over adapter ranks")
flags.DEFINE_integer("max_tokens", 8, "output tokens per request")
flags.DEFINE_integer("max_batch", 16, "engine batch")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_integer("host", 32, "host-memory copies in the disk-tier run")


def run(cfg, base, adapters, slots, prompts, names, disk_root=None):
  """Serves the mix twice; ``disk_root``: adapters registered by path with ``--host`` host
  copies (the disk tier) instead of from memory."""
  eng = Engine(cfg, base, num_pages=512, page_size=16, max_batch=FLAGS.max_batch,
               prefill_chunk=32, max_adapters=slots, max_rank=8,
               max_host_adapters=FLAGS.host if disk_root else None)
  for a in adapters:
    if disk_root:
      eng.register_adapter(disk_root / a.name)
    else:
      eng.add_adapter(a)
  # A first pass over the whole mix compiles every bucket shape it meets (and warms the
  # host tier); the second, timed pass is what is reported.
  eng.generate(prompts, names, SamplingParams(max_tokens=FLAGS.max_tokens))
  before = eng.snapshot()
  t0 = time.perf_counter()
  outs = eng.generate(prompts, names, SamplingParams(max_tokens=FLAGS.max_tokens))
  dt = time.perf_counter() - t0
  after = eng.snapshot()
  toks = sum(len(o.output_tokens) for o in outs)
  return eng, [o.output_tokens for o in outs], {
      "slots": slots, "seconds": dt, "requests_per_s": len(outs) / dt,
      "output_tokens_per_s": toks / dt,
      "adapter_loads": after["adapter_loads"] - before["adapter_loads"],
      "adapter_evictions": after["adapter_evictions"] - before["adapter_evictions"],
      "adapter_disk_reads": after["adapter_disk_reads"] - before["adapter_disk_reads"],
      "engine_steps": after["steps"] - before["steps"]}


def slot_write_seconds(eng, names, n=40):
  """Median time of one eviction + swap-in (two in-place slot writes), synchronised."""
  pool = eng.runner.pool
  times = []
  for i in range(n):
    victim = next(iter(pool.slots))
    name = next(x for x in names[i % len(names):] + names if x not in pool.slots)
    t0 = time.perf_counter()
    pool.remove(victim)
    pool.add(name, eng.adapters[name])
    jax.block_until_ready(pool.weights)
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  cfg = tiny_config()
  base = init_base_params(cfg, jax.random.key(FLAGS.seed), scale=0.1)
  adapters = [init_adapter(cfg, jax.random.key(1000 + i), name=f"a{i:03d}", base_params=base,
                           rank=8, b_std=0.05) for i in range(FLAGS.adapters)]
  rng = np.random.RandomState(FLAGS.seed)
  ranks = np.arange(1, FLAGS.adapters + 1, dtype=np.float64)
  p = ranks ** -FLAGS.zipf
  p /= p.sum()
  names = [f"a{i:03d}" for i in rng.choice(FLAGS.adapters, FLAGS.requests, p=p)]
  prompts = [list(rng.randint(0, 256, rng.randint(8, 25))) for _ in range(FLAGS.requests)]
  tiered_eng, tiered_toks, tiered = run(cfg, base, adapters, FLAGS.slots, prompts, names)
  _, full_toks, full = run(cfg, base, adapters, FLAGS.adapters, prompts, names)
  with tempfile.TemporaryDirectory() as d:
    root = Path(d)
    for a in adapters:
      save_adapter(a, root / a.name)
    disk_eng, disk_toks, disk = run(cfg, base, adapters, FLAGS.slots, prompts, names, root)
    reads = []
    for name in [a.name for a in adapters[:40]]:  # one disk read + check, as on a host miss
      t0 = time.perf_counter()
      disk_eng.runner.prepare_adapter(name, load_adapter(root / name, kind="icarus_lora", name=name))
      reads.append(time.perf_counter() - t0)
  swap = slot_write_seconds(tiered_eng, [a.name for a in adapters])
  slot_bytes = tiered_eng.runner.pool.nbytes() // (FLAGS.slots + 1)
  out = {
      "command": "python -m benchmarks.adapter_tiering " + " ".join(sys.argv[1:]),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                  "device": str(jax.devices()[0].device_kind)},
      "seed": FLAGS.seed, "model": cfg.name, "registered_adapters": FLAGS.adapters,
      "distinct_adapters_requested": len(set(names)), "requests": FLAGS.requests,
      "zipf": FLAGS.zipf, "bytes_per_slot": int(slot_bytes),
      "tiered": tiered, "all_resident": full, "disk_tier": {**disk, "host_copies": FLAGS.host},
      "disk_read_seconds_median": statistics.median(reads),
      "throughput_ratio_disk_over_resident": disk["requests_per_s"] / full["requests_per_s"],
      "disk_same_tokens": disk_toks == full_toks,
      "swap_in_seconds_median": swap,
      "throughput_ratio_tiered_over_resident": tiered["requests_per_s"] / full["requests_per_s"],
      "same_tokens": tiered_toks == full_toks}
  Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
  Path(FLAGS.out).write_text(json.dumps(out, indent=1))
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
