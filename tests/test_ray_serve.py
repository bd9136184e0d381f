"""ICaRus replicas on Ray Serve (``icarus_jax/serving/ray_app.py``): a local Ray cluster started
in-process, 2 replicas of the embedded model, a 3-agent workflow (three adapters) sent through
the ingress. Context affinity keeps a workflow on one replica whatever the model, so the later
agents read the earlier turns from the cache; model affinity (the conventional multi-LoRA
routing) spreads it over replicas, which recompute it. Skipped only when Ray is not installed
(the test extra installs it)."""

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[serve]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")

SYSTEM = ("You are one agent of a team. Shared notes: the build uses jax; the cache is shared by "
          "every model of the team; keep answers short. ")


def _workflow(port: int, tag: str, models: list[str]) -> list[dict]:
  """Three agents in turn on one growing conversation; returns per turn: replica, prompt and
  cached tokens."""
  import httpx
  messages = [{"role": "system", "content": SYSTEM * 3},
              {"role": "user", "content": f"Task {tag}: sort these words: pear apple fig {tag}"}]
  turns = []
  for model in models:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                   json={"model": model, "messages": messages, "max_tokens": 4,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    usage = body["usage"]
    turns.append({"replica": r.headers["x-icarus-replica"],
                  "prompt_tokens": usage["prompt_tokens"],
                  "cached": usage["prompt_tokens_details"]["cached_tokens"]})
    messages = messages + [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                           {"role": "user", "content": f"next agent, continue task {tag}"}]
  return turns


def _streamed_turn(port: int, names: list[str], replica: str) -> None:
  """A streamed turn of workflow "alpha" through the ingress: routed to the replica that holds
  its context, SSE chunks as the app sends them, the same text as not streamed, usage with the
  cached context; a streamed request for an unknown model is a 404 JSON body."""
  import json

  import httpx
  messages = [{"role": "system", "content": SYSTEM * 3},
              {"role": "user", "content": "Task alpha: sort these words: pear apple fig alpha"}]
  body = {"model": names[1], "messages": messages, "max_tokens": 6, "temperature": 0,
          "ignore_eos": True}
  url = f"http://127.0.0.1:{port}/v1/chat/completions"
  plain = httpx.post(url, json=body, timeout=120).json()
  with httpx.stream("POST", url, json={**body, "stream": True,
                                       "stream_options": {"include_usage": True}},
                    timeout=120) as r:
    assert r.status_code == 200 and r.headers["x-icarus-replica"] == replica
    lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
  assert lines[-1] == "[DONE]"
  events = [json.loads(x) for x in lines[:-1]]
  text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
  assert text == plain["choices"][0]["message"]["content"]
  assert len([e for e in events if e["choices"]]) >= 3  # the role chunk, tokens, the finish
  usage = events[-1]["usage"]
  assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 16
  bad = httpx.post(url, json={**body, "model": "nope", "stream": True}, timeout=120)
  assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"


@pytest.fixture(scope="module")
def cluster():
  import socket

  from ray import serve
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
  serve.start(http_options={"host": "127.0.0.1", "port": port})
  yield port
  serve.shutdown()
  ray.shutdown()


def _deploy(router: str):
  from ray import serve

  from icarus_jax.serving.engine_config import EngineConfig
  from icarus_jax.serving.ray_app import build_app
  from icarus_jax.serving.server_builder import ServerSpec
  # few buckets (each replica compiles its own programs): 2 rows, 256-token chunks, page tables
  # of 32 or 64 pages
  spec = ServerSpec(base=None, engine=EngineConfig(num_pages=128, max_batch=2, prefill_chunk=256,
                                                   min_page_bucket=32))
  serve.run(build_app(spec, num_replicas=2, router=router,
                      replica_options={"ray_actor_options": {"num_cpus": 1}}),
            name="icarus", route_prefix="/")


def test_context_affinity_keeps_a_workflow_on_one_replica_model_affinity_does_not(cluster):
  import time

  import httpx
  port = cluster
  _deploy("context")
  names = [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models",
                                      timeout=120).json()["data"]][1:4]
  assert len(names) == 3, names
  ctx = [_workflow(port, tag, names) for tag in ("alpha", "beta")]
  for turns in ctx:
    assert len({t["replica"] for t in turns}) == 1, turns  # every turn on one replica
    for prev, t in zip(turns, turns[1:]):  # the later agents read the earlier turns' pages
      assert t["cached"] >= prev["prompt_tokens"] - 16, turns
  _streamed_turn(port, names, ctx[0][0]["replica"])
  # model affinity: each model's requests go where that model was loaded; a 3-model workflow
  # spreads over the 2 replicas, which recompute its context
  _deploy("model")
  for name in names:  # each model loaded somewhere, and the replicas report it
    httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
               json={"model": name, "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 1})
  time.sleep(2.0)
  mdl = [_workflow(port, tag, names) for tag in ("gamma", "delta")]
  assert any(len({t["replica"] for t in turns}) > 1 for turns in mdl), mdl
  cached = lambda runs: sum(t["cached"] for turns in runs for t in turns[1:])  # noqa: E731
  assert cached(mdl) < cached(ctx), (ctx, mdl)


def test_bad_input_and_unknown_router():
  from icarus_jax.serving.ray_app import build_app, context_keys
  from icarus_jax.serving.server_builder import ServerSpec
  with pytest.raises(ValueError, match="router='nearest' is unknown; accepted"):
    build_app(ServerSpec(), router="nearest")
  # session keys ignore the model (ICaRus) unless the engine is isolated
  a = {"model": "a", "user": "s1", "messages": []}
  b = {"model": "b", "user": "s1", "messages": []}
  assert context_keys(a) == context_keys(b)
  assert context_keys(a, include_model=True) != context_keys(b, include_model=True)
  # prefix keys: a longer conversation extends the shorter one's chain
  short = {"messages": [{"role": "user", "content": "x" * 200}]}
  long = {"messages": [{"role": "user", "content": "x" * 200},
                       {"role": "assistant", "content": "y" * 100}]}
  ks, kl = context_keys(short), context_keys(long)
  assert len(ks) == 3 and kl[:len(ks)] == ks and len(kl) > len(ks)


def test_a_replica_killed_mid_request_fails_it_clearly_and_the_rest_goes_on(cluster):
  """The in-flight request of a killed replica gets a 503 that says what happened (not retried:
  it may have produced tokens); the session's next requests are served by a live replica."""
  import concurrent.futures

  import httpx
  port = cluster
  _deploy("context")
  url = f"http://127.0.0.1:{port}/v1/chat/completions"

  def ask(max_tokens: int):
    return httpx.post(url, timeout=120, json={
        "model": "base", "user": "session-1", "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": "tell me a long story about a cache"}]})

  first = ask(2)
  assert first.status_code == 200, first.text
  victim = first.headers["x-icarus-replica"]
  names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
           if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(victim)]
  assert len(names) == 1, names
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    inflight = pool.submit(ask, 900)  # long enough to be killed mid-decode
    import time
    time.sleep(1.5)
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
    r = inflight.result()
  assert r.status_code == 503, r.text
  assert "not retried" in r.json()["error"]["message"]
  after = [ask(2) for _ in range(3)]
  assert all(a.status_code == 200 for a in after), [a.text for a in after]
  assert all(a.headers["x-icarus-replica"] != victim for a in after)
