"""The server under hostile input and engine failure: a real uvicorn server on 127.0.0.1.

* A sweep of malformed / hostile requests: each gets a 4xx with an OpenAI error body (never a
  5xx), on the *same* keep-alive connection (the socket survives every one), while well-formed
  requests run concurrently and produce exactly the tokens they produce alone; afterwards no KV
  page is held by any request.
* Runtime adapter loading is off unless enabled, and confined to allowed roots.
* A dead engine thread: waiting clients get an error, ``/health`` turns 503, new requests are
  refused with 503; nobody hangs.
"""

import http.client
import json
import threading
import time

import httpx
import jax
import pytest

from icarus_jax import init_adapter, save_adapter
from icarus_jax.serving.async_engine import AsyncEngine
from icarus_jax.serving.engine import Engine
from icarus_jax.serving.server import create_app
from icarus_jax.model.tokenizer import ByteTokenizer

from conftest import serving, wait_for

PS = 8
ENGINE_KW = dict(page_size=PS, max_batch=16, prefill_chunk=32, num_pages=200, max_adapters=4)


@pytest.fixture(scope="module")
def hardened(tiny, tmp_path_factory):
  cfg, params = tiny
  root = tmp_path_factory.mktemp("adapters")
  outside = tmp_path_factory.mktemp("elsewhere")
  ads = [init_adapter(cfg, jax.random.key(80 + i), name=f"agent{i}", base_params=params, rank=4,
                      b_std=0.05) for i in range(2)]
  save_adapter(ads[1], root / "agent1")
  save_adapter(ads[1], outside / "agent1")
  tok = ByteTokenizer()
  eng = Engine(cfg, params, tokenizer=tok, **ENGINE_KW)
  eng.add_adapter(ads[0])
  aeng = AsyncEngine(eng).start()
  app = create_app(aeng, tok, base_name="tiny-base", allow_runtime_lora=True,
                   lora_roots=[str(root)])
  with serving(app) as port:
    yield dict(port=port, engine=eng, root=root, outside=outside)
  aeng.shutdown()


def request(conn, path, body=None, raw=None):
  data = raw if raw is not None else json.dumps(body).encode()
  conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
  r = conn.getresponse()
  return r.status, r.read()


BIG = "y" * (2 * 1024 * 1024)
C, CH = "/v1/completions", "/v1/chat/completions"
HOSTILE = [
    (C, dict(model="agent0", prompt="hi", seed=2**80)),
    (C, dict(model="agent0", prompt="hi", seed=-2**80)),
    (C, dict(model="agent0", prompt="hi", top_k=2**40)),
    (C, dict(model="agent0", prompt="hi", temperature="hot")),
    (C, dict(model="agent0", prompt="hi", temperature=1e308)),
    (C, dict(model="agent0", prompt="hi", top_p=0)),
    (C, dict(model="agent0", prompt="hi", top_p=2)),
    (C, dict(model="agent0", prompt="hi", max_tokens=-5)),
    (C, dict(model="agent0", prompt="hi", max_tokens=10**30)),
    (C, dict(model="agent0", prompt="hi", n=0)),
    (C, dict(model="agent0", prompt="hi", n=1000)),
    (C, dict(model="agent0", prompt="hi", stop_token_ids=[2**40])),
    (C, dict(model="agent0", prompt="hi", stop="")),
    (C, dict(model="agent0", prompt=[-1])),
    (C, dict(model="agent0", prompt=[2**63])),
    (C, dict(model="agent0", prompt=[])),
    (C, dict(model="agent0", prompt="")),
    (C, dict(model="agent0", prompt=BIG)),
    (C, dict(model="agent0", prompt=[[1, 2], "mixed"])),
    (C, dict(model="agent0", prompt=["a"] * 200, n=2)),
    (C, dict(model="agent0", prompt={"a": 1})),
    (C, dict(model="agent0", prompt="\ud800 hi")),
    (C, dict(model="agent0", prompt="hi", cache_salt="\udfff")),
    (C, dict(model="agent0", prompt="hi", logprobs=50)),
    (C, dict(model="agent0", prompt="hi", logit_bias={"1": float("inf")})),
    (C, dict(model="agent0", prompt="hi", stream_options="yes", stream=True)),
    (C, dict(model="", prompt="hi")),
    (C, dict(model="../../etc/passwd", prompt="hi")),
    (C, dict(model=12, prompt="hi")),
    (C, dict(model="m" * 10000, prompt="hi")),
    (C, None, b'{"model": "agent0", "prompt": "hi", "temperature": NaN}'),
    (C, None, b'{"model": "agent0", "prompt": '),
    (C, None, b'[]'),
    (C, None, b'\xff\xfe not json'),
    (CH, dict(model="agent0", messages=[{"role": "user", "content": "\ud800 hi"}])),
    (CH, dict(model="agent0", messages=[])),
    (CH, dict(model="agent0", messages=[{"role": "wizard", "content": "hi"}])),
    (CH, dict(model="agent0", messages=[{"role": "user", "content": "hi"}], logprobs=True,
              top_logprobs=30)),
    (CH, dict(model="agent0", messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
    ("/v1/load_lora_adapter", "OUTSIDE"),
    ("/v1/load_lora_adapter", dict(lora_name="tiny-base", lora_path="ROOT")),
    ("/v1/load_lora_adapter", dict(lora_name="x", lora_path="ROOT/../../../etc")),
    ("/v1/load_lora_adapter", dict(lora_name="x", lora_path="ROOT/missing")),
    ("/v1/unload_lora_adapter", dict(lora_name="never-loaded")),
]


def test_hostile_inputs_get_4xx_on_a_live_connection_and_hurt_nobody(hardened):
  port, eng = hardened["port"], hardened["engine"]
  root, outside = str(hardened["root"]), str(hardened["outside"])
  url = f"http://127.0.0.1:{port}"
  good = [dict(model=m, prompt=f"good request {i}", max_tokens=24, temperature=0,
               ignore_eos=True) for i, m in enumerate(["agent0", "tiny-base"] * 2)]
  alone = [httpx.post(url + C, json=g, timeout=120).json()["choices"][0]["text"] for g in good]

  results = [None] * len(good)

  def run_good(i):
    results[i] = httpx.post(url + C, json=good[i], timeout=120).json()["choices"][0]["text"]

  threads = [threading.Thread(target=run_good, args=(i,)) for i in range(len(good))]
  for t in threads:
    t.start()
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  status, _ = request(conn, "/v1/completions", dict(model="agent0", prompt="warm", max_tokens=1))
  assert status == 200
  sock = conn.sock
  seen = []
  for case in HOSTILE:
    path, body = case[0], case[1]
    raw = case[2] if len(case) > 2 else None
    if body == "OUTSIDE":
      body = dict(lora_name="out", lora_path=f"{outside}/agent1")
    elif isinstance(body, dict) and isinstance(body.get("lora_path"), str):
      body = {**body, "lora_path": body["lora_path"].replace("ROOT", root)}
    status, data = request(conn, path, body, raw)
    seen.append(status)
    assert 400 <= status < 500, (case[:2] if raw is None else raw, status, data[:300])
    err = json.loads(data)["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"], err
    assert conn.sock is sock, f"connection dropped after {str(case)[:200]}"
  for t in threads:
    t.join(120)
  assert results == alone  # concurrent well-formed requests: same tokens as alone
  assert len(HOSTILE) >= 25 and 403 in seen and 404 in seen
  assert wait_for(lambda: not eng.running and not eng.waiting
                  and eng.pages_used() == eng.cache.num_unreferenced())
  # and the allowed root does load
  status, data = request(conn, "/v1/load_lora_adapter",
                         dict(lora_name="agent1", lora_path=f"{root}/agent1"))
  assert status == 200, data


def test_runtime_adapter_loading_is_off_by_default_and_dead_engine_answers(tiny):
  cfg, params = tiny
  tok = ByteTokenizer()
  eng = Engine(cfg, params, tokenizer=tok, **ENGINE_KW)
  aeng = AsyncEngine(eng).start()
  app = create_app(aeng, tok, base_name="tiny-base")

  class Crash(BaseException):  # escapes ``except Exception``, as a real fatal error would
    pass

  with serving(app) as port:
    url = f"http://127.0.0.1:{port}"
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
      r = httpx.post(url + path, json=dict(lora_name="a", lora_path="/tmp"))
      assert r.status_code == 403 and "--allow_runtime_lora" in r.json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 200
    step = eng.step

    def crash_after_prefill():
      step()
      raise Crash("device lost")
    eng.step = crash_after_prefill
    t0 = time.time()
    r = httpx.post(url + C, json=dict(model="tiny-base", prompt="hello", max_tokens=50), timeout=30)
    assert time.time() - t0 < 20
    assert r.status_code in (500, 503) and "device lost" in r.json()["error"]["message"]
    assert wait_for(lambda: not aeng.alive, 10)
    h = httpx.get(url + "/health")
    assert h.status_code == 503 and "device lost" in h.json()["error"]["message"]
    r = httpx.post(url + C, json=dict(model="tiny-base", prompt="again"), timeout=30)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    r = httpx.post(url + C, json=dict(model="tiny-base", prompt="again", stream=True), timeout=30)
    assert r.status_code == 503


@pytest.mark.slow
def test_fault_after_dispatch_fails_fast_through_the_subprocess_server():
  """A device fault after the KV pool was donated: every waiting client gets an error within a
  second, /health turns 503 with the reason, the next request is refused with 503, and the process
  exits with status 3 so a supervisor restarts it (before the fix the engine re-ran rows on the
  deleted pool, failed every later request and kept answering /health 200)."""
  import os
  import subprocess
  import sys
  from pathlib import Path

  from conftest import free_port
  root = Path(__file__).resolve().parents[1]
  port = free_port()
  proc = subprocess.Popen([sys.executable, "tests/fault_server.py", "3", f"--port={port}",
                           "--log_level=warning", "--kv_pages=64", "--adapters=",
                           "--exit_grace_s=3"], cwd=root,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"

  def ok():
    try:
      return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
      return False
  try:
    assert wait_for(ok, 180), proc.stdout.read() if proc.poll() is not None else "timeout"
    results = []

    def one(i):
      r = httpx.post(url + C, json=dict(model="base", prompt=f"hello {i}", max_tokens=40),
                     timeout=60)
      results.append((r.status_code, r.json(), time.time()))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    assert len(results) == 4
    assert all(s in (500, 503) and "KV pool" in body["error"]["message"]
               for s, body, _ in results), results
    assert max(t for *_, t in results) - min(t for *_, t in results) < 1.0  # all at once
    h = httpx.get(url + "/health", timeout=5)
    assert h.status_code == 503 and "KV pool" in h.json()["error"]["message"]
    r = httpx.post(url + C, json=dict(model="base", prompt="again", max_tokens=4), timeout=10)
    assert r.status_code == 503
    assert proc.wait(30) == 3
  finally:
    if proc.poll() is None:
      proc.terminate()
      proc.wait(30)
