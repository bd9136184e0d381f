"""Capacity of a serving system from a rate sweep, and ICaRus-vs-baseline ratios.

A *point* is one run of one system at one arrival rate: a dict with ``hardware``, ``model``,
``workload``, ``system``, ``n_models``, ``rate``, ``seed`` and the harness's metrics
(``bench.run_workflows``: ``steady_p95_workflow_latency_ms``, ``steady_failed_workflows``,
``workflow_throughput``, ``prefill_tokens_computed``), or ``infeasible`` (the layout does not
fit). The same functions summarize projections (``benchmarks/workflow_claim.py``) and
measurements (``benchmarks/workflow_cpu.py``).

SLO: the steady P95 of a system at a rate must be <= ``slo_factor`` x its unloaded P95 (the
P95 at the lowest rate swept) with every steady workflow completed; the *max sustainable rate*
is the largest swept rate before the first point that misses it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

BASELINES = ("multi_lora", "instances_1gpu", "instances_eq", "instances_ngpu")


# The metrics of one sweep point that the benchmarks keep (from ``bench.metrics``' summary).
POINT_METRICS = (
    "completed", "failed", "failed_workflows", "workflow_throughput", "p50_workflow_latency_ms",
    "p95_workflow_latency_ms", "p99_workflow_latency_ms", "steady_p50_workflow_latency_ms",
    "steady_p95_workflow_latency_ms", "steady_p99_workflow_latency_ms", "steady_workflows",
    "steady_failed_workflows", "median_ttft_ms", "p95_ttft_ms", "median_tpot_ms",
    "p95_tpot_ms", "prefill_tokens_computed", "prompt_tokens", "cached_prompt_tokens",
    "pages_evicted", "preemptions", "engine_steps", "retention_hits", "retention_reclaimed",
    "duration")


def point_key(r) -> tuple:
  return (r["hardware"], r["model"], r["workload"], r["system"], r["n_models"],
          float(r["rate"]), int(r["seed"]))


def _ok(r) -> bool:
  return "infeasible" not in r and r.get("steady_failed_workflows", 1) == 0


def sustainable(rows: list[dict], slo_factor: float) -> dict:
  """Rows of one (system, N, seed) over rates -> unloaded P95, max sustainable rate (largest
  rate with every steady workflow done and steady P95 <= slo_factor x unloaded), max throughput."""
  rows = sorted(rows, key=lambda r: r["rate"])
  ok = [r for r in rows if _ok(r)]
  if not ok:
    reason = next((r["infeasible"] for r in rows if "infeasible" in r), "every point failed")
    return {"feasible": False, "reason": reason}
  unloaded = ok[0]["steady_p95_workflow_latency_ms"]
  slo = slo_factor * unloaded
  best = None
  for r in rows:
    if _ok(r) and r["steady_p95_workflow_latency_ms"] <= slo:
      best = r
    else:
      break
  return {"feasible": True, "unloaded_p95_ms": unloaded, "slo_ms": slo,
          "max_sustainable_rate": best["rate"] if best else 0.0,
          "max_throughput": max(r["workflow_throughput"] for r in ok)}


def summarize(points: list[dict], slo_factor: float = 2.0, *, projection: bool = True
              ) -> tuple[list[dict], list[dict]]:
  """Per-(system, N, seed) capacities and the ICaRus-vs-baseline summary records (labelled
  ``PROJECTION`` when ``projection``, else ``MEASURED``)."""
  groups: dict = {}
  for r in points:
    groups.setdefault((r["hardware"], r["model"], r["workload"], r["system"], r["n_models"],
                       r["seed"]), []).append(r)
  caps = []
  for (hw, model, wl, system, n, seed), rows in sorted(groups.items()):
    caps.append(dict(hardware=hw, model=model, workload=wl, system=system, n_models=n,
                     seed=seed, **sustainable(rows, slo_factor)))
  idx = {(c["hardware"], c["workload"], c["system"], c["n_models"], c["seed"]): c for c in caps}
  pts = {point_key(r): r for r in points}  # callers pass one setting's points
  summary = []
  for (hw, model, wl, n) in sorted({(c["hardware"], c["model"], c["workload"], c["n_models"])
                                    for c in caps}):
    for base in BASELINES:
      per_seed = []
      for seed in sorted({c["seed"] for c in caps}):
        ic, bc = idx.get((hw, wl, "icarus", n, seed)), idx.get((hw, wl, base, n, seed))
        if ic is None or bc is None:
          continue
        if not bc["feasible"] or not ic["feasible"]:
          per_seed.append({"seed": seed, "baseline_infeasible": bc.get("reason"),
                           "icarus_max_sustainable_rate": ic.get("max_sustainable_rate")})
          continue
        at = lambda rate: (pts.get((hw, model, wl, "icarus", n, rate, seed)),  # noqa: E731
                           pts.get((hw, model, wl, base, n, rate, seed)))
        knee = bc["max_sustainable_rate"]
        ri, rb = at(knee)
        rec = {"seed": seed, "baseline_knee_rate": knee,
               "max_sustainable_rate_ratio": (ic["max_sustainable_rate"] / knee if knee
                                              else math.inf),
               "max_throughput_ratio": ic["max_throughput"] / bc["max_throughput"]}
        # the paper's regime: the baseline past its knee, at the rate ICaRus still sustains
        iknee = ic["max_sustainable_rate"]
        ri2, rb2 = at(iknee)
        if ri2 and rb2 and "infeasible" not in rb2 and rb2.get("steady_p95_workflow_latency_ms"):
          rec["p95_ratio_at_icarus_knee"] = (rb2["steady_p95_workflow_latency_ms"]
                                             / ri2["steady_p95_workflow_latency_ms"])
        if ri and rb and _ok(ri) and _ok(rb):
          rec["p95_ratio_at_baseline_knee"] = (rb["steady_p95_workflow_latency_ms"]
                                               / ri["steady_p95_workflow_latency_ms"])
        # prefill work at a rate both sustain (the lower knee): the work each system must do,
        # not the recomputation of one that is past its knee and thrashing
        ri3, rb3 = at(min(knee, iknee) if knee and iknee else None)
        if ri3 and rb3 and _ok(ri3) and _ok(rb3):
          rec["prefill_token_ratio"] = (rb3["prefill_tokens_computed"]
                                        / max(1, ri3["prefill_tokens_computed"]))
        per_seed.append(rec)
      if not per_seed:
        continue
      out = {"hardware": hw, "model": model, "workload": wl, "baseline": base, "n_models": n,
             "seeds": [p["seed"] for p in per_seed],
             ("PROJECTION" if projection else "MEASURED"): True}
      for k in ("p95_ratio_at_baseline_knee", "p95_ratio_at_icarus_knee", "max_sustainable_rate_ratio",
                "max_throughput_ratio", "prefill_token_ratio"):
        vals = [p[k] for p in per_seed if k in p and math.isfinite(p[k])]
        out[k] = float(np.mean(vals)) if vals else None
        out[k + "_std"] = float(np.std(vals)) if len(vals) > 1 else None
      bad = [p["baseline_infeasible"] for p in per_seed if "baseline_infeasible" in p]
      if bad:
        out["baseline_infeasible"] = bad[0]
      summary.append(out)
  return caps, summary


SUMMARY_KEYS = ("hardware", "model", "workload", "baseline", "n_models",
                "p95_ratio_at_baseline_knee", "max_sustainable_rate_ratio", "max_throughput_ratio",
                "prefill_token_ratio", "seeds")


def merge_summary_file(path: Path, summary: list[dict], *, measured: bool) -> list[dict]:
  """Writes ``summary`` (from :func:`summarize`) into the JSON list at ``path`` in the issue's
  record format, replacing the records of the same kind (measured or projected) and keeping
  the others, so the projection and the measurement each refresh their own half."""
  label = "MEASURED" if measured else "PROJECTION"
  path = Path(path)
  old = json.loads(path.read_text()) if path.exists() else []
  kept = [r for r in old if not r.get(label)]
  new = [{**{k: s.get(k) for k in SUMMARY_KEYS}, label: True,
          **({"baseline_infeasible": s["baseline_infeasible"]} if "baseline_infeasible" in s
             else {})} for s in summary]
  path.write_text(json.dumps(kept + new, indent=1))
  return kept + new


def plot_sweeps(points: list[dict], path_stem: Path, label: str) -> list[str]:
  """P95 and throughput vs rate, every system, one column per N; one PNG per (hardware,
  workload), named ``<stem>_<hardware>_<workload>.png``. ``label`` heads the title
  (``PROJECTION (roofline)`` or ``MEASURED``)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  files = []
  styles = {"icarus": ("C0", "-"), "multi_lora": ("C1", "--"), "instances_1gpu": ("C3", ":"),
            "instances_eq": ("C2", "-."), "instances_ngpu": ("C4", (0, (1, 3))),
            "icarus_unaware": ("C7", "-"), "icarus_mixed": ("C8", "-")}
  for hw, wl in sorted({(r["hardware"], r["workload"]) for r in points}):
    ns = sorted({r["n_models"] for r in points if r["hardware"] == hw and r["workload"] == wl})
    fig, axes = plt.subplots(2, len(ns), figsize=(4.2 * len(ns), 7), squeeze=False)
    for j, n in enumerate(ns):
      for system, (c, ls) in styles.items():
        rows = [r for r in points if (r["hardware"], r["workload"], r["system"], r["n_models"])
                == (hw, wl, system, n) and "infeasible" not in r]
        if not rows:
          continue
        rates = sorted({r["rate"] for r in rows})
        p95 = [np.mean([r["steady_p95_workflow_latency_ms"] / 1e3 for r in rows
                        if r["rate"] == x]) for x in rates]
        thr = [np.mean([r["workflow_throughput"] for r in rows if r["rate"] == x]) for x in rates]
        axes[0, j].plot(rates, p95, color=c, linestyle=ls, marker="o", ms=3, label=system)
        axes[1, j].plot(rates, thr, color=c, linestyle=ls, marker="o", ms=3, label=system)
      axes[0, j].set_yscale("log")
      axes[0, j].set_title(f"N = {n}")
      axes[0, j].set_ylabel("steady P95 workflow latency (s)")
      axes[1, j].set_ylabel("workflows / s completed")
      axes[1, j].set_xlabel("arrival rate (workflows / s)")
      axes[0, j].legend(fontsize=7)
    fig.suptitle(f"{label}: {points[0]['model']} on {hw}, {wl} workload")
    fig.tight_layout()
    out = path_stem.with_name(f"{path_stem.name}_{hw}_{wl}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    files.append(str(out))
  return files
