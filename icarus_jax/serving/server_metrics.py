"""Prometheus metrics of the server: counters and histograms fed when a request finishes,
gauges read from the engine's snapshot (through the async loop, never the engine's fields).
Models are labelled by the names the API uses (the base by ``base_name``), and finish reasons
are what the client saw (a stop string ends a request as "stop", see ``Engine.abort``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from icarus_jax.serving.async_engine import AsyncEngine
from icarus_jax.serving.engine import RequestOutput


class ServerMetrics:
  """Prometheus metrics: counters/histograms fed on finish, gauges read from the snapshot."""

  LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

  def __init__(self, aengine: AsyncEngine, base_name: str = "base"):
    self.base_name = base_name
    self.registry = CollectorRegistry()
    r = self.registry
    self.requests = Counter("icarus_requests", "Finished requests.", ["model", "finish_reason"],
                            registry=r)
    self.http_errors = Counter("icarus_http_errors", "Error responses.", ["status"], registry=r)
    self.prompt_tokens = Counter("icarus_prompt_tokens", "Prompt tokens.", ["model"], registry=r)
    self.cached_tokens = Counter("icarus_cached_prompt_tokens",
                                 "Prompt tokens served from the prefix cache.", ["model"],
                                 registry=r)
    self.gen_tokens = Counter("icarus_generation_tokens", "Generated tokens.", ["model"],
                              registry=r)
    self.e2e = Histogram("icarus_e2e_request_latency_seconds", "Arrival to last token.",
                         ["model"], buckets=self.LAT_BUCKETS, registry=r)
    self.ttft = Histogram("icarus_time_to_first_token_seconds", "Arrival to first token.",
                          ["model"], buckets=self.LAT_BUCKETS, registry=r)
    self.tpot = Histogram("icarus_time_per_output_token_seconds", "Mean gap between tokens.",
                          ["model"], buckets=self.LAT_BUCKETS, registry=r)
    self.aengine = aengine
    r.register(self)  # custom collector for the engine gauges
    aengine.on_finish(self.observe)

  def observe(self, out: RequestOutput) -> None:
    model = out.adapter or self.base_name
    self.requests.labels(model, out.finish_reason or "unknown").inc()
    self.prompt_tokens.labels(model).inc(len(out.prompt_tokens))
    self.cached_tokens.labels(model).inc(out.num_cached_tokens)
    self.gen_tokens.labels(model).inc(len(out.output_tokens))
    if out.finish_time is not None:
      self.e2e.labels(model).observe(out.finish_time - out.arrival_time)
    if out.first_token_time is not None:
      self.ttft.labels(model).observe(out.first_token_time - out.arrival_time)
    if len(out.token_times) > 1:
      self.tpot.labels(model).observe((out.token_times[-1] - out.token_times[0])
                                      / (len(out.token_times) - 1))

  def collect(self):
    s = self.aengine.snapshot()
    def gauge(name, doc, value):
      g = GaugeMetricFamily(name, doc)
      g.add_metric([], value)
      return g
    yield gauge("icarus_kv_pages_used", "KV pages allocated (incl. idle cached).", s["pages_used"])
    yield gauge("icarus_kv_pages_free", "KV pages free.", s["pages_free"])
    yield gauge("icarus_kv_pages_total", "KV pages in the pool.", s["pages_capacity"])
    yield gauge("icarus_kv_pages_cached_idle", "Cached pages no request holds (evictable).",
                s["pages_cached_idle"])
    yield gauge("icarus_requests_running", "Requests running.", s["running"])
    yield gauge("icarus_requests_waiting", "Requests waiting.", s["waiting"])
    yield gauge("icarus_preemptions", "Preemptions so far.", s["preemptions"])
    yield gauge("icarus_engine_steps", "Engine steps so far.", s["steps"])
    yield gauge("icarus_engine_step_errors", "Engine steps that raised.", s["step_errors"])
    hit = GaugeMetricFamily("icarus_prefix_cache_hit_rate",
                            "Cached / prompt tokens per model since start.", labels=["model"])
    for name, d in sorted(s["per_adapter"].items(), key=lambda kv: str(kv[0])):
      hit.add_metric([name or self.base_name], d["cached_tokens"] / max(1, d["prompt_tokens"]))
    hit.add_metric(["__all__"], s["cached_prompt_tokens"] / max(1, s["prompt_tokens"]))
    yield hit
