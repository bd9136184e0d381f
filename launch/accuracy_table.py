"""Reproduces the paper's accuracy claim at our scale: base, standard LoRA, full fine-tuning,
ICaRus-LoRA and ICaRus-full on every task, exact match on the held-out test split.

    python -m launch.accuracy_table --out=docs/results

Writes ``accuracy.json``, ``accuracy.md`` and ``accuracy_loss_<task>.png`` under ``--out`` and
exports the trained LoRA adapters (PEFT layout) to ``--export_adapters``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", ["addition", "sorting", "reversal", "kv_lookup"], "Tasks.")
flags.DEFINE_list("modes", ["lora", "full", "icarus_lora", "icarus_full"], "Methods.")
flags.DEFINE_integer("steps", 400, "Steps per run (short tasks).")
flags.DEFINE_integer("long_steps", 300, "Steps per run for kv_lookup (longer sequences).")
flags.DEFINE_integer("rank", 16, "LoRA rank.")
flags.DEFINE_float("lora_lr", 3e-3, "Peak LR for LoRA modes.")
flags.DEFINE_float("full_lr", 1e-3, "Peak LR for full modes.")
flags.DEFINE_integer("eval_examples", 500, "Held-out examples per task.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_list("extra_seeds", [], "Extra seeds to train (adapters only, no eval): gives more "
                  "distinct adapters for the workflow benchmark.")
flags.DEFINE_string("out", "docs/results", "Where the table goes.")
flags.DEFINE_string("workdir", "runs/accuracy", "Run directories.")
flags.DEFINE_string("export_adapters", "icarus_jax/assets/adapters", "Where trained LoRA "
                    "adapters are copied ('' to skip).")
flags.DEFINE_string("tfds_dir", "~/tensorflow_datasets", "TFDS data_dir.")

LABELS = {"base": "base", "lora": "standard LoRA", "full": "full FT", "icarus_lora": "ICaRus-LoRA",
          "icarus_full": "ICaRus-full"}


def main(argv):
  import jax

  from icarus_jax.assets import load_any_base
  from icarus_jax.data import eval_prompts, examples_source
  from icarus_jax.generation import exact_match_accuracy
  from icarus_jax.tokenizer import ByteTokenizer
  from icarus_jax.trainer import plot_losses
  from icarus_jax.finetune import train_one

  t_all = time.time()
  tfds_dir = os.path.expanduser(FLAGS.tfds_dir)
  cfg, base = load_any_base(None)
  tok = ByteTokenizer()
  results = {"tasks": {}, "config": {
      "steps": FLAGS.steps, "long_steps": FLAGS.long_steps, "rank": FLAGS.rank,
      "lora_lr": FLAGS.lora_lr, "full_lr": FLAGS.full_lr, "seed": FLAGS.seed,
      "eval_examples": FLAGS.eval_examples, "base": "icarus_jax/assets/small_base",
      "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, jax {jax.__version__}",
      "date": time.strftime("%Y-%m-%d"), "command": "python -m launch.accuracy_table " + " ".join(argv[1:])}}
  for task in FLAGS.tasks:
    test = examples_source(task, "test", data_dir=tfds_dir)
    prompts, answers = eval_prompts(test, tok, FLAGS.eval_examples)
    row = {}
    acc, _ = exact_match_accuracy(cfg, base, None, prompts, answers, tok)
    row["base"] = {"accuracy": acc}
    curves = {}
    steps = FLAGS.long_steps if task == "kv_lookup" else FLAGS.steps
    for mode in FLAGS.modes:
      lr = FLAGS.full_lr if mode.endswith("full") else FLAGS.lora_lr
      wd = Path(FLAGS.workdir) / f"{task}_{mode}_s{FLAGS.seed}"
      t0 = time.time()
      adapter, hist, out = train_one(mode=mode, task=task, rank=FLAGS.rank, alpha=2.0 * FLAGS.rank,
                                     steps=steps, lr=lr, seed=FLAGS.seed, workdir=wd,
                                     tfds_dir=tfds_dir, save_every=steps, base=(cfg, base))
      t_train = time.time() - t0
      t0 = time.time()
      acc, texts = exact_match_accuracy(cfg, base, adapter, prompts, answers, tok)
      row[mode] = {"accuracy": acc, "final_loss": hist[-1]["loss"], "train_wall_s": round(t_train, 1),
                   "eval_wall_s": round(time.time() - t0, 1), "steps": steps, "lr": lr,
                   "samples": [{"prompt": tok.decode(prompts[i][1:]), "answer": answers[i],
                                "output": texts[i]} for i in range(3)]}
      curves[LABELS[mode]] = hist
      print(f"{task:10s} {mode:12s} acc={acc:.3f} loss={hist[-1]['loss']:.4f} ({t_train:.0f}s)",
            flush=True)
      if FLAGS.export_adapters and mode in ("icarus_lora", "lora"):
        dst = Path(FLAGS.export_adapters) / f"{task}-{mode}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(wd / "adapter", dst)
    for seed in FLAGS.extra_seeds:
      for mode in ("icarus_lora", "lora"):
        if mode not in FLAGS.modes:
          continue
        wd = Path(FLAGS.workdir) / f"{task}_{mode}_s{seed}"
        train_one(mode=mode, task=task, rank=FLAGS.rank, alpha=2.0 * FLAGS.rank, steps=steps,
                  lr=FLAGS.lora_lr, seed=int(seed), workdir=wd, tfds_dir=tfds_dir,
                  save_every=steps, base=(cfg, base))
        if FLAGS.export_adapters:
          dst = Path(FLAGS.export_adapters) / f"{task}-{mode}-s{seed}"
          shutil.rmtree(dst, ignore_errors=True)
          shutil.copytree(wd / "adapter", dst)
    results["tasks"][task] = row
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_losses(curves, out / f"accuracy_loss_{task}.png", title=f"{task}: training loss")
    (out / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
  results["total_wall_s"] = round(time.time() - t_all, 1)
  (Path(FLAGS.out) / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")
  write_markdown(results, Path(FLAGS.out) / "accuracy.md")


def write_markdown(results: dict, path: Path) -> None:
  modes = ["base"] + [m for m in ("lora", "full", "icarus_lora", "icarus_full")
                      if any(m in r for r in results["tasks"].values())]
  lines = ["| task | " + " | ".join(LABELS[m] for m in modes) + " |",
           "| --- |" + " ---: |" * len(modes)]
  avg = {m: [] for m in modes}
  for task, row in results["tasks"].items():
    cells = []
    for m in modes:
      a = row.get(m, {}).get("accuracy")
      if a is not None:
        avg[m].append(a)
      cells.append("-" if a is None else f"{100 * a:.1f}")
    lines.append(f"| {task} | " + " | ".join(cells) + " |")
  lines.append("| **average** | " + " | ".join(
      f"**{100 * sum(v) / len(v):.1f}**" if v else "-" for v in avg.values()) + " |")
  table = "\n".join(lines)
  c = results["config"]
  gap = None
  if avg.get("icarus_lora") and avg.get("lora"):
    gap = 100 * (sum(avg["icarus_lora"]) / len(avg["icarus_lora"]) - sum(avg["lora"]) / len(avg["lora"]))
  path.with_suffix(".table.md").write_text(table + "\n")
  path.write_text(
      "# Accuracy: ICaRus vs conventional fine-tuning (exact match, %)\n\n"
      f"Held-out test split, {c['eval_examples']} examples per task, greedy decoding; ICaRus "
      "adapters generate through the shared encoder cache (encoder = frozen base, decoder = "
      "base + adapter), never a merged model.\n\n" + table + "\n\n"
      + (f"ICaRus-LoRA minus standard LoRA, average: **{gap:+.1f} points**.\n\n" if gap is not None else "")
      + "## Setup\n\n"
      f"- command: `{c['command']}`\n- base: `{c['base']}` (pretrained by `launch/pretrain.py`)\n"
      f"- steps: {c['steps']} ({c['long_steps']} for kv_lookup), batch 32, rank {c['rank']}, "
      f"alpha {2 * c['rank']}, LR {c['lora_lr']} (LoRA) / {c['full_lr']} (full), warmup 20 + cosine, "
      f"seed {c['seed']}\n- machine: {c['machine']}; date {c['date']}; total wall time "
      f"{results.get('total_wall_s', '?')} s\n\n"
      "Per-run wall times and final losses are in `accuracy.json`; loss curves in "
      "`accuracy_loss_<task>.png`.\n")


if __name__ == "__main__":
  app.run(main)
