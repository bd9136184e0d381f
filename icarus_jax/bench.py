"""Drives agentic workflows through an ``Engine`` and measures them (real or virtual time).

Each workflow's turn 0 is sent at the workflow's arrival time; turn k+1 is sent the moment
turn k finishes, with turn k's output (and the tool observation) in its prompt, to the model of
turn k+1. With a real engine, time is wall-clock (``time.perf_counter``) and idle gaps are
slept; with a simulated engine (``cost_model.RooflineSimulator``), time is virtual.
"""

from __future__ import annotations

import time

from icarus_jax.engine import Engine
from icarus_jax.errors import IcarusError
from icarus_jax.metrics import RequestRecord, compute_metrics, workflow_metrics
from icarus_jax.sampling import SamplingParams
from icarus_jax.workload import Workflow


def run_workflows(engine: Engine, workflows: list[Workflow], model_names: list[str | None], *,
                  progress: bool = False, desc: str = "") -> dict:
  """Runs every workflow to completion; returns vLLM-style metrics plus cache statistics."""
  simulated = engine.simulator is not None
  clock = engine.clock
  t0 = clock()
  order = sorted(workflows, key=lambda w: w.arrival)
  nxt = 0
  outputs: dict[int, list[list[int]]] = {}
  live: dict[int, tuple[Workflow, int, float]] = {}   # rid -> (workflow, turn, send time)
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
    try:
      rid = engine.submit(prompt, name, SamplingParams(max_tokens=t.max_tokens))
    except IcarusError:
      records.append(RequestRecord(len(prompt), 0, 0.0, 0.0, [], success=False, model=name))
      wf_failed.add(w.wid)
      if bar is not None:
        bar.update(len(w.turns) - k)
      return
    live[rid] = (w, k, clock())

  while nxt < len(order) or live:
    now = clock() - t0
    while nxt < len(order) and order[nxt].arrival <= now:
      w = order[nxt]
      outputs[w.wid] = []
      send(w, 0)
      nxt += 1
    if not engine.has_work:
      if nxt < len(order):
        wait = order[nxt].arrival - (clock() - t0)
        if simulated:
          clock.advance_to(t0 + order[nxt].arrival)
        elif wait > 0:
          time.sleep(wait)
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
        send(w, k + 1)
      else:
        wf_done[w.wid] = clock() - t0 - w.arrival
  duration = clock() - t0
  if bar is not None:
    bar.close()
  m = compute_metrics(records, duration)
  m.update(workflow_metrics(list(wf_done.values()), duration))
  st = engine.stats
  m.update({
      "failed_workflows": len(wf_failed),
      "prefix_hit_rate": st.hit_rate(),
      "prefill_tokens_computed": st.prefill_tokens_computed,
      "prompt_tokens": st.prompt_tokens,
      "cached_prompt_tokens": st.cached_prompt_tokens,
      "peak_kv_bytes": st.peak_pages_used * engine.bytes_per_page(),
      "kv_budget_bytes": engine.alloc.capacity * engine.bytes_per_page(),
      "pages_evicted": engine.cache.evicted_pages,
      "preemptions": st.preemptions,
      "engine_steps": st.steps,
  })
  return m
