"""Runs the main job (``python -m launch.demo``) several times and writes what each run measured.

    python -m benchmarks.demo_runs --runs=3                  # ~4 minutes each on 2 CPU cores
    python -m benchmarks.demo_runs --summarize_only --dirs=out/demo_runs/run1,out/demo_runs/run2

Each run is a fresh process with its wall time measured from outside (model load, compilation and
the three interleaved benchmark repetitions included). Writes ``docs/results/demo.md`` (a table
per metric: every repetition of every run, ICaRus vs the conventional baseline) and
``docs/results/demo.json`` (the runs' ``demo.json`` files, with their wall times).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 3, "Full runs of the demo.")
flags.DEFINE_string("out", "out/demo_runs", "Where each run writes (run1, run2, ...).")
flags.DEFINE_list("dirs", [], "--summarize_only: the run directories (each with demo.json).")
flags.DEFINE_bool("summarize_only", False, "Only rebuild the report from existing runs.")
flags.DEFINE_string("results", "docs/results", "Where demo.md / demo.json / demo.png go.")


def summarize(runs: list[dict], results: Path) -> str:
  """Markdown of ``runs`` (each a ``demo.json`` plus ``process_wall_s``)."""
  from icarus_jax.bench.demo import BENCH_ROWS
  lines = ["| metric | " + " | ".join(f"run {i + 1} ICaRus / isolated" for i in range(len(runs)))
           + " | ICaRus ahead |", "| --- |" + " --- |" * (len(runs) + 1)]
  for label, k, scale, better in BENCH_ROWS:
    cells, ahead, total = [], 0, 0
    for r in runs:
      pairs = list(zip(r["repeats"]["icarus"], r["repeats"]["isolated"]))
      cells.append("<br>".join(f"{a[k] * scale:.4g} / {b[k] * scale:.4g}" for a, b in pairs))
      ahead += sum((a[k] < b[k]) if better == "lower" else (a[k] > b[k]) for a, b in pairs)
      total += len(pairs)
    lines.append(f"| {label} ({better} is better) | " + " | ".join(cells)
                 + f" | {ahead} of {total} |")
  walls = ", ".join(f"{r['process_wall_s']:.0f} s" for r in runs)
  answers = runs[0]["answers"]
  right = [f"{a['model']} on {a['task']}: {a['answer']!r} (expected {a['expected']!r}, cached "
           f"{a['cached_prompt_tokens']}/{a['prompt_tokens']})" for a in answers if "task" in a]
  body = [
      "# The main job, three full runs (issue 34)",
      "",
      f"Command: `python -m benchmarks.demo_runs --runs={len(runs)}` (each run is `python -m "
      f"launch.demo` in a fresh process, defaults: SmolLM2-135M-Instruct, seed 0); "
      f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, this 2-core "
      f"CPU (XLA:CPU), nothing else running.",
      "",
      f"Wall time per run, process start to exit: {walls} (the target: about 4 minutes). "
      f"Compilation before timing: "
      + ", ".join(f"{r['warmup_s']:.0f} s ({r['warmup_shapes']} step programs)" for r in runs)
      + "; programs compiled inside the timed runs: "
      + ", ".join(str(r["compiles_in_timed_window"]) for r in runs) + ".",
      "",
      "Every run: K/V bit-identical across the base and both adapters = "
      + str(all(r["kv_bitwise_identical"] for r in runs))
      + "; engine output equal to the naive reference = "
      + str(all(all(r["engine_equals_reference"]) for r in runs)) + ". Held-out answers "
      "(the same in every run, greedy): " + "; ".join(right) + ".",
      "",
      "Benchmark: " + f"{runs[0]['workload']['num_workflows']} workflows x "
      f"{runs[0]['workload']['num_turns']} turns, {runs[0]['workload']['num_models']} models "
      f"round-robin (2 trained, 2 random non-zero), {runs[0]['workload']['system_len']}-token "
      f"shared system prompt + {runs[0]['workload']['context_len']}-token task context per "
      f"workflow, {runs[0]['workload']['output_len']} output tokens per turn, "
      f"{runs[0]['workload']['request_rate']} workflows/s, the same KV budget for both modes. "
      "Each cell: the repetitions of one run, ICaRus / isolated.",
      "",
      *lines,
      "",
      "What it says: " + _ratios(runs) + " The memory, prefill and eviction rows are the same in "
      "every repetition (the schedule is deterministic for a seed); latency and throughput move "
      "with the machine, and their spread is the noise a reader should compare against. Why "
      "ICaRus is ahead: the conventional baseline recomputes each workflow's context once per "
      "model and, with the same page budget, evicts pages it later recomputes; on this CPU "
      "prefill compute is the cost, so latency and throughput follow the prefill tokens. Two "
      "of the four models are random non-zero adapters (two are trained), which changes no "
      "cost. On the embedded 0.86M-parameter byte model the same comparison is dominated by "
      "per-step dispatch and is noise (`docs/results/workflow.md`).",
      "",
      "![the last repetition of run 1](demo.png)",
      "",
  ]
  return "\n".join(body)


def _ratios(runs: list[dict]) -> str:
  def mean(mode, k):
    v = [x[k] for r in runs for x in r["repeats"][mode]]
    return sum(v) / len(v)
  p95 = mean("isolated", "p95_workflow_latency_ms") / mean("icarus", "p95_workflow_latency_ms")
  ttft = mean("isolated", "p95_ttft_ms") / mean("icarus", "p95_ttft_ms")
  thr = mean("icarus", "workflow_throughput") / mean("isolated", "workflow_throughput")
  pre = mean("isolated", "prefill_tokens_computed") / mean("icarus", "prefill_tokens_computed")
  return (f"over all repetitions, ICaRus's P95 workflow latency is {p95:.2f}x lower, its P95 TTFT "
          f"{ttft:.2f}x lower and its workflow throughput {thr:.2f}x higher, computing {pre:.2f}x "
          f"fewer prefill tokens.")


def main(argv):
  del argv
  out = Path(FLAGS.out)
  dirs = [Path(d) for d in FLAGS.dirs]
  walls = {}
  if not FLAGS.summarize_only:
    from tqdm.auto import tqdm
    dirs = []
    for i in tqdm(range(FLAGS.runs), desc="demo runs"):
      d = out / f"run{i + 1}"
      t0 = time.time()
      subprocess.run([sys.executable, "-m", "launch.demo", f"--out={d}"], check=True)
      walls[d] = time.time() - t0
      dirs.append(d)
  runs = []
  for d in dirs:
    r = json.loads((d / "demo.json").read_text())
    r["process_wall_s"] = walls.get(d, r.get("process_wall_s", r["wall_s"]))
    runs.append(r)
  results = Path(FLAGS.results)
  results.mkdir(parents=True, exist_ok=True)
  (results / "demo.json").write_text(json.dumps(runs, indent=1, default=float) + "\n")
  shutil.copy(dirs[0] / "demo.png", results / "demo.png")
  (results / "demo.md").write_text(summarize(runs, results))
  print((results / "demo.md").read_text())


if __name__ == "__main__":
  app.run(main)
