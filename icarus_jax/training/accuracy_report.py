"""Accuracy experiments' records and summaries: one JSONL record per finished run, and every table,
interval and plot computed from those records (never from in-memory state), so an interrupted
experiment resumes by skipping recorded runs and its summary can be rebuilt at any time.

A final-run record holds at least ``{"method", "task", "seed", "lr", "test_acc", "test_correct",
"test_n"}``; ``val_acc``, ``final_train_loss``, ``steps`` and a loss ``curve`` (``[[step, train
loss, validation loss or None], ...]``) when known.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson 95% interval of a binomial proportion ``k / n``."""
  if n == 0:
    return 0.0, 1.0
  p = k / n
  den = 1 + z * z / n
  mid = (p + z * z / (2 * n)) / den
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
  return max(0.0, mid - half), min(1.0, mid + half)


def read_records(path: str | os.PathLike) -> list[dict]:
  """Every record of a JSONL file (none if it does not exist)."""
  p = Path(path)
  if not p.exists():
    return []
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def append_record(path: str | os.PathLike, record: dict) -> None:
  """Appends one record (a finished run) to the JSONL file."""
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  with p.open("a") as f:
    f.write(json.dumps(record) + "\n")


def summarize(records: Iterable[dict], methods: Sequence[str]) -> dict:
  """``{task: {method: cell}}`` over final-run records; a cell holds the mean and std of
  ``test_acc`` over seeds, the pooled Wilson 95% interval, the seeds and LRs used."""
  import numpy as np
  records = list(records)
  tasks = list(dict.fromkeys(r["task"] for r in records))
  table: dict[str, dict] = {}
  for t in tasks:
    table[t] = {}
    for m in methods:
      rs = [r for r in records if r["task"] == t and r["method"] == m]
      if not rs:
        continue
      accs = [r["test_acc"] for r in rs]
      k, n = sum(r["test_correct"] for r in rs), sum(r["test_n"] for r in rs)
      table[t][m] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
                     "seeds": sorted(r["seed"] for r in rs), "ci95": list(wilson(k, n)),
                     "lr": sorted({r["lr"] for r in rs}),
                     "final_train_loss": [r.get("final_train_loss") for r in rs]}
  return table


def means(table: dict) -> dict:
  """``{task: {method: mean test accuracy}}`` (3 decimals) of a ``summarize`` table."""
  return {t: {m: round(c["mean"], 3) for m, c in row.items()} for t, row in table.items()}


def markdown_table(table: dict, methods: Sequence[str], labels: dict[str, str]) -> str:
  """Methods as rows, tasks as columns: ``mean% ± std [Wilson 95%]``."""
  tasks = list(table)
  lines = ["| method | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
  for m in methods:
    if not any(m in table[t] for t in tasks):
      continue
    cells = []
    for t in tasks:
      c = table[t].get(m)
      if c is None:
        cells.append("-")
        continue
      sd = f" ± {100 * c['std']:.1f}" if len(c["seeds"]) > 1 else ""
      cells.append(f"{100 * c['mean']:.1f}{sd} [{100 * c['ci95'][0]:.0f}, "
                   f"{100 * c['ci95'][1]:.0f}]")
    lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_curves(records: Iterable[dict], methods: Sequence[str], labels: dict[str, str], path,
                title: str) -> None:
  """One panel per task: train (solid) and validation (dashed) loss vs step per method, mean over
  seeds with a min-max band."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  records = [r for r in records if r.get("curve")]
  tasks = list(dict.fromkeys(r["task"] for r in records))
  if not tasks:
    return
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, t in zip(axes[0], tasks):
    for i, m in enumerate(methods):  # one color per method on every panel
      rs = [r for r in records if r["task"] == t and r["method"] == m]
      if not rs:
        continue
      n = min(len(r["curve"]) for r in rs)
      steps = [c[0] for c in rs[0]["curve"][:n]]
      color = colors[i % len(colors)]
      for col, style in ((1, "-"), (2, "--")):
        ys = np.array([[np.nan if len(c) <= col or c[col] is None else c[col]
                        for c in r["curve"][:n]] for r in rs], float)
        if np.isnan(ys).all():
          continue
        mean = np.nanmean(ys, 0)
        ax.plot(steps, mean, style, color=color,
                        label=f"{labels.get(m, m)} ({'train' if col == 1 else 'val'})")
        if len(rs) > 1:
          ax.fill_between(steps, np.nanmin(ys, 0), np.nanmax(ys, 0), color=color, alpha=0.15)
    ax.set(title=f"{t}", xlabel="step", ylabel="cross-entropy (response tokens)", yscale="log")
    ax.legend(fontsize=6)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
