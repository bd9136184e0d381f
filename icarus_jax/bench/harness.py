"""Drives agentic workflows through an ``Engine`` and measures them (real or virtual time).

Each workflow's turn 0 is sent at the workflow's arrival time; turn k+1 is sent when turn k
finishes plus turn k's tool latency (0 in the ``paper`` preset), with turn k's output (and the
tool observation) in its prompt, to the model of turn k+1. ``workflow_aware=True`` tells the
engine what a workflow is: every turn carries its workflow as ``session`` with a retention TTL
(its context stays resident across the tool call) and continuing turns are admitted before new
workflows (``Engine.submit``). With a real engine, time is wall-clock (``time.perf_counter``) and idle gaps are
slept; with a simulated engine (``cost_model.RooflineSimulator``), time is virtual.
"""

from __future__ import annotations

import heapq


from icarus_jax.serving.engine import Engine
from icarus_jax.errors import IcarusError
from icarus_jax.bench.metrics import RequestRecord, compute_metrics, workflow_metrics
from icarus_jax.serving.sampling import SamplingParams
from icarus_jax.bench.workload import Workflow


def run_workflows(engine: Engine, workflows: list[Workflow], model_names: list[str | None], *,
                  progress: bool = False, desc: str = "", workflow_aware: bool = False,
                  retain_s: float = 3.0) -> dict:
  """Runs every workflow to completion; returns vLLM-style metrics plus cache statistics.

  ``engine``: an ``Engine`` or anything with its serving surface (``submit``, ``step``,
  ``has_work``, ``clock``, ``runner.wait_until``, ``stats``, ``snapshot``, ``bytes_per_page``),
  e.g. ``multi_instance.MultiInstance``.
  """
  clock = engine.clock
  t0 = clock()
  order = sorted(workflows, key=lambda w: w.arrival)
  nxt = 0
  outputs: dict[int, list[list[int]]] = {}
  live: dict[int, tuple[Workflow, int, float]] = {}   # rid -> (workflow, turn, send time)
  later: list[tuple[float, int, Workflow, int]] = []   # (send time, tiebreak, workflow, turn)
  wf_done: dict[int, float] = {}
  wf_failed: set[int] = set()
  records: list[RequestRecord] = []
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=sum(len(w.turns) for w in workflows), desc=desc or engine.mode, leave=False)

  def send(w: Workflow, k: int) -> None:
    prompt = w.prompt_for(k, outputs[w.wid])
    t = w.turns[k]
    name = model_names[t.model]
    kw = {}
    if workflow_aware:
      last = k == len(w.turns) - 1
      kw = dict(session=w.wid, retain_s=0.0 if last else retain_s, priority=1 if k else 0)
    try:
      rid = engine.submit(prompt, name, SamplingParams(max_tokens=t.max_tokens), **kw)
    except IcarusError:
      records.append(RequestRecord(len(prompt), 0, 0.0, 0.0, [], success=False, model=name))
      wf_failed.add(w.wid)
      if bar is not None:
        bar.update(len(w.turns) - k)
      return
    live[rid] = (w, k, clock())

  while nxt < len(order) or live or later:
    now = clock() - t0
    while later and later[0][0] <= now:
      _, _, w, k = heapq.heappop(later)
      send(w, k)
    while nxt < len(order) and order[nxt].arrival <= now:
      w = order[nxt]
      outputs[w.wid] = []
      send(w, 0)
      nxt += 1
    if not engine.has_work:
      due = [order[nxt].arrival] if nxt < len(order) else []
      due += [later[0][0]] if later else []
      if due:
        engine.runner.wait_until(t0 + min(due))
      continue
    for out in engine.step():
      if out.request_id not in live:
        continue
      w, k, sent = live.pop(out.request_id)
      ok = out.finish_reason in ("length", "stop")
      tt = out.token_times
      records.append(RequestRecord(
          len(out.prompt_tokens), len(out.output_tokens),
          (out.first_token_time or out.finish_time) - sent, out.finish_time - sent,
          [b - a for a, b in zip(tt, tt[1:])], success=ok, model=out.adapter))
      if bar is not None:
        bar.update(1)
      if not ok:
        wf_failed.add(w.wid)
        continue
      outputs[w.wid].append(out.output_tokens)
      if k + 1 < len(w.turns):
        if w.turns[k].tool_latency > 0:
          heapq.heappush(later, (clock() - t0 + w.turns[k].tool_latency, w.wid * 4096 + k, w,
                                 k + 1))
        else:
          send(w, k + 1)
      else:
        wf_done[w.wid] = clock() - t0 - w.arrival
  duration = clock() - t0
  if bar is not None:
    bar.close()
  m = compute_metrics(records, duration)
  m.update(workflow_metrics(list(wf_done.values()), duration))
  # steady state: workflows that arrived in the middle 80% of the arrival span (no warm-up, no
  # drain); unfinished ones there count as failures
  if order:
    lo, hi = order[len(order) // 10].arrival, order[(9 * len(order)) // 10].arrival
    mid = [w for w in order if lo <= w.arrival <= hi]
    lat = [wf_done[w.wid] for w in mid if w.wid in wf_done]
    steady = workflow_metrics(lat, duration)
    m.update({f"steady_{k}": v for k, v in steady.items() if "latency" in k})
    m["steady_workflows"] = len(mid)
    m["steady_failed_workflows"] = len(mid) - len(lat)
  st = engine.stats
  snap = engine.snapshot()
  m.update({
      "failed_workflows": len(wf_failed),
      "prefix_hit_rate": st.hit_rate(),
      "prefill_tokens_computed": st.prefill_tokens_computed,
      "prompt_tokens": st.prompt_tokens,
      "cached_prompt_tokens": st.cached_prompt_tokens,
      "peak_kv_bytes": st.peak_pages_used * engine.bytes_per_page(),
      "kv_budget_bytes": snap["pages_capacity"] * snap["bytes_per_page"],
      "pages_evicted": snap["pages_evicted"],
      "preemptions": st.preemptions,
      "engine_steps": st.steps,
      "retention_hits": snap.get("retention_hits", 0),
      "retention_reclaimed": snap.get("retention_reclaimed", 0),
      "retention_expired": snap.get("retention_expired", 0),
  })
  return m


# ------------------------------------------------------------------------------ sweeps
def load_serving_adapters(cfg, base, mode: str, n: int, adapters_dir=None, seed: int = 0):
  """``n`` distinct adapters for ``mode``: the trained ones shipped in ``adapters_dir``
  (``<task>-icarus_lora`` / ``<task>-lora``) first, then random non-zero ones to reach ``n``.

  Returns ``(adapters, sources)``.
  """
  from pathlib import Path

  import jax

  from icarus_jax.model.adapters import init_adapter
  from icarus_jax.checkpoints.assets import DEFAULT_ADAPTERS
  from icarus_jax.model.params import base_fingerprint
  from icarus_jax.checkpoints.peft_io import load_adapter
  kind = "icarus_lora" if mode == "icarus" else "lora"
  d = Path(adapters_dir) if adapters_dir else DEFAULT_ADAPTERS
  fp = base_fingerprint(cfg, base)
  found = sorted(p for p in d.glob(f"*-{kind}") if (p / "adapter_config.json").exists()) if d.exists() else []
  ads, src = [], []
  for p in found[:n]:
    ad = load_adapter(p, kind=kind)
    if ad.config.base_fingerprint == fp:
      ads.append(ad.replace(name=p.name))
      src.append(f"trained: {p.name}")
  i = 0
  while len(ads) < n:
    ads.append(init_adapter(cfg, jax.random.key(1000 + seed + i), name=f"random{i}-{kind}", kind=kind,
                            base_params=base, rank=16, alpha=32, b_std=0.02))
    src.append(f"random init (non-zero B): random{i}-{kind}")
    i += 1
  return ads, src


def plot_sweep(results: list[dict], path, title: str) -> None:
  """P95 workflow latency and workflow throughput vs rate, one line per (mode, N)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  keys = sorted({(r["mode"], r["num_models"]) for r in results}, key=lambda k: (k[1], k[0]))
  for mode, n in keys:
    rs = sorted([r for r in results if r["mode"] == mode and r["num_models"] == n],
                key=lambda r: r["request_rate"])
    style = "-" if mode == "icarus" else "--"
    x = [r["request_rate"] for r in rs]
    axes[0].plot(x, [r["p95_workflow_latency_ms"] / 1e3 for r in rs], style, marker="o",
                 label=f"{mode} N={n}")
    axes[1].plot(x, [r["workflow_throughput"] for r in rs], style, marker="o", label=f"{mode} N={n}")
  axes[0].set_ylabel("P95 workflow latency (s)")
  axes[1].set_ylabel("workflow throughput (workflows/s)")
  for ax in axes:
    ax.set_xlabel("arrival rate (workflows/s)")
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  axes[1].legend(fontsize=7, ncol=2)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
