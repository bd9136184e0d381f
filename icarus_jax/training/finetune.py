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
                "city_year": 96, "topic": 96}


def train_one(*, mode, task, base_path=None, rank=8, alpha=16.0, targets=None, steps=300,
              batch_size=32, grad_accum=1, seq_len=0, lr=3e-3, warmup=20, seed=0, workdir,
              weight_decay=0.0, clip_norm=1.0,
              save_every=100, tfds_dir=None, tfds_config="default", eval_examples=0,
              progress=True, stop_after=None, base=None, mesh=None, tokenizer=None,
              log_every=10, eval_fn=None):
  """Trains one adapter (resumable in ``workdir``) and returns ``(adapter, history, summary)``.

  ``base``: an already loaded ``(config, params)``; else ``base_path`` (default: embedded base,
  ``smollm2`` for the real model). ``tokenizer``: ``(tokenizer, ChatTemplate)``; default: the
  base's own (``load_base_tokenizer``): a chat model's prompts go through its chat template.
  ``eval_fn(adapter) -> dict`` runs at every log step (e.g. a validation loss).
  """
  from icarus_jax.checkpoints.assets import load_any_base, load_base_tokenizer
  from icarus_jax.training.data import examples_source, make_dataset
  from icarus_jax.checkpoints.peft_io import save_adapter
  from icarus_jax.training.trainer import plot_losses, run
  from icarus_jax.training.objective import TrainConfig

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
  src = examples_source(task, "train", data_dir=tfds_dir, tfds_config=tfds_config)
  ds = make_dataset(src, tok, batch_size=batch_size, seq_len=seq_len, seed=seed, chat=chat)
  name = f"{Path(task).stem}-{mode}"
  adapter, hist = run(cfg, params, tc, ds, workdir, name=name, save_every=save_every,
                      progress=progress, stop_after=stop_after, log_every=log_every,
                      eval_fn=eval_fn)
  out = {"mode": mode, "task": task, "steps": steps, "seed": seed, "final_loss": hist[-1]["loss"],
         "train_wall_s": round(time.time() - t0, 1)}
  if stop_after is None or stop_after >= steps:
    save_adapter(adapter, Path(workdir) / "adapter")
    plot_losses({mode: hist}, Path(workdir) / "loss.png", title=f"{task} {mode}")
  if eval_examples:
    from icarus_jax.training.data import eval_prompts
    from icarus_jax.model.generation import exact_match_accuracy
    test = examples_source(task, "test", data_dir=tfds_dir, tfds_config=tfds_config)
    prompts, answers = eval_prompts(test, tok, eval_examples, chat)
    out["accuracy"], _ = exact_match_accuracy(cfg, params, adapter, prompts, answers, tok)
    out["eval_examples"] = len(prompts)
  return adapter, hist, out
