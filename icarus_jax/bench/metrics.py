"""Serving metrics with vLLM's names and JSON keys (``vllm bench serve``), plus workflow metrics.

Definitions (as vLLM): TTFT = first token time - send time; E2EL = finish - send;
ITL = gaps between consecutive tokens; TPOT = (E2EL - TTFT) / (output_len - 1), for requests
with more than one output token. Percentiles use ``numpy.percentile`` (linear interpolation).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np


@dataclasses.dataclass
class RequestRecord:
  input_len: int
  output_len: int
  ttft: float           # seconds
  latency: float        # seconds (E2EL)
  itl: list[float]      # seconds
  success: bool = True
  model: str | None = None


def _pkey(p: float) -> str:
  return str(int(p)) if int(p) == p else str(p)


def _stats(name: str, values_s: Sequence[float], percentiles: Iterable[float]) -> dict:
  v = np.asarray(values_s, np.float64) * 1000.0
  if v.size == 0:
    v = np.zeros(1)
  out = {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
         f"std_{name}_ms": float(v.std())}
  for p in percentiles:
    out[f"p{_pkey(p)}_{name}_ms"] = float(np.percentile(v, p))
  return out


def compute_metrics(records: Sequence[RequestRecord], duration_s: float, *,
                    percentiles: Sequence[float] = (50, 95, 99)) -> dict:
  """vLLM ``BenchmarkMetrics`` fields for a finished run of ``duration_s`` seconds."""
  ok = [r for r in records if r.success]
  total_in = sum(r.input_len for r in ok)
  total_out = sum(r.output_len for r in ok)
  tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
  itls = [x for r in ok for x in r.itl]
  d = max(duration_s, 1e-9)
  m = {
      "duration": duration_s,
      "completed": len(ok),
      "failed": len(records) - len(ok),
      "total_input_tokens": total_in,
      "total_output_tokens": total_out,
      "request_throughput": len(ok) / d,
      "output_throughput": total_out / d,
      "total_token_throughput": (total_in + total_out) / d,
  }
  for name, vals in (("ttft", [r.ttft for r in ok]), ("tpot", tpots), ("itl", itls),
                     ("e2el", [r.latency for r in ok])):
    m.update(_stats(name, vals, percentiles))
  return m


def workflow_metrics(latencies_s: Sequence[float], duration_s: float,
                     percentiles: Sequence[float] = (50, 95, 99)) -> dict:
  """End-to-end workflow latency (arrival -> last turn done) and workflow throughput."""
  m = {"completed_workflows": len(latencies_s),
       "workflow_throughput": len(latencies_s) / max(duration_s, 1e-9)}
  m.update(_stats("workflow_latency", latencies_s, percentiles))
  return m
