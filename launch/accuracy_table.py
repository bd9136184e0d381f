"""The paper's accuracy claim at our scale, with matched controls, a validation split and seeds.

    python -m launch.accuracy_table                 # resumable: rerun after an interruption
    python -m launch.accuracy_table --summarize_only

Methods (``icarus_jax.training.finetune.METHODS``): ``icarus_lora``, ``icarus_full``, ``lora_matched``
(conventional single-stream LoRA on exactly ICaRus's targets), ``lora`` (default targets, k/v
included), ``full``; same data order, step budget and rank for all. Per (task, method):

1. **LR sweep on validation**: one run per LR of the method's grid (LoRA kinds ``--lora_lrs``,
   full kinds ``--full_lrs``) with the first seed; exact match on the validation split. The test
   split is not read in this phase (``select_lr`` only ever sees validation records).
2. **Final runs**: every seed at the chosen LR (highest validation accuracy; ties go to the
   lower validation loss); exact match on validation and, once per run, on test.

Each finished run is one JSONL record (``<out>/accuracy.jsonl``); ``accuracy.json``
(per-(method, task, seed) records), ``accuracy.md`` (mean ± std over seeds with the pooled Wilson
95% interval) and ``accuracy_loss.png`` (train and validation loss vs step, mean over seeds with a
band) are computed from that file alone. Trained ``icarus_lora`` / ``lora`` adapters of the first
seed can be exported for the demo and the server (``--export_adapters``). ``--base`` picks
another base (the stronger ``small_base_long``, a GGUF, a named base).
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
flags.DEFINE_list("tasks", ["sorting", "reversal", "add2"], "Tasks (icarus_jax.training.tasks).")
flags.DEFINE_list("methods", ["icarus_lora", "lora_matched", "lora", "icarus_full", "full"],
                  "Methods (icarus_jax.training.finetune.METHODS).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the final runs (the first one also sweeps).")
flags.DEFINE_list("lora_lrs", ["1e-3", "3e-3", "1e-2"], "LR grid for LoRA methods.")
flags.DEFINE_list("full_lrs", ["1e-4", "3e-4", "1e-3"], "LR grid for full fine-tuning methods.")
flags.DEFINE_integer("steps", 600, "Steps per run (short tasks).")
flags.DEFINE_integer("long_steps", 300, "Steps per run for tasks with sequences longer than 32 "
                     "tokens (kv_lookup, play).")
flags.DEFINE_string("base", "small_base_long", "Base model (HF dir, .gguf, or a named base); "
                    "default: the embedded base pretrained to about 20 tokens per parameter.")
flags.DEFINE_integer("rank", 16, "LoRA rank (alpha = 2 x rank).")
flags.DEFINE_integer("batch_size", 32, "Examples per step.")
flags.DEFINE_integer("warmup", 20, "Warmup steps.")
flags.DEFINE_bool("probe_first", False, "Before the sweeps, one run per task (lora_matched's "
                  "middle LR, first seed) to see whether the task discriminates; the "
                  "record is the sweep's, so nothing is run twice.")
flags.DEFINE_integer("log_every", 20, "Loss-curve resolution (steps); validation loss too.")
flags.DEFINE_integer("val_examples", 200, "Validation examples (selection and curves).")
flags.DEFINE_integer("eval_examples", 500, "Held-out test examples per task.")
flags.DEFINE_string("out", "docs/results", "Where the records and the table go.")
flags.DEFINE_string("workdir", "runs/accuracy_table", "Run directories (checkpoints).")
flags.DEFINE_string("export_adapters", "", "Where the first seed's LoRA adapters are copied "
                    "(default '': not copied; the demo's adapters live in "
                    "icarus_jax/assets/adapters and belong to the embedded base).")
flags.DEFINE_string("tfds_dir", "~/tensorflow_datasets", "TFDS data_dir.")
flags.DEFINE_string("tfds_config", "default", "Task builder config (default, or small for tests).")
flags.DEFINE_bool("summarize_only", False, "Only rebuild the summary from the JSONL.")

LABELS = {"chance": "chance (majority answer)", "base": "base", "icarus_lora": "ICaRus-LoRA", "lora_matched": "LoRA, matched targets",
          "lora": "LoRA (+k,v)", "icarus_full": "ICaRus-full", "full": "full FT"}


def lr_grid(method: str) -> list[float]:
  return [float(x) for x in (FLAGS.full_lrs if method.endswith("full") else FLAGS.lora_lrs)]


def select_lr(sweep: list[dict]) -> float:
  """The LR of the best validation run (accuracy, then lower validation loss). Reads only
  validation fields: a sweep record carries no test numbers."""
  assert all("test_acc" not in r for r in sweep), "selection must not see test results"
  best = max(sweep, key=lambda r: (r["val_acc"], -(r.get("val_loss") or 0.0)))
  return best["lr"]


def write_summary(records: list[dict], out: Path, config: dict) -> dict:
  """``accuracy.json`` / ``accuracy.md`` / ``accuracy_loss.png`` from the records alone."""
  from icarus_jax.training.accuracy_report import markdown_table, plot_curves, summarize
  final = [r for r in records if r["phase"] == "final"]
  methods = list(LABELS)
  table = summarize(final, methods)
  keep = ("method", "task", "seed", "lr", "val_acc", "test_acc", "final_train_loss", "steps")
  summary = {"config": config, "table": table,
             "records": [{k: r.get(k) for k in keep} for r in final],
             "sweep": [{k: r.get(k) for k in ("method", "task", "lr", "val_acc", "val_loss",
                                              "final_train_loss")}
                       for r in records if r["phase"] == "sweep"]}
  (out / "accuracy.json").write_text(json.dumps(summary, indent=1) + "\n")
  md = markdown_table(table, methods, LABELS)
  (out / "accuracy.table.md").write_text(md + "\n")
  plot_curves(final, [m for m in methods if m not in ("chance", "base")], LABELS, out / "accuracy_loss.png",
              "train (solid) and validation (dashed) loss, mean over seeds, min-max band")
  return summary


def main(argv):
  from icarus_jax.flag_utils import quiet_logs
  quiet_logs(FLAGS)
  from icarus_jax.training.accuracy_report import append_record, means, read_records
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  jsonl = out / "accuracy.jsonl"
  config = {k: FLAGS[k].value for k in ("tasks", "methods", "seeds", "lora_lrs", "full_lrs",
                                        "steps", "long_steps", "rank", "val_examples",
                                        "eval_examples", "batch_size", "warmup")}
  config.update(command="python -m " + " ".join(["launch.accuracy_table"] + argv[1:]),
                machine=f"{platform.machine()}, {os.cpu_count()} cores",
                base=FLAGS.base or "icarus_jax/assets/small_base")
  if FLAGS.summarize_only:
    print(json.dumps(write_summary(read_records(jsonl), out, config)["table"], indent=1))
    return

  import jax
  from tqdm.auto import tqdm

  from icarus_jax.checkpoints.assets import load_any_base, load_base_tokenizer
  from icarus_jax.training.data import eval_prompts, example_text, examples_source, make_dataset
  from icarus_jax.training.finetune import TASK_SEQ_LEN, method_config, train_one
  from icarus_jax.model.generation import exact_match_accuracy
  from icarus_jax.training.objective import eval_loss

  tfds_dir = os.path.expanduser(FLAGS.tfds_dir)
  cfg, base = load_any_base(FLAGS.base)
  tok, chat = load_base_tokenizer(FLAGS.base)
  seeds = [int(s) for s in FLAGS.seeds]

  def answer_budget(answers) -> int:
    """Greedy tokens to generate: the longest reference answer plus its end token and a margin
    (a fixed budget would cut long answers, e.g. JSON, and score them wrong)."""
    return max(len(tok.encode(a)) for a in answers) + 2

  def key(r):
    return (r["phase"], r["task"], r["method"], r["seed"], r["lr"])

  done = {key(r): r for r in read_records(jsonl)}
  n_jobs = len(FLAGS.tasks) * (1 + sum(len(lr_grid(m)) + len(seeds) for m in FLAGS.methods))
  # (+ one majority-answer record per task, not counted: it costs no training)
  bar = tqdm(total=n_jobs, initial=len(done), desc="accuracy_table runs")

  def run_task(task, probe_only):
    seq_len = TASK_SEQ_LEN.get(task, 256)
    steps = FLAGS.long_steps if seq_len > 32 else FLAGS.steps
    val = examples_source(task, "validation", data_dir=tfds_dir,
                          tfds_config=FLAGS.tfds_config)
    v_prompts, v_answers = eval_prompts(val, tok, FLAGS.val_examples, chat)
    v_batch = {k: jax.numpy.asarray(x) for k, x in make_dataset(
        val, tok, batch_size=min(64, len(val)), seq_len=seq_len, seed=0, chat=chat)[0].items()}

    def test_eval(adapter):
      """The only place the test split is read: once per final run."""
      test = examples_source(task, "test", data_dir=tfds_dir, tfds_config=FLAGS.tfds_config)
      prompts, answers = eval_prompts(test, tok, FLAGS.eval_examples, chat)
      acc, texts = exact_match_accuracy(cfg, base, adapter, prompts, answers, tok,
                                        max_new_tokens=answer_budget(answers))
      return acc, len(answers), texts[:3]

    def train_eval(method, lr, seed, phase):
      rec = {"phase": phase, "task": task, "method": method, "seed": seed, "lr": lr}
      if key(rec) in done:
        return done[key(rec)]
      t0 = time.time()
      adapter = None
      if method != "base":
        mode, targets = method_config(method)
        wd = Path(FLAGS.workdir) / task / f"{method}_lr{lr:g}_s{seed}"
        adapter, hist, res = train_one(
            mode=mode, task=task, targets=targets, rank=FLAGS.rank, alpha=2.0 * FLAGS.rank,
            steps=steps, lr=lr, seed=seed, workdir=wd, tfds_dir=tfds_dir, save_every=steps,
            batch_size=FLAGS.batch_size, warmup=FLAGS.warmup,
            tfds_config=FLAGS.tfds_config,
            base=(cfg, base), tokenizer=(tok, chat), log_every=FLAGS.log_every,
            eval_fn=lambda a: {"val_loss": float(eval_loss(cfg, a, base, v_batch)["loss"])})
        rec.update(steps=steps, final_train_loss=res["final_loss"],
                   curve=[[h["step"], h["loss"], h.get("eval_val_loss")] for h in hist],
                   train_wall_s=res["train_wall_s"], mode=mode,
                   targets=None if targets is None else list(targets))
        rec["val_loss"] = rec["curve"][-1][2] if rec["curve"] else None
        if (FLAGS.export_adapters and phase == "final" and seed == seeds[0]
            and method in ("icarus_lora", "lora")):
          dst = Path(FLAGS.export_adapters) / f"{task}-{method}"
          shutil.rmtree(dst, ignore_errors=True)
          shutil.copytree(wd / "adapter", dst)
      rec["val_acc"], _ = exact_match_accuracy(cfg, base, adapter, v_prompts, v_answers, tok,
                                               max_new_tokens=answer_budget(v_answers))
      if phase == "final":
        acc, n, samples = test_eval(adapter)
        rec.update(test_acc=acc, test_correct=int(round(acc * n)), test_n=n, samples=samples)
      rec["wall_s"] = round(time.time() - t0, 1)
      append_record(jsonl, rec)
      done[key(rec)] = rec
      bar.update(1)
      tqdm.write(f"{task:10s} {method:12s} {phase:6s} lr={lr:g} seed={seed} "
                 f"val={rec['val_acc']:.3f}"
                 + (f" test={rec['test_acc']:.3f}" if phase == "final" else ""))
      return rec

    def chance():
      """The majority-answer predictor: the most frequent train answer, scored on test."""
      rec = {"phase": "final", "task": task, "method": "chance", "seed": 0, "lr": 0.0}
      if key(rec) in done:
        return
      import collections
      train = examples_source(task, "train", data_dir=tfds_dir, tfds_config=FLAGS.tfds_config)
      answers = collections.Counter(example_text(train[i]["response"])
                                    for i in range(len(train)))
      guess = min(answers, key=lambda a: (-answers[a], a))  # ties: the first in sorted order
      test = examples_source(task, "test", data_dir=tfds_dir, tfds_config=FLAGS.tfds_config)
      n = min(FLAGS.eval_examples, len(test))  # the prompts the final runs are scored on
      k = sum(example_text(test[i]["response"]) == guess for i in range(n))
      rec.update(test_acc=k / n, test_correct=k, test_n=n, val_acc=None, samples=[guess])
      append_record(jsonl, rec)
      done[key(rec)] = rec

    if probe_only:
      # the matched control decides whether a task discriminates (neither floor nor ceiling)
      probe = "lora_matched" if "lora_matched" in FLAGS.methods else FLAGS.methods[0]
      grid = lr_grid(probe)
      train_eval(probe, grid[len(grid) // 2], seeds[0], "sweep")
      return
    for method in FLAGS.methods:
      sweep = []
      for lr in lr_grid(method):
        r = dict(train_eval(method, lr, seeds[0], "sweep"))
        sweep.append({k: v for k, v in r.items() if not k.startswith("test")})
      lr = select_lr(sweep)
      for seed in seeds:
        train_eval(method, lr, seed, "final")
    train_eval("base", 0.0, 0, "final")
    chance()
    write_summary(list(done.values()), out, config)

  if FLAGS.probe_first:
    for task in FLAGS.tasks:
      run_task(task, probe_only=True)
  for task in FLAGS.tasks:
    run_task(task, probe_only=False)
  bar.close()
  summary = write_summary(read_records(jsonl), out, config)
  print((out / "accuracy.table.md").read_text())
  print(json.dumps(means(summary["table"])))


if __name__ == "__main__":
  app.run(main)
