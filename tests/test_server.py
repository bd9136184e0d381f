"""OpenAI-compatible server: a real uvicorn server on 127.0.0.1, spoken to over HTTP.

Outputs are compared token for token with the engine called directly (greedy), reuse is read
from ``usage.prompt_tokens_details.cached_tokens``, and page accounting from the server's own
engine after disconnects and unloads.
"""

import asyncio
import json
import threading
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

from icarus_jax import init_adapter, init_base_params, save_adapter, tiny_config
from icarus_jax.serving.async_engine import AsyncEngine
from icarus_jax.model.chat_template import ChatTemplate
from icarus_jax.serving.engine import Engine
from icarus_jax.serving.sampling import SamplingParams
from icarus_jax.serving.server import create_app
from icarus_jax.model.tokenizer import ByteTokenizer

from conftest import free_port, healthy as _health, serving, wait_for

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PS = 8
ENGINE_KW = dict(page_size=PS, max_batch=32, prefill_chunk=32, num_pages=400, max_adapters=10)



@pytest.fixture(scope="module")
def models(tiny):
  cfg, params = tiny
  ads = [init_adapter(cfg, jax.random.key(70 + i), name=f"agent{i}", base_params=params, rank=4,
                      b_std=0.05) for i in range(8)]
  return cfg, params, ads


@pytest.fixture(scope="module")
def server(models):
  cfg, params, ads = models
  tok = ByteTokenizer()
  eng = Engine(cfg, params, tokenizer=tok, **ENGINE_KW)
  for a in ads:
    eng.add_adapter(a)
  aeng = AsyncEngine(eng).start()
  app = create_app(aeng, tok, base_name="tiny-base", api_key=KEY, allow_runtime_lora=True)
  with serving(app) as port:
    yield dict(url=f"http://127.0.0.1:{port}", engine=eng, aengine=aeng, tok=tok)
  aeng.shutdown()


@pytest.fixture(scope="module")
def direct(models):
  """The engine called directly (a separate instance with the same adapters)."""
  cfg, params, ads = models
  eng = Engine(cfg, params, tokenizer=ByteTokenizer(), **ENGINE_KW)
  for a in ads:
    eng.add_adapter(a)

  def run(prompts, adapters, max_tokens):
    sp = SamplingParams(max_tokens=max_tokens, stop_token_ids=(ByteTokenizer().eos_id,))
    return [o.output_tokens for o in eng.generate(prompts, adapters, sp)]
  return run


def post(server, path, body, headers=AUTH, timeout=120):
  return httpx.post(server["url"] + path, json=body, headers=headers, timeout=timeout)


def sse_events(resp):
  out = []
  for line in resp.iter_lines():
    if line.startswith("data: "):
      data = line[len("data: "):]
      out.append(data if data == "[DONE]" else json.loads(data))
  return out


def no_live_pages(eng) -> bool:
  """Every allocated page is idle cache (evictable); no request holds one."""
  return (not eng.running and not eng.waiting
          and eng.pages_used() == eng.cache.num_unreferenced())


def test_models_health_and_metrics(server):
  r = httpx.get(server["url"] + "/v1/models", headers=AUTH)
  assert r.status_code == 200
  data = r.json()["data"]
  assert [m["id"] for m in data] == ["tiny-base"] + [f"agent{i}" for i in range(8)]
  assert data[0]["parent"] is None and all(m["parent"] == "tiny-base" for m in data[1:])
  assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
  m = httpx.get(server["url"] + "/metrics").text
  for name in ("icarus_kv_pages_used", "icarus_kv_pages_free", "icarus_preemptions",
               "icarus_requests_running", "icarus_prefix_cache_hit_rate"):
    assert name in m


def test_completion_and_streamed_chat_equal_direct_engine(server, direct):
  tok = server["tok"]
  rng = np.random.RandomState(0)
  names = ["tiny-base"] + [f"agent{i}" for i in range(8)]
  prompts = ["".join(chr(97 + c) for c in rng.randint(0, 26, 5 + 3 * i)) for i in range(9)]
  want = direct([tok.encode(p) for p in prompts], [None] + names[1:], 8)
  chat_ids = ChatTemplate(tok).encode([{"role": "user", "content": "hello there"}])
  want_chat = direct([chat_ids] * 9, [None] + names[1:], 6)
  assert len({tuple(w) for w in want_chat}) > 1  # adapters really differ
  for name, p, w, wc in zip(names, prompts, want, want_chat):
    r = post(server, "/v1/completions", dict(model=name, prompt=p, max_tokens=8, temperature=0,
                                             return_token_ids=True))
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["token_ids"] == w, name
    assert c["text"] == tok.decode(w)
    assert r.json()["usage"]["completion_tokens"] == len(w)
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json=dict(model=name, messages=[{"role": "user", "content": "hello there"}],
                                max_tokens=6, temperature=0, stream=True,
                                return_token_ids=True,
                                stream_options={"include_usage": True})) as resp:
      assert resp.status_code == 200
      assert resp.headers["content-type"].startswith("text/event-stream")
      ev = sse_events(resp)
    assert ev[-1] == "[DONE]"
    ids = [t for e in ev[:-1] for ch in e["choices"] for t in ch.get("token_ids", [])]
    text = "".join(ch["delta"].get("content", "") for e in ev[:-1] for ch in e["choices"])
    assert ids == wc, name
    assert text == tok.decode(wc)
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    assert ev[-2]["usage"]["completion_tokens"] == len(wc)


def test_cross_adapter_reuse_shows_in_usage(server):
  context = "shared context for every agent: " + "x" * 40
  r1 = post(server, "/v1/completions", dict(model="agent1", prompt=context, max_tokens=2,
                                            temperature=0))
  r2 = post(server, "/v1/completions", dict(model="agent5", prompt=context + " next?",
                                            max_tokens=2, temperature=0))
  assert r1.status_code == r2.status_code == 200
  cached = r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
  assert cached == (len(context) // PS) * PS  # every full page of agent1's prompt is reused
  # Another tenant (cache salt) shares nothing; the same tenant again does.
  r3 = post(server, "/v1/completions", dict(model="agent5", prompt=context, max_tokens=2,
                                            cache_salt="tenant-b"))
  assert r3.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
  r4 = post(server, "/v1/completions", dict(model="agent2", prompt=context, max_tokens=2),
            headers={**AUTH, "X-Cache-Salt": "tenant-b"})
  assert r4.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


@pytest.mark.parametrize("body,raw,status,match", [
    (dict(model="nope", prompt="hi"), None, 404, "does not exist"),
    (None, b'{"model": "agent0", "prompt": ', 400, "malformed JSON"),
    (dict(model="agent0"), None, 400, "prompt: Field required"),
    (dict(model="agent0", prompt="hi", max_tokens="many"), None, 400, "max_tokens"),
    (dict(model="agent0", prompt="hi", temperature=-1), None, 400, "temperature"),
    (dict(model="agent0", prompt="x" * 600), None, 400, "context"),
    (dict(model="agent0", prompt=[1, 2, 99999]), None, 400, "token ids must be in"),
])
def test_errors_in_openai_format(server, body, raw, status, match):
  url = server["url"] + "/v1/completions"
  if raw is not None:
    r = httpx.post(url, content=raw, headers={**AUTH, "content-type": "application/json"})
  else:
    r = httpx.post(url, json=body, headers=AUTH)
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert set(err) >= {"message", "type", "param", "code"}
  assert match in err["message"]
  # The server stays up and serves others.
  ok = post(server, "/v1/completions", dict(model="agent0", prompt="still up?", max_tokens=2))
  assert ok.status_code == 200


def test_defaults_and_error_codes_clients_rely_on(server):
  """No max_tokens: the rest of the context (OpenAI / vLLM), not 16; ``developer`` is the system
  role; a context overflow says ``context_length_exceeded`` in ``code``."""
  eng = server["engine"]
  msgs = [{"role": "user", "content": "go on"}]
  r = post(server, "/v1/chat/completions", dict(model="agent1", messages=msgs, temperature=0,
                                                ignore_eos=True)).json()
  prompt = r["usage"]["prompt_tokens"]
  assert r["usage"]["completion_tokens"] == eng.max_request_tokens - prompt > 16
  assert r["choices"][0]["finish_reason"] == "length"
  as_system = post(server, "/v1/chat/completions", dict(
      model="agent1", messages=[{"role": "system", "content": "be brief"}] + msgs, max_tokens=6,
      temperature=0)).json()
  as_developer = post(server, "/v1/chat/completions", dict(
      model="agent1", messages=[{"role": "developer", "content": "be brief"}] + msgs,
      max_tokens=6, temperature=0)).json()
  # the same prompt: same length, same answer, and served from the system prompt's cache pages
  assert as_developer["usage"]["prompt_tokens"] == as_system["usage"]["prompt_tokens"]
  assert as_developer["usage"]["prompt_tokens_details"]["cached_tokens"] >= (
      as_system["usage"]["prompt_tokens"] - PS)
  assert as_developer["choices"][0]["message"] == as_system["choices"][0]["message"]
  over = post(server, "/v1/completions", dict(model="agent1", prompt="x" * 20,
                                              max_tokens=eng.max_seq_len))
  assert over.status_code == 400
  assert over.json()["error"]["code"] == "context_length_exceeded"
  assert over.json()["error"]["param"] == "max_tokens"


def test_api_key_required(server):
  for headers in ({}, {"Authorization": "Bearer wrong"}):
    r = httpx.post(server["url"] + "/v1/completions", headers=headers,
                   json=dict(model="agent0", prompt="hi"))
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
  assert httpx.get(server["url"] + "/health").status_code == 200


def test_chat_validation_and_stop_and_n(server):
  r = post(server, "/v1/chat/completions", dict(model="agent0", messages=[]))
  assert r.status_code == 400
  r = post(server, "/v1/chat/completions",
           dict(model="agent0", messages=[{"role": "wizard", "content": "x"}]))
  assert r.status_code == 400
  free = post(server, "/v1/completions", dict(model="agent3", prompt="abc", max_tokens=12,
                                              temperature=0, ignore_eos=True)).json()
  text = free["choices"][0]["text"]
  assert len(text) >= 4
  stop = text[2:4]
  r = post(server, "/v1/completions", dict(model="agent3", prompt="abc", max_tokens=12,
                                           temperature=0, ignore_eos=True, stop=[stop])).json()
  assert r["choices"][0]["text"] == text[:text.find(stop)]
  assert r["choices"][0]["finish_reason"] == "stop"
  # /metrics records what the client saw: a stop string is a "stop" (not an abort), and the
  # base has its API name
  post(server, "/v1/completions", dict(model="tiny-base", prompt="abc", max_tokens=2))
  m = httpx.get(server["url"] + "/metrics").text
  assert 'icarus_requests_total{finish_reason="stop",model="agent3"}' in m
  assert 'finish_reason="abort",model="agent3"' not in m
  assert 'model="tiny-base"' in m and "__base__" not in m
  r = post(server, "/v1/completions", dict(model="agent3", prompt="abc", max_tokens=8, n=3,
                                           temperature=1.0, seed=5, return_token_ids=True))
  choices = r.json()["choices"]
  assert [c["index"] for c in choices] == [0, 1, 2]
  assert len({tuple(c["token_ids"]) for c in choices}) > 1  # seeds seed, seed+1, seed+2
  again = post(server, "/v1/completions", dict(model="agent3", prompt="abc", max_tokens=8, n=3,
                                               temperature=1.0, seed=5, return_token_ids=True))
  assert [c["token_ids"] for c in again.json()["choices"]] == [c["token_ids"] for c in choices]


def test_logprobs_penalties_and_bias_plain_and_streamed(server, models):
  """Chat and completions logprobs equal the engine's (numpy-checked in test_sampler), streamed
  == not streamed; text offsets add up; a +100 logit_bias forces its token; penalties change the
  output; bad values are 400s naming the field."""
  cfg, params, ads = models
  tok, eng = server["tok"], server["engine"]
  msgs = [{"role": "user", "content": "count with me"}]
  body = dict(model="agent4", messages=msgs, max_tokens=6, temperature=0, ignore_eos=True,
              logprobs=True, top_logprobs=3)
  r = post(server, "/v1/chat/completions", body).json()
  content = r["choices"][0]["logprobs"]["content"]
  assert len(content) == r["usage"]["completion_tokens"] == 6
  assert "".join(c["token"] for c in content) == r["choices"][0]["message"]["content"]
  for c in content:
    assert len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["token"] == c["token"]  # greedy
    assert c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"])
    assert c["logprob"] <= 0 and c["bytes"] == list(c["token"].encode())
  # the engine's own numbers for the same prompt
  direct = Engine(cfg, params, tokenizer=tok, **ENGINE_KW)
  direct.add_adapter(ads[4])
  from icarus_jax.model.chat_template import ChatTemplate as _CT
  out = direct.generate([_CT(tok).encode(msgs)], ["agent4"],
                        SamplingParams(max_tokens=6, logprobs=3))[0]
  assert [c["logprob"] for c in content] == pytest.approx([e.logprob for e in out.logprobs],
                                                          abs=1e-5)
  with httpx.stream("POST", server["url"] + "/v1/chat/completions", headers=AUTH, timeout=60,
                    json=dict(body, stream=True)) as resp:
    events = sse_events(resp)
  streamed = [c for e in events[:-1] for ch in e["choices"]
              for c in (ch.get("logprobs") or {}).get("content", [])]
  assert streamed == content
  # completions: logprobs is the count
  cbody = dict(model="agent2", prompt="abc", max_tokens=5, temperature=0, ignore_eos=True,
               logprobs=2)
  c = post(server, "/v1/completions", cbody).json()["choices"][0]
  lp = c["logprobs"]
  assert "".join(lp["tokens"]) == c["text"] and len(lp["token_logprobs"]) == 5
  assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]
  assert all(len(d) <= 2 for d in lp["top_logprobs"])
  with httpx.stream("POST", server["url"] + "/v1/completions", headers=AUTH, timeout=60,
                    json=dict(cbody, stream=True)) as resp:
    parts = [ch["logprobs"] for e in sse_events(resp)[:-1] for ch in e["choices"]
             if ch.get("logprobs")]
  assert sum((p["token_logprobs"] for p in parts), []) == lp["token_logprobs"]
  assert sum((p["text_offset"] for p in parts), []) == lp["text_offset"]
  # logit_bias forces a token; a repetition penalty changes a greedy answer
  forced = tok.encode("Z")[-1]
  r = post(server, "/v1/completions", dict(model="agent2", prompt="abc", max_tokens=4,
                                           temperature=0, ignore_eos=True, return_token_ids=True,
                                           logit_bias={str(forced): 100})).json()
  assert r["choices"][0]["token_ids"] == [forced] * 4
  plain = post(server, "/v1/completions", dict(model="agent2", prompt="abab" * 4, max_tokens=12,
                                               temperature=0, ignore_eos=True)).json()
  pen = post(server, "/v1/completions", dict(model="agent2", prompt="abab" * 4, max_tokens=12,
                                             temperature=0, ignore_eos=True,
                                             repetition_penalty=50.0, frequency_penalty=2.0,
                                             presence_penalty=2.0)).json()
  assert pen["choices"][0]["text"] != plain["choices"][0]["text"]
  for bad, param in [(dict(top_logprobs=2), "top_logprobs"), (dict(logprobs=21), "logprobs"),
                     (dict(logit_bias={"x": 1}), "logit_bias"),
                     (dict(logit_bias={"99999": 1}), "logit_bias"),
                     (dict(logit_bias={"3": 500}), "logit_bias"),
                     (dict(presence_penalty=3), "presence_penalty"), (dict(min_p=2), "min_p"),
                     (dict(logprobs=2, echo=True), "echo")]:
    r = post(server, "/v1/completions", dict(model="agent2", prompt="abc", max_tokens=2, **bad))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["city", "year", "tags"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}}, "required": ["city"],
        "additionalProperties": False}}},
         {"type": "function", "function": {
             "name": "clock", "parameters": {"type": "object", "properties": {
                 "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                 "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def long_server():
  """The tiny random base with a 1,536-token context (tool definitions take ~750 byte tokens)."""
  from icarus_jax import tiny_config
  cfg = tiny_config(max_seq_len=1536)
  params = init_base_params(cfg, jax.random.key(3), scale=0.1)
  tok = ByteTokenizer()
  eng = Engine(cfg, params, tokenizer=tok, page_size=16, max_batch=8, prefill_chunk=64,
               num_pages=600)
  aeng = AsyncEngine(eng).start()
  with serving(create_app(aeng, tok, base_name="agent1", api_key=KEY)) as port:
    yield dict(url=f"http://127.0.0.1:{port}", engine=eng)
  aeng.shutdown()


def test_structured_outputs_and_forced_tool_calls(long_server):
  """Even a random tiny model: json_schema outputs parse and validate (sampled, several seeds),
  json_object is an object, tool_choice required / named always yields a valid call (plain and
  streamed); bad specs are 400s."""
  jsonschema = pytest.importorskip("jsonschema")
  server = long_server
  msgs = [{"role": "user", "content": "where and when?"}]
  body = dict(model="agent1", messages=msgs, max_tokens=120, temperature=1.0, seed=3, n=4,
              response_format={"type": "json_schema",
                               "json_schema": {"name": "place", "schema": SCHEMA}})
  r = post(server, "/v1/chat/completions", body).json()
  for c in r["choices"]:
    assert c["finish_reason"] == "stop", c
    jsonschema.validate(json.loads(c["message"]["content"]), SCHEMA)
  r = post(server, "/v1/chat/completions", dict(
      model="agent1", messages=msgs, max_tokens=120, temperature=0.7, seed=1,
      response_format={"type": "json_object"})).json()
  c = r["choices"][0]
  assert c["finish_reason"] == "stop" and isinstance(json.loads(c["message"]["content"]), dict)
  r = post(server, "/v1/completions", dict(
      model="agent1", prompt="json:", max_tokens=120, temperature=1.0, seed=2,
      response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})).json()
  jsonschema.validate(json.loads(r["choices"][0]["text"]), SCHEMA)
  for choice, names in (("required", {"weather", "clock"}),
                        ({"type": "function", "function": {"name": "clock"}}, {"clock"})):
    kw = dict(model="agent1", messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=150,
              temperature=1.0, seed=7, parallel_tool_calls=False)
    r = post(server, "/v1/chat/completions", kw)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "tool_calls", c
    calls = c["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] in names
    tool = next(t for t in TOOLS if t["function"]["name"] == calls[0]["function"]["name"])
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]),
                        tool["function"]["parameters"])
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json=dict(kw, stream=True)) as resp:
      events = sse_events(resp)[:-1]
    streamed = [tc for e in events for ch in e["choices"]
                for tc in ch["delta"].get("tool_calls", [])]
    assert [tc["function"] for tc in streamed] == [calls[0]["function"]]  # same seed, same call
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
  for bad, param in [
      (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
       "response_format"),
      (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": 5}}}),
       "response_format"),
      (dict(response_format={"type": "yaml"}), "response_format"),
      (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
       "tool_choice"),
      (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
       "response_format")]:
    r = post(server, "/v1/chat/completions", dict(model="agent1", messages=msgs, **bad))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_batched_completion_prompts(server):
  """A list of prompts (strings or token lists): choice ``p * n + i`` answers prompt ``p``,
  equal to that prompt sent alone; usage adds up; streamed the same."""
  body = dict(model="agent6", max_tokens=5, temperature=0, ignore_eos=True)
  singles = [post(server, "/v1/completions", dict(body, prompt=p)).json()
             for p in ("first prompt", "second")]
  r = post(server, "/v1/completions", dict(body, prompt=["first prompt", "second"], n=2)).json()
  assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
  assert [c["text"] for c in r["choices"]] == [singles[0]["choices"][0]["text"]] * 2 + [
      singles[1]["choices"][0]["text"]] * 2
  assert r["usage"]["prompt_tokens"] == sum(x["usage"]["prompt_tokens"] for x in singles)
  assert r["usage"]["completion_tokens"] == 20
  ids = server["tok"].encode("second")
  t = post(server, "/v1/completions", dict(body, prompt=[ids, ids[:3]])).json()
  assert t["choices"][0]["text"] == singles[1]["choices"][0]["text"]
  with httpx.stream("POST", server["url"] + "/v1/completions", headers=AUTH, timeout=60,
                    json=dict(body, prompt=["first prompt", "second"], stream=True)) as resp:
    events = sse_events(resp)
  texts = {}
  for e in events[:-1]:
    for c in e["choices"]:
      texts[c["index"]] = texts.get(c["index"], "") + c["text"]
  assert texts == {0: singles[0]["choices"][0]["text"], 1: singles[1]["choices"][0]["text"]}


@pytest.mark.parametrize("model", ["agent1", "agent5"])
def test_streamed_text_with_stop_strings_equals_non_streamed(server, model):
  """Stop strings spanning several tokens (the byte tokenizer: every character is 1-4 tokens),
  at several offsets, plus one whose prefix ends the output (held back, then released): the
  concatenated stream equals the non-streamed text, which ends right before the stop."""
  body = dict(model=model, prompt="stream me", max_tokens=24, temperature=0, ignore_eos=True)
  free = post(server, "/v1/completions", body).json()["choices"][0]["text"]
  clean = free.replace("\ufffd", "")
  assert len(clean) >= 8, free
  stops = [clean[i:i + 3] for i in (1, 4)] + [[clean[2:4], clean[5:8]], clean[-2:] + "\u00e9\u4e2d"]

  def streamed(extra):
    with httpx.stream("POST", server["url"] + "/v1/completions", headers=AUTH, timeout=60,
                      json={**body, **extra, "stream": True}) as resp:
      assert resp.status_code == 200
      ev = sse_events(resp)
    assert ev[-1] == "[DONE]"
    return ("".join(ch["text"] for e in ev[:-1] for ch in e["choices"]),
            [ch["finish_reason"] for e in ev[:-1] for ch in e["choices"] if ch["finish_reason"]])

  for stop in stops:
    whole = post(server, "/v1/completions", {**body, "stop": stop}).json()["choices"][0]
    text, finish = streamed({"stop": stop})
    assert text == whole["text"], (stop, text, whole["text"])
    assert finish == [whole["finish_reason"]]
    cut = [free.find(s) for s in ([stop] if isinstance(stop, str) else stop) if free.find(s) >= 0]
    assert whole["text"] == (free[:min(cut)] if cut else free), stop
    assert whole["finish_reason"] == ("stop" if cut else "length")
  assert streamed({})[0] == free


def test_256_concurrent_requests_over_8_adapters(server, direct):
  rng = np.random.RandomState(1)
  tok = server["tok"]
  prompts = ["".join(chr(97 + c) for c in rng.randint(0, 26, rng.randint(3, 30)))
             for _ in range(256)]
  adapters = [f"agent{i % 8}" for i in range(256)]
  want = direct([tok.encode(p) for p in prompts], adapters, 6)

  async def go():
    limits = httpx.Limits(max_connections=256)
    async with httpx.AsyncClient(base_url=server["url"], headers=AUTH, limits=limits,
                                 timeout=300) as client:
      async def one(i):
        r = await client.post("/v1/completions", json=dict(
            model=adapters[i], prompt=prompts[i], max_tokens=6, temperature=0,
            return_token_ids=True, user=f"req{i}"))
        return r
      return await asyncio.gather(*(one(i) for i in range(256)))

  t0 = time.time()
  resps = asyncio.run(go())
  elapsed = time.time() - t0
  assert all(r.status_code == 200 for r in resps), [r.text for r in resps if r.status_code != 200]
  bodies = [r.json() for r in resps]
  assert len({b["id"] for b in bodies}) == 256  # none duplicated
  for i, b in enumerate(bodies):
    assert b["model"] == adapters[i]
    assert b["choices"][0]["token_ids"] == want[i], i
  assert wait_for(lambda: no_live_pages(server["engine"]))
  print(f"256 requests in {elapsed:.1f}s")


def test_disconnect_mid_stream_frees_pages(server, monkeypatch):
  eng, aeng = server["engine"], server["aengine"]
  aborting = threading.Event()
  step, abort = eng.step, aeng.abort

  def step_or_wait_for_the_abort():
    # Near its end, hold the engine thread until the server has asked for the abort, so the
    # request cannot run to its end first (the server buffers ahead of a slow reader: on loaded
    # cores it once finished all its tokens and nothing was left to abort).
    if any(s.adapter == "agent2" and s.num_output >= 400 for s in eng.running):
      aborting.wait(60)
    return step()

  def abort_seen(rid, reason="abort"):
    aborting.set()
    return abort(rid, reason)

  monkeypatch.setattr(eng, "step", step_or_wait_for_the_abort)
  monkeypatch.setattr(aeng, "abort", abort_seen)
  try:
    with httpx.stream("POST", server["url"] + "/v1/completions", headers=AUTH, timeout=60,
                      json=dict(model="agent2", prompt="tell me a long story", max_tokens=480,
                                ignore_eos=True, stream=True)) as resp:
      assert resp.status_code == 200
      n = 0
      for line in resp.iter_lines():
        if line.startswith("data: "):
          n += 1
        if n >= 3:
          break
  except BaseException:
    aborting.set()  # do not leave the engine thread waiting
    raise
  # Client gone: the request is aborted and every page it held is released.
  assert wait_for(lambda: no_live_pages(eng)), (len(eng.running), eng.pages_used())
  m = httpx.get(server["url"] + "/metrics").text
  assert 'icarus_requests_total{finish_reason="abort",model="agent2"}' in m


def test_unload_while_running_then_reload(server, models, tmp_path):
  cfg, params, ads = models
  url = server["url"]

  async def go():
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
      running = [asyncio.create_task(client.post("/v1/completions", json=dict(
          model="agent7", prompt=f"job {i}", max_tokens=30, ignore_eos=True,
          temperature=0))) for i in range(4)]
      assert await asyncio.to_thread(wait_for, lambda: len(server["engine"].running) >= 1, 10)
      r = await client.post("/v1/unload_lora_adapter", json=dict(lora_name="agent7"))
      assert r.status_code == 200, r.text
      late = await client.post("/v1/completions", json=dict(model="agent7", prompt="late"))
      return await asyncio.gather(*running), late

  done, late = asyncio.run(go())
  assert late.status_code == 404 and late.json()["error"]["param"] == "model"
  for r in done:  # in flight when unloaded: they finish
    assert r.status_code == 200
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 30
  ids = [m["id"] for m in httpx.get(url + "/v1/models", headers=AUTH).json()["data"]]
  assert "agent7" not in ids
  assert post(server, "/v1/unload_lora_adapter", dict(lora_name="agent7")).status_code == 404
  # Reload from disk (PEFT layout): gate and fingerprint are checked.
  save_adapter(ads[7], tmp_path / "agent7")
  r = post(server, "/v1/load_lora_adapter", dict(lora_name="agent7b",
                                                 lora_path=str(tmp_path / "agent7")))
  assert r.status_code == 200, r.text
  r = post(server, "/v1/completions", dict(model="agent7b", prompt="back", max_tokens=3))
  assert r.status_code == 200  # usable right after the load returns
  r = post(server, "/v1/load_lora_adapter", dict(lora_name="agent7b",
                                                 lora_path=str(tmp_path / "agent7")))
  assert r.status_code == 400 and "already registered" in r.json()["error"]["message"]
  other = init_base_params(tiny_config(), jax.random.key(99), scale=0.1)
  foreign = init_adapter(cfg, jax.random.key(5), name="foreign", base_params=other, rank=4)
  save_adapter(foreign, tmp_path / "foreign")
  r = post(server, "/v1/load_lora_adapter", dict(lora_name="foreign",
                                                 lora_path=str(tmp_path / "foreign")))
  assert r.status_code == 400 and "trained on base" in r.json()["error"]["message"]
  conv = init_adapter(cfg, jax.random.key(6), name="conv", kind="lora", base_params=params)
  save_adapter(conv, tmp_path / "conv")
  r = post(server, "/v1/load_lora_adapter", dict(lora_name="conv",
                                                 lora_path=str(tmp_path / "conv")))
  assert r.status_code == 400
  r = post(server, "/v1/load_lora_adapter", dict(lora_name="x", lora_path="/does/not/exist"))
  assert r.status_code == 400


def test_openai_python_client(server, direct):
  openai = pytest.importorskip("openai")
  client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY)
  assert "agent4" in [m.id for m in client.models.list()]
  c = client.completions.create(model="agent4", prompt="hello", max_tokens=5, temperature=0)
  want = direct([server["tok"].encode("hello")], ["agent4"], 5)[0]
  assert c.choices[0].text == server["tok"].decode(want)
  chunks = list(client.chat.completions.create(
      model="agent4", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True))
  assert chunks[-1].choices[0].finish_reason in ("length", "stop")
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="missing", prompt="x")


@pytest.mark.slow
def test_launch_serve_subprocess(tmp_path):
  """The absl entry point on the embedded default base and shipped adapters, sharded over a
  2x2 mesh of forced CPU devices (``--mesh`` goes through ``sharding.shard_engine``), adapters
  registered by path over 2 device slots and 1 host copy."""
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "ICARUS_API_KEY": "k",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  root = Path(__file__).resolve().parents[1]
  proc = subprocess.Popen([sys.executable, "-m", "launch.serve", f"--port={port}",
                           "--max_batch=4", "--kv_pages=64", "--log_level=warning",
                           "--mesh=data:2,model:2", "--max_adapters=2",
                           "--max_host_adapters=1"], cwd=root,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: _health(url), 120), proc.stdout.read() if proc.poll() else "timeout"
    h = {"Authorization": "Bearer k"}
    ids = [m["id"] for m in httpx.get(url + "/v1/models", headers=h).json()["data"]]
    # every shipped adapter is listed though 2 fit on device and 1 in host memory (disk tier)
    assert ids[0] == "base" and len(ids) >= 5 and "sorting-icarus_lora" in ids
    r = httpx.post(url + "/v1/completions", headers=h, timeout=120,
                   json=dict(model="sorting-icarus_lora", prompt="3 1 2", max_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 5
    m = httpx.get(url + "/metrics").text
    assert "icarus_requests_total" in m
  finally:
    proc.terminate()
    proc.wait(30)
