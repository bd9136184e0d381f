r"""Head-of-line blocking: do running requests stall while a long prompt is prefilled?

  python -m benchmarks.head_of_line --out docs/results/head_of_line.json

Through the public ``Engine`` API at default settings (``prefill_chunk`` 64, page size 16), on
the tiny model (context raised to 4,096): ``--running`` requests decode; once each has produced
``--warm_tokens`` tokens a ``--long``-token prompt arrives. Reported: the running requests'
median gap between two tokens before it arrived, their worst gap while it was prefilled (from its
arrival to its first token), the ratio, and the long prompt's TTFT. Every program is compiled
before anything is timed (``Engine.warm_up``). Median of ``--repeats`` runs of each number.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from icarus_jax import init_base_params, tiny_config
from icarus_jax.serving.engine import Engine
from icarus_jax.serving.sampling import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs/results/head_of_line.json", "JSON output")
flags.DEFINE_integer("running", 4, "requests decoding when the long prompt arrives")
flags.DEFINE_integer("long", 3000, "tokens of the arriving prompt")
flags.DEFINE_integer("warm_tokens", 20, "tokens each running request has made before it arrives")
flags.DEFINE_integer("repeats", 3, "runs (the median of each number is reported)")
flags.DEFINE_string("mode", "icarus", "engine mode")
flags.DEFINE_bool("mixed_steps", False, "decode rows ride the prefill call (one call per step)")
flags.DEFINE_integer("max_num_batched_tokens", None, "the engine's per-step token budget "
                     "(default: the engine's default, max_batch * prefill_chunk)")


def one_run(eng: Engine, rng) -> dict:
  rids = [eng.submit(list(rng.randint(0, 256, 32)), None, SamplingParams(max_tokens=4000))
          for _ in range(FLAGS.running)]
  while min(len(eng.outputs[r].output_tokens) for r in rids) < FLAGS.warm_tokens:
    eng.step()
  arrive = eng.clock()
  long_rid = eng.submit(list(rng.randint(0, 256, FLAGS.long)), None, SamplingParams(max_tokens=1))
  while eng.outputs[long_rid].first_token_time is None:
    eng.step()
  first = eng.outputs[long_rid].first_token_time
  for _ in range(5):
    eng.step()
  before, during = [], []
  for r in rids:
    t = eng.outputs[r].token_times
    for a, b in zip(t, t[1:]):
      if b <= arrive:
        before.append(b - a)
      elif a < first + 1e-9 and b > arrive:
        during.append(b - a)
  for r in rids:
    eng.abort(r)
  eng.flush_cache()
  med = statistics.median(before)
  return {"median_gap_s": med, "worst_gap_during_prefill_s": max(during),
          "ratio": max(during) / med, "long_ttft_s": first - arrive}


def main(argv):
  del argv
  cfg = tiny_config(max_seq_len=4096)
  params = init_base_params(cfg, jax.random.key(0), scale=0.1)
  eng = Engine(cfg, params, mode=FLAGS.mode, num_pages=512,
               max_num_batched_tokens=FLAGS.max_num_batched_tokens,
               mixed_steps=FLAGS.mixed_steps)
  shapes = eng.warm_up(max_context=FLAGS.long + 64)
  rng = np.random.RandomState(0)
  runs = [one_run(eng, rng) for _ in range(FLAGS.repeats)]
  out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
  out.update(runs=runs, warm_up_shapes=shapes, engine=dict(eng.engine_config.__dict__),
             command="python -m benchmarks.head_of_line " + " ".join(sys.argv[1:]),
             date=datetime.date.today().isoformat(), machine=platform.platform(), seed=0)
  Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
  Path(FLAGS.out).write_text(json.dumps(out, indent=1))
  print(json.dumps({k: out[k] for k in ("median_gap_s", "worst_gap_during_prefill_s", "ratio",
                                         "long_ttft_s")}))


if __name__ == "__main__":
  app.run(main)
