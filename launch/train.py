"""Fine-tunes an adapter: ICaRus (frozen encoder, trained decoder) or a conventional baseline.

    python -m launch.train --mode=icarus_lora --task=addition --workdir=runs/add_icarus
    python -m launch.train --mode=lora --task=data.jsonl --base=/path/to/hf_model --steps=1000

Resumable: rerun the same command after an interruption and it continues from the last
checkpoint in ``--workdir``. Writes ``metrics.jsonl``, ``loss.png`` and the adapter
(``adapter/``: PEFT layout for LoRA kinds) in the workdir.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "icarus_lora", ["icarus_lora", "icarus_full", "lora", "full"],
                  "What to train.")
flags.DEFINE_string("task", "addition", "Task name (addition, sorting, reversal, kv_lookup) or a "
                    ".jsonl file of {prompt, response} / {messages}.")
flags.DEFINE_string("base", None, "Base: HF directory or icarus-jax base checkpoint "
                    "(default: the embedded small base).")
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
flags.DEFINE_float("lr", 3e-3, "Peak learning rate (LoRA); full modes use lr/10 by default.")
flags.DEFINE_integer("warmup", 20, "Warmup steps.")
flags.DEFINE_integer("seed", 0, "PRNG seed (init and data order).")
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, adapter).")
flags.DEFINE_integer("save_every", 100, "Checkpoint period in steps.")
flags.DEFINE_string("tfds_dir", "~/tensorflow_datasets", "TFDS data_dir for the task builders.")
flags.DEFINE_string("tfds_config", "default", "Task builder config (default or small).")
flags.DEFINE_integer("eval_examples", 0, "Exact-match eval on this many test examples at the end.")

TASK_SEQ_LEN = {"addition": 32, "sorting": 32, "reversal": 32, "kv_lookup": 128}


def train_one(*, mode, task, base_path=None, rank=8, alpha=16.0, targets=None, steps=300,
              batch_size=32, grad_accum=1, seq_len=0, lr=3e-3, warmup=20, seed=0, workdir,
              save_every=100, tfds_dir=None, tfds_config="default", eval_examples=0,
              progress=True, stop_after=None, base=None):
  """Library entry point of this script (used by the accuracy-table driver and tests)."""
  from icarus_jax.assets import load_any_base
  from icarus_jax.data import examples_source, make_dataset
  from icarus_jax.peft_io import save_adapter
  from icarus_jax.tokenizer import ByteTokenizer
  from icarus_jax.trainer import plot_losses, run
  from icarus_jax.training import TrainConfig

  t0 = time.time()
  cfg, params = base if base is not None else load_any_base(base_path)
  tok = ByteTokenizer()
  seq_len = seq_len or TASK_SEQ_LEN.get(task, 256)
  tc = TrainConfig(mode=mode, rank=rank, alpha=alpha, targets=tuple(targets) if targets else None,
                   learning_rate=lr, warmup_steps=warmup, total_steps=steps, batch_size=batch_size,
                   grad_accum=grad_accum, seq_len=seq_len, seed=seed)
  src = examples_source(task, "train", data_dir=tfds_dir, tfds_config=tfds_config)
  ds = make_dataset(src, tok, batch_size=batch_size, seq_len=seq_len, seed=seed)
  name = f"{Path(task).stem}-{mode}"
  adapter, hist = run(cfg, params, tc, ds, workdir, name=name, save_every=save_every,
                      progress=progress, stop_after=stop_after)
  out = {"mode": mode, "task": task, "steps": steps, "seed": seed, "final_loss": hist[-1]["loss"],
         "train_wall_s": round(time.time() - t0, 1)}
  if stop_after is None or stop_after >= steps:
    save_adapter(adapter, Path(workdir) / "adapter")
    plot_losses({mode: hist}, Path(workdir) / "loss.png", title=f"{task} {mode}")
  if eval_examples:
    from icarus_jax.data import eval_prompts
    from icarus_jax.generation import exact_match_accuracy
    test = examples_source(task, "test", data_dir=tfds_dir, tfds_config=tfds_config)
    prompts, answers = eval_prompts(test, tok, eval_examples)
    out["accuracy"], _ = exact_match_accuracy(cfg, params, adapter, prompts, answers, tok)
    out["eval_examples"] = len(prompts)
  return adapter, hist, out


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  kw = {}
  if FLAGS.config:
    kw.update(json.loads(Path(FLAGS.config).read_text()))
  for name in ("mode", "task", "rank", "alpha", "targets", "steps", "batch_size", "grad_accum",
               "seq_len", "lr", "warmup", "seed", "save_every", "tfds_config", "eval_examples"):
    if FLAGS[name].present or name not in kw:
      kw[name] = FLAGS[name].value
  workdir = FLAGS.workdir or f"runs/{Path(kw['task']).stem}_{kw['mode']}_s{kw['seed']}"
  _, _, out = train_one(base_path=FLAGS.base, workdir=workdir,
                        tfds_dir=os.path.expanduser(FLAGS.tfds_dir), **kw)
  print(json.dumps(out, indent=2))
  (Path(workdir) / "result.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
