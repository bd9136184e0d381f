"""How much of ``next_word`` the base already knows: greedy raw continuation, no fine-tuning.

    python -m benchmarks.next_word_base --bases=small_base,small_base_long \
        --out=docs/results/next_word_base.json

For each validation prompt of the ``next_word`` task (a speech's context and a space) the base
continues the raw text greedily (14 bytes, no chat template, no format to learn); the first
word of the continuation is compared with the answer, ignoring case. This is the knowledge the
task's format hides: the fine-tuned methods have to bring it out in capitals.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("bases", ["small_base", "small_base_long"], "Base specs.")
flags.DEFINE_integer("examples", 200, "Validation prompts.")
flags.DEFINE_integer("new_bytes", 14, "Greedy continuation length.")
flags.DEFINE_string("out", "docs/results/next_word_base.json", "JSON output.")

_FIRST_WORD = re.compile(r"[\s'\"(\[-]*([A-Za-z][A-Za-z']*)")


def raw_accuracy(base_spec: str, examples: list[dict]) -> float:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from icarus_jax.checkpoints.assets import load_any_base, load_base_tokenizer
  from icarus_jax.model.transformer import forward
  cfg, base = load_any_base(base_spec)
  tok, _ = load_base_tokenizer(base_spec)
  width = 64
  f = jax.jit(lambda t: forward(cfg, base, t))
  hits = 0
  for ex in examples:
    ids = list(tok.encode(ex["prompt"].rstrip() + " "))
    out = []
    for _ in range(FLAGS.new_bytes):  # fixed width: one compiled program
      arr = np.zeros((1, width), np.int32)
      arr[0, :len(ids)] = ids
      nxt = int(jnp.argmax(f(jnp.asarray(arr))[0, len(ids) - 1]))
      ids.append(nxt)
      out.append(nxt)
    m = _FIRST_WORD.match(tok.decode(out))
    hits += bool(m) and m.group(1).upper() == ex["response"].upper()
  return hits / len(examples)


def main(argv):
  del argv
  from icarus_jax.training import tasks
  examples = list(tasks.generate("next_word", "validation", FLAGS.examples))
  res = {b: raw_accuracy(b, examples) for b in FLAGS.bases}
  out = {"command": "python -m benchmarks.next_word_base " + " ".join(sys.argv[1:]),
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "examples": len(examples), "split": "validation", "raw_greedy_accuracy": res}
  Path(FLAGS.out).write_text(json.dumps(out, indent=1) + "\n")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  app.run(main)
