"""The training loop: resumable Orbax checkpoints, JSONL metrics, tqdm progress, loss plot.

``run(...)`` trains ``TrainConfig.total_steps`` optimizer steps (each ``grad_accum`` micro
batches). Batch ``i`` is ``dataset[i]`` (a pure function of the seed), and the checkpoint holds
the adapter, the optimizer state and the step, so a run killed and restarted from its workdir
reaches the same final parameters as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from icarus_jax.model.adapters import Adapter
from icarus_jax.model.config import ModelConfig
from icarus_jax.model.params import Params
from icarus_jax.training.objective import TrainConfig, init_trainable, make_optimizer, train_step


def checkpoint_manager(workdir: Path, keep: int = 2):
  """Orbax ``CheckpointManager`` under ``workdir/checkpoints`` (keeps the last ``keep``)."""
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def run(cfg: ModelConfig, base: Params, tc: TrainConfig, dataset, workdir: str | os.PathLike, *,
        name: str = "adapter", save_every: int = 100, log_every: int = 10, progress: bool = True,
        stop_after: int | None = None, eval_fn=None) -> tuple[Adapter, list[dict]]:
  """Trains (or resumes) and returns ``(adapter, metrics history)``.

  ``stop_after`` ends the process-equivalent early (used by tests to simulate a kill) after
  saving at that step. ``eval_fn(adapter) -> dict`` is called at each log step if given.
  """
  import orbax.checkpoint as ocp
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "train_config.json").write_text(json.dumps(
      {k: (list(v) if isinstance(v, tuple) else v) for k, v in tc.__dict__.items()}, indent=2))
  adapter = init_trainable(cfg, base, tc, name=name)
  tx = make_optimizer(tc)
  opt_state = tx.init(adapter.params)
  step = 0
  mgr = checkpoint_manager(workdir)
  latest = mgr.latest_step()
  if latest is not None:
    target = {"params": adapter.params, "opt_state": opt_state}
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    restored = mgr.restore(latest, args=ocp.args.StandardRestore(abstract))
    adapter = Adapter(restored["params"], adapter.config)
    opt_state = restored["opt_state"]
    step = latest
  metrics_path = workdir / "metrics.jsonl"
  history = []
  if metrics_path.exists():
    history = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    history = [h for h in history if h["step"] <= step]
    metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
  micro = tc.grad_accum
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=tc.total_steps, initial=step, desc=f"train {tc.mode} {name}", leave=False)
  t0 = time.time()
  t_tok, n_tok = time.time(), 0  # tokens/s over the steps since the last log
  acc_metrics: list[dict] = []
  while step < tc.total_steps:
    for m in range(micro):
      batch = dataset[step * micro + m]
      n_tok += int(np.size(batch["inputs"]))
      adapter, opt_state, met = train_step(cfg, adapter, opt_state, base, batch, tx=tx)
      acc_metrics.append(met)
    step += 1
    if bar is not None:
      bar.update(1)
    if step % log_every == 0 or step == tc.total_steps:
      rec = {"step": step, "time_s": round(time.time() - t0, 3)}
      for k in acc_metrics[0]:
        rec[k] = float(np.mean([float(a[k]) for a in acc_metrics]))
      rec["tokens_per_s"] = round(n_tok / max(time.time() - t_tok, 1e-9), 1)
      t_tok, n_tok = time.time(), 0
      if eval_fn is not None:
        rec.update({f"eval_{k}": v for k, v in eval_fn(adapter).items()})
      history.append(rec)
      with metrics_path.open("a") as f:
        f.write(json.dumps(rec) + "\n")
      if bar is not None:
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    acc_metrics = [] if (step % log_every == 0) else acc_metrics
    if step % save_every == 0 or step == tc.total_steps or step == stop_after:
      mgr.save(step, args=ocp.args.StandardSave({"params": adapter.params, "opt_state": opt_state}))
      mgr.wait_until_finished()
    if stop_after is not None and step >= stop_after:
      break
  mgr.wait_until_finished()
  mgr.close()
  if bar is not None:
    bar.close()
  return adapter, history


def plot_losses(curves: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> None:
  """One PNG with a training-loss line per run (``{label: metrics history}``)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, hist in curves.items():
    ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (response tokens)")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
