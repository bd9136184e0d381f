"""Routing policies over ICaRus replicas on Ray Serve, measured through the HTTP ingress.

    python -m benchmarks.replicas --replicas=2 --rates=0.5,2 --out=docs/results/replicas.json

For each engine mode (icarus, isolated) and routing policy (context, model, pow2), deploys the
Ray app (``icarus_jax/serving/ray_app.py``) with ``--replicas`` replicas of the embedded model
on a local Ray cluster, sends the agentic workload (workflows of ``--turns`` agents, each turn a
different model round-robin, one shared system prompt and a per-workflow task context, each
turn's output and a tool observation appended for the next agent) at each rate, and reports:
prompt-cache hit rate (cached / prompt tokens), prefill tokens computed (prompt - cached), P95
workflow latency, workflow throughput, and load imbalance (most requests on one replica / mean).
The replicas share this machine's cores, so latencies are contention-bound; the cache columns
do not depend on the machine.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("replicas", 2, "Engine replicas.")
flags.DEFINE_list("rates", ["0.5", "2"], "Workflow arrival rates (workflows/s).")
flags.DEFINE_list("policies", ["context", "model", "pow2"], "Routing policies.")
flags.DEFINE_list("modes", ["icarus", "isolated"], "Engine modes.")
flags.DEFINE_integer("workflows", 8, "Workflows per point.")
flags.DEFINE_integer("turns", 4, "Agents (turns) per workflow.")
flags.DEFINE_integer("models", 4, "Models (adapters) the turns cycle through.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("out", "docs/results/replicas.json", "Output JSON (and .table.md).")
flags.DEFINE_bool("measure", True, "Measure on local Ray replicas (the embedded model).")
flags.DEFINE_list("project_replicas", ["8", "32"], "PROJECTION: replica counts priced by the "
                  "roofline runner (Llama-3.1-8B, one H100 per replica, the agentic workload); "
                  "empty: none.")
flags.DEFINE_float("project_rate_per_replica", 0.25, "PROJECTION: workflows/s per replica.")
flags.DEFINE_integer("project_workflows_per_replica", 4, "PROJECTION: workflows per replica.")

WORDS = ("pear apple fig plum kiwi lime date yuzu sloe akee "
         "bean corn kale leek okra pea rice sago taro yam").split()


def workflow_messages(rng: random.Random, system: str) -> list[dict]:
  task = " ".join(rng.choice(WORDS) for _ in range(40))
  return [{"role": "system", "content": system},
          {"role": "user", "content": f"Task: sort and count these words: {task}"}]


async def run_point(port: int, models: list[str], rate: float, workflows: int, turns: int,
                    seed: int) -> dict:
  import httpx
  rng = random.Random(seed)
  system = "You are one agent of a team; the team shares this briefing. " * 7
  starts = []
  t = 0.0
  for _ in range(workflows):
    starts.append(t)
    t += rng.expovariate(rate)
  per_replica: dict[str, int] = {}
  totals = {"prompt": 0, "cached": 0, "failed": 0}
  lat = []

  async def one(client, k: int, start: float, t0: float):
    await asyncio.sleep(max(0.0, t0 + start - time.perf_counter()))
    wrng = random.Random(seed * 1000 + k)
    msgs = workflow_messages(wrng, system)
    begin = time.perf_counter()
    for turn in range(turns):
      model = models[(k + turn) % len(models)]
      r = await client.post("/v1/chat/completions", json={
          "model": model, "messages": msgs, "max_tokens": 8, "temperature": 0})
      if r.status_code != 200:
        totals["failed"] += 1
        return
      body = r.json()
      rep = r.headers.get("x-icarus-replica", "?")
      per_replica[rep] = per_replica.get(rep, 0) + 1
      totals["prompt"] += body["usage"]["prompt_tokens"]
      totals["cached"] += body["usage"]["prompt_tokens_details"]["cached_tokens"]
      obs = " ".join(wrng.choice(WORDS) for _ in range(8))
      msgs = msgs + [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"Observation: {obs}. Next agent."}]
    lat.append(time.perf_counter() - begin)

  async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
    t0 = time.perf_counter()
    await asyncio.gather(*(one(client, k, s, t0) for k, s in enumerate(starts)))
    wall = time.perf_counter() - t0
  lat.sort()
  counts = list(per_replica.values())
  return {"rate": rate, "workflows": workflows, "completed": len(lat),
          "failed_requests": totals["failed"],
          "prompt_tokens": totals["prompt"], "cached_tokens": totals["cached"],
          "prefill_tokens": totals["prompt"] - totals["cached"],
          "cache_hit_rate": round(totals["cached"] / max(1, totals["prompt"]), 4),
          "p95_workflow_latency_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3)
          if lat else None,
          "workflow_throughput": round(len(lat) / wall, 4),
          "requests_per_replica": per_replica,
          "load_imbalance": round(max(counts) / (sum(counts) / len(counts)), 3) if counts else None}


def project(n: int, mode: str, policy: str, seed: int) -> dict:
  """PROJECTION: ``n`` replicas (Llama-3.1-8B, one H100 each, the KV budget ``kv_budget`` gives)
  behind ``policy``, the agentic workload (8 models round-robin) at
  ``--project_rate_per_replica`` x n workflows/s."""
  from icarus_jax.bench.harness import run_workflows
  from icarus_jax.bench.replica_set import ReplicaSet
  from icarus_jax.bench.workload import AgentWorkloadConfig, generate_agent_workflows
  from icarus_jax.model.adapters import Adapter, AdapterConfig
  from icarus_jax.model.config import ModelConfig
  from icarus_jax.serving.cost_model import HARDWARE, kv_budget
  cfg, hw = ModelConfig.from_preset("llama-3.1-8b"), HARDWARE["h100"]
  names = [f"model{i}" for i in range(8)]
  kind = "icarus_lora" if mode == "icarus" else "lora"
  ads = [Adapter({}, AdapterConfig(name=nm, kind=kind)) for nm in names]
  rs = ReplicaSet(cfg, hw, n, policy, ads, seed=seed, mode=mode,
                  num_pages=kv_budget(cfg, hw, adapter_slots=8).kv_pages + 1, max_adapters=8,
                  page_size=16, max_batch=64, prefill_chunk=2048, max_seq_len=32768)
  wl = generate_agent_workflows(AgentWorkloadConfig(
      num_workflows=FLAGS.project_workflows_per_replica * n, num_models=8,
      request_rate=FLAGS.project_rate_per_replica * n, seed=seed))
  r = run_workflows(rs, wl, names)
  snap = rs.snapshot()
  return {"mode": mode, "policy": policy, "replicas": n, "PROJECTION": True,
          "prefix_hit_rate": r["prefix_hit_rate"],
          "prefill_tokens": r["prefill_tokens_computed"],
          "p95_workflow_latency_s": round(r["p95_workflow_latency_ms"] / 1e3, 3),
          "workflow_throughput": round(r["workflow_throughput"], 4),
          "load_imbalance": round(snap["load_imbalance"], 3), "completed": r["completed"]}


def main(argv):
  del argv
  if not FLAGS.measure:
    return write(measured=[], projected=run_projection())
  import httpx
  import ray
  from ray import serve
  from tqdm.auto import tqdm

  from icarus_jax.serving.engine_config import EngineConfig
  from icarus_jax.serving.ray_app import build_app
  from icarus_jax.serving.server_builder import ServerSpec
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  ray.init(num_cpus=max(8, 2 * FLAGS.replicas + 2), include_dashboard=False,
           log_to_driver=False)
  serve.start(http_options={"host": "127.0.0.1", "port": port})
  points = []
  combos = [(m, p) for m in FLAGS.modes for p in FLAGS.policies]
  for mode, policy in tqdm(combos, desc="deployments"):
    spec = ServerSpec(engine=EngineConfig(mode=mode, num_pages=256, max_batch=8,
                                          prefill_chunk=64))
    serve.run(build_app(spec, num_replicas=FLAGS.replicas, router=policy,
                        replica_options={"ray_actor_options": {"num_cpus": 1}}),
              name="icarus", route_prefix="/")
    models = [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models",
                                         timeout=120).json()["data"]][1:1 + FLAGS.models]
    # compile every replica's programs before timing: a warm-up point at the first rate
    asyncio.run(run_point(port, models, float(FLAGS.rates[0]), 2 * FLAGS.replicas, FLAGS.turns,
                          FLAGS.seed + 99))
    for k, rate in enumerate(FLAGS.rates):  # new task contexts per point (the replicas' caches
      # keep the earlier points' workflows; only the shared system prompt carries over)
      r = asyncio.run(run_point(port, models, float(rate), FLAGS.workflows, FLAGS.turns,
                                FLAGS.seed + k))
      r.update(mode=mode, policy=policy, replicas=FLAGS.replicas)
      points.append(r)
      tqdm.write(json.dumps(r))
    serve.delete("icarus")
  serve.shutdown()
  ray.shutdown()
  write(measured=points, projected=run_projection())


def run_projection() -> list[dict]:
  from tqdm.auto import tqdm
  todo = [(int(n), m, p) for n in FLAGS.project_replicas for m in FLAGS.modes
          for p in FLAGS.policies]
  return [project(n, m, p, FLAGS.seed) for n, m, p in tqdm(todo, desc="projection")]


def write(measured: list[dict], projected: list[dict]) -> None:
  out = Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"config": {k: FLAGS[k].value for k in (
      "replicas", "rates", "workflows", "turns", "models", "seed", "project_replicas",
      "project_rate_per_replica", "project_workflows_per_replica")},
      "points": measured, "projection": projected}, indent=1) + "\n")
  rows = ["| mode | policy | rate (/s) | cache hit rate | prefill tokens | P95 workflow (s) | "
          "workflows/s | load imbalance | failed |", "| --- " * 9 + "|"]
  for r in measured:
    rows.append(f"| {r['mode']} | {r['policy']} | {r['rate']} | {r['cache_hit_rate']:.2f} | "
                f"{r['prefill_tokens']} | {r['p95_workflow_latency_s']} | "
                f"{r['workflow_throughput']:.3f} | {r['load_imbalance']} | "
                f"{r['failed_requests']} |")
  rows += ["", "PROJECTION (roofline runner, Llama-3.1-8B, one H100 per replica, agentic "
           "workload, 8 models):", "",
           "| replicas | mode | policy | prefix hit rate | prefill tokens | P95 workflow (s) | "
           "workflows/s | load imbalance |", "| --- " * 8 + "|"]
  for r in projected:
    rows.append(f"| {r['replicas']} | {r['mode']} | {r['policy']} | {r['prefix_hit_rate']:.2f} "
                f"| {r['prefill_tokens']} | {r['p95_workflow_latency_s']} | "
                f"{r['workflow_throughput']:.3f} | {r['load_imbalance']} |")
  out.with_suffix(".table.md").write_text("\n".join(rows) + "\n")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
