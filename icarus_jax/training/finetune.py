"""One fine-tuning run as a library call (used by ``launch/train.py`` and the accuracy table)."""

from __future__ import annotations

import time
from pathlib import Path

#: Fine-tuning methods compared in the accuracy experiments -> (training mode, LoRA targets or
#: None for the mode's default). ``lora_matched`` is conventional single-stream LoRA on exactly
#: ICaRus's targets: the control that isolates "frozen encoder K/V" from "which weights adapt".
METHODS = {
    "icarus_lora": ("icarus_lora", None),
    "icarus_full": ("icarus_full", None),
    "lora_matched": ("lora", "icarus"),
    "lora": ("lora", None),
    "full": ("full", None),
}


def method_config(method: str) -> tuple[str, tuple[str, ...] | None]:
  """``(mode, targets)`` of a method in ``METHODS`` (targets resolved to a tuple for LoRA)."""
  from icarus_jax.model.adapters import DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS
  from icarus_jax.errors import IcarusError
  if method not in METHODS:
    raise IcarusError(f"unknown method {method!r}; accepted: {sorted(METHODS)}")
  mode, targets = METHODS[method]
  if mode.endswith("full"):
    return mode, None
  if targets == "icarus" or mode == "icarus_lora":
    return mode, tuple(DEFAULT_ICARUS_TARGETS)
  return mode, tuple(DEFAULT_LORA_TARGETS)


TASK_SEQ_LEN = {"addition": 32, "sorting": 32, "reversal": 32, "kv_lookup": 64, "kv_recall": 32, "play": 128, "next_word": 64,
                "add2": 32,
                "city_year": 96, "topic": 96,
                # SmolLM2 token counts incl. chat template (max over all splits + 1)
                "word_problem": 88, "json_extract": 121, "word_sort": 72}


def train_one(*, mode, task, base_path=None, rank=8, alpha=16.0, targets=None, steps=300,
              batch_size=32, grad_accum=1, seq_len=0, lr=3e-3, warmup=20, seed=0, workdir,
              weight_decay=0.0, clip_norm=1.0,
              save_every=100, tfds_dir=None, tfds_config="default", eval_examples=0,
              progress=True, stop_after=None, base=None, mesh=None, tokenizer=None,
              log_every=10, eval_fn=None, name=None, eval_file=None, eval_fraction=0.0,
              loss_on="last", too_long="error"):
  """Trains one adapter (resumable in ``workdir``) and returns ``(adapter, history, summary)``.

  ``base``: an already loaded ``(config, params)``; else ``base_path`` (default: embedded base,
  ``smollm2`` for the real model). ``tokenizer``: ``(tokenizer, ChatTemplate)``; default: the
  base's own (``load_base_tokenizer``): a chat model's examples go through its chat template,
  exactly as the server renders them. ``eval_fn(adapter) -> dict`` runs at every log step.

  ``task``: a builder name (held-out split: its ``test``) or a ``.jsonl`` file; held-out examples
  of a file come from ``eval_file`` or a seeded disjoint ``eval_fraction`` of it, and never enter
  a training batch. ``eval_examples``: how many held-out examples to score (0: none; -1: all):
  exact match of greedy answers and teacher-forced per-token accuracy. ``name``: the adapter's
  serving name (saved in it; default ``<task>-<mode>``). ``loss_on`` / ``too_long``: see
  ``icarus_jax.training.data.encode_all``.
  """
  from icarus_jax.checkpoints.assets import load_any_base, load_base_tokenizer
  from icarus_jax.training.data import examples_source, load_jsonl, make_dataset, split_examples
  from icarus_jax.checkpoints.peft_io import save_adapter
  from icarus_jax.training.trainer import plot_losses, run
  from icarus_jax.training.objective import TrainConfig
  from icarus_jax.errors import IcarusError

  t0 = time.time()
  cfg, params = base if base is not None else load_any_base(base_path)
  if mesh:  # e.g. "data:2,model:4": the frozen base is sharded, the step runs SPMD
    from icarus_jax.model.sharding import make_mesh, shard_base
    params = shard_base(cfg, params, make_mesh(mesh))
  tok, chat = tokenizer if tokenizer is not None else load_base_tokenizer(base_path)
  seq_len = seq_len or TASK_SEQ_LEN.get(task, 256)
  tc = TrainConfig(mode=mode, rank=rank, alpha=alpha, targets=tuple(targets) if targets else None,
                   learning_rate=lr, warmup_steps=warmup, total_steps=steps, batch_size=batch_size,
                   grad_accum=grad_accum, seq_len=seq_len, seed=seed,
                   weight_decay=weight_decay, clip_norm=clip_norm)
  held = None
  if task.endswith(".jsonl"):
    src = load_jsonl(task)
    if eval_file and eval_fraction:
      raise IcarusError("pass either eval_file or eval_fraction, not both")
    if eval_file:
      held = load_jsonl(eval_file)
    elif eval_fraction:
      src, held = split_examples(src, eval_fraction, seed)
  else:
    if eval_file or eval_fraction:
      raise IcarusError(f"eval_file / eval_fraction apply to .jsonl data; task {task!r} has its "
                        f"own test split")
    src = examples_source(task, "train", data_dir=tfds_dir, tfds_config=tfds_config)
  stats: dict = {}
  ds = make_dataset(src, tok, batch_size=batch_size, seq_len=seq_len, seed=seed, chat=chat,
                    loss_on=loss_on, too_long=too_long, stats=stats)
  name = name or f"{Path(task).stem}-{mode}"
  adapter, hist = run(cfg, params, tc, ds, workdir, name=name, save_every=save_every,
                      progress=progress, stop_after=stop_after, log_every=log_every,
                      eval_fn=eval_fn)
  out = {"name": name, "mode": mode, "task": task, "steps": steps, "seed": seed,
         "final_loss": hist[-1]["loss"], "train_wall_s": round(time.time() - t0, 1),
         "data": {"train_examples": stats["examples"] - stats["dropped"],
                  "dropped_too_long": stats["dropped"], "turns_cut": stats["turns_cut"],
                  "held_out_examples": len(held) if held is not None else None,
                  "loss_on": loss_on}}
  if stop_after is None or stop_after >= steps:
    save_adapter(adapter, Path(workdir) / "adapter")
    plot_losses({mode: hist}, Path(workdir) / "loss.png", title=f"{task} {mode}")
    out["adapter"] = str(Path(workdir) / "adapter")
  if eval_examples:
    if held is None and task.endswith(".jsonl"):
      raise IcarusError("eval_examples on a .jsonl needs held-out data: pass eval_file or "
                        "eval_fraction (the training file itself is never scored)")
    test = held if held is not None else examples_source(task, "test", data_dir=tfds_dir,
                                                         tfds_config=tfds_config)
    out.update(held_out_scores(cfg, params, adapter, test, tok, chat, seq_len=seq_len,
                               limit=None if eval_examples < 0 else eval_examples,
                               loss_on=loss_on))
  return adapter, hist, out


def held_out_scores(cfg, params, adapter, examples, tok, chat, *, seq_len: int, limit=None,
                    loss_on: str = "last") -> dict:
  """Exact match of greedy answers and teacher-forced per-token accuracy / loss on held-out
  ``examples`` (the first ``limit``)."""
  import jax.numpy as jnp
  import numpy as np
  from icarus_jax.model.generation import exact_match_accuracy
  from icarus_jax.training.data import encode_all, eval_prompts, pad_batch
  from icarus_jax.training.objective import eval_loss
  n = len(examples) if limit is None else min(limit, len(examples))
  examples = [examples[i] for i in range(n)]
  prompts, answers = eval_prompts(examples, tok, None, chat)
  longest = max(len(tok.encode(a)) for a in answers) + 2
  acc, _ = exact_match_accuracy(cfg, params, adapter, prompts, answers, tok,
                                max_new_tokens=min(longest, 512))
  items, _ = encode_all(examples, tok, seq_len=seq_len, chat=chat, loss_on=loss_on,
                        too_long="drop")
  tot_loss = tot_acc = tot_w = 0.0
  empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
  for i in range(0, len(items), 32):  # fixed [32, seq_len] batches: one compiled program
    chunk = items[i:i + 32]
    b = pad_batch(chunk + [empty] * (32 - len(chunk)), seq_len, tok.pad_id)
    w = float(b["mask"].sum())
    m = eval_loss(cfg, adapter, params, {k: jnp.asarray(v) for k, v in b.items()})
    tot_loss += float(m["loss"]) * w
    tot_acc += float(m["token_accuracy"]) * w
    tot_w += w
  return {"accuracy": acc, "eval_examples": n,
          "held_out_token_accuracy": round(tot_acc / max(tot_w, 1.0), 4),
          "held_out_loss": round(tot_loss / max(tot_w, 1.0), 4)}


def run_summary(out: dict, *, base: str | None, mode: str, workdir: str) -> str:
  """What a user needs after a run: the numbers, where the adapter is, how to serve it."""
  d = out["data"]
  lines = [f"trained {out['name']!r} ({mode}) on {d['train_examples']} examples, "
           f"{out['steps']} steps, final loss {out['final_loss']:.4f}, {out['train_wall_s']} s"]
  if d["dropped_too_long"] or d["turns_cut"]:
    lines.append(f"  {d['dropped_too_long']} examples longer than --seq_len dropped, "
                 f"{d['turns_cut']} trailing turns cut")
  if "accuracy" in out:
    lines.append(f"  held-out ({out['eval_examples']} examples): exact match "
                 f"{out['accuracy']:.1%}, per-token accuracy "
                 f"{out.get('held_out_token_accuracy', float('nan')):.1%}")
  if "adapter" in out:
    serve_mode = "icarus" if mode.startswith("icarus") else "isolated"
    base_flag = f" --base={base}" if base else ""
    lines += [f"  adapter: {out['adapter']} (name {out['name']!r}); full record: "
              f"{Path(workdir) / 'result.json'}",
              f"serve it:\n  python -m launch.serve{base_flag} --mode={serve_mode} "
              f"--adapters={out['adapter']}"]
  return "\n".join(lines)
