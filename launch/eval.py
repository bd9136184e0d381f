"""Exact-match accuracy of a base or an adapter on a task's held-out split (greedy decoding).

    python -m launch.eval --task=addition --adapter=runs/addition_icarus_lora_s0/adapter

ICaRus adapters generate through the shared encoder cache (the encoder is the frozen base, the
decoder reads its K/V), never through a merged model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("task", "addition", "Task name or .jsonl file.")
flags.DEFINE_string("split", "test", "Split to evaluate.")
flags.DEFINE_string("base", None, "Base: 'smollm2', a .gguf file, an HF dir or an icarus-jax "
                    "checkpoint; default: embedded. A chat model's prompts use its chat template.")
flags.DEFINE_string("adapter", None, "Adapter directory (PEFT layout); none = the base model.")
flags.DEFINE_string("kind", None, "Override the adapter kind (e.g. lora for a foreign PEFT adapter).")
flags.DEFINE_integer("num_examples", 500, "Examples to evaluate.")
flags.DEFINE_integer("max_new_tokens", 16, "Generation budget per example.")
flags.DEFINE_string("tfds_dir", "~/tensorflow_datasets", "TFDS data_dir.")
flags.DEFINE_string("out", None, "Optional JSON output path.")
flags.DEFINE_bool("assert_base", False, "For an adapter that records no base fingerprint (a "
                  "foreign PEFT adapter): assert it was trained on --base.")


def main(argv):
  del argv
  from icarus_jax.model.adapters import check_adapter
  from icarus_jax.checkpoints.assets import load_any_base, load_base_tokenizer
  from icarus_jax.training.data import eval_prompts, examples_source
  from icarus_jax.model.generation import exact_match_accuracy
  from icarus_jax.model.params import base_fingerprint
  from icarus_jax.checkpoints.peft_io import load_adapter

  t0 = time.time()
  cfg, base = load_any_base(FLAGS.base)
  adapter = None
  if FLAGS.adapter:
    fp = base_fingerprint(cfg, base) if FLAGS.assert_base else None
    adapter = load_adapter(FLAGS.adapter, kind=FLAGS.kind, base_fingerprint=fp)
    check_adapter(cfg, base, adapter)
  tok, chat = load_base_tokenizer(FLAGS.base)
  src = examples_source(FLAGS.task, FLAGS.split, data_dir=os.path.expanduser(FLAGS.tfds_dir))
  prompts, answers = eval_prompts(src, tok, FLAGS.num_examples, chat)
  acc, texts = exact_match_accuracy(cfg, base, adapter, prompts, answers, tok,
                                    max_new_tokens=FLAGS.max_new_tokens)
  out = {"task": FLAGS.task, "split": FLAGS.split, "adapter": FLAGS.adapter,
         "kind": None if adapter is None else adapter.kind, "num_examples": len(prompts),
         "exact_match": acc, "wall_s": round(time.time() - t0, 1),
         "samples": [{"prompt": tok.decode(prompts[i]), "answer": answers[i], "output": texts[i]}
                     for i in range(min(5, len(prompts)))]}
  print(json.dumps(out, indent=2))
  if FLAGS.out:
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
