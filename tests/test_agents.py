"""Agents end to end against the subprocess server: a three-agent workflow through the ``openai``
client (a tool-calling adapter fine-tuned from ``{messages, tools}`` data, two more adapters on the
same conversation), streamed and not, and the same tool agent driven by the OpenAI Agents SDK.

The tool agent is ``tests/fixtures/tool_agent`` (``make_tool_agent.py``): the embedded byte base
with an ICaRus-LoRA adapter that learned to call ``get_weather`` and then to answer from the
result, so what is checked here is the server's side (rendering tools and tool-call histories,
parsing calls, ``finish_reason``, cache sharing), with a real model behind it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "tool_agent"
ADAPTERS = ROOT / "icarus_jax" / "assets" / "adapters"
sys.path.insert(0, str(FIX.parent))
from make_tool_agent import TOOLS  # noqa: E402


def healthy(url):
  try:
    return httpx.get(url + "/health", timeout=2).status_code == 200
  except httpx.HTTPError:
    return False


@pytest.fixture(scope="module")
def server():
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", f"--port={port}", "--log_level=warning",
       "--kv_pages=256", "--page_size=16",
       f"--adapters={FIX},planner={ADAPTERS / 'sorting-icarus_lora'},"
       f"critic={ADAPTERS / 'reversal-icarus_lora'}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    assert wait_for(lambda: healthy(url), 180), proc.stdout.read() if proc.poll() else "timeout"
    yield url
  finally:
    proc.terminate()
    proc.wait(30)


def user(city):
  return [{"role": "user", "content": f"Weather in {city}?"}]


@pytest.mark.slow
def test_three_agent_workflow_with_a_tool(server):
  import openai
  client = openai.OpenAI(base_url=server + "/v1", api_key="none")
  assert {m.id for m in client.models.list()} >= {"weather_agent", "planner", "critic"}
  # agent 1 calls the tool (not streamed)
  r = client.chat.completions.create(model="weather_agent", messages=user("Oslo"), tools=TOOLS,
                                     temperature=0, max_tokens=120)
  ch = r.choices[0]
  assert ch.finish_reason == "tool_calls" and ch.message.content is None
  (call,) = ch.message.tool_calls
  assert call.type == "function" and call.function.name == "get_weather"
  assert set(json.loads(call.function.arguments)) == {"city"}
  # streamed: the same call arrives as delta.tool_calls, finish_reason tool_calls
  chunks = list(client.chat.completions.create(model="weather_agent", messages=user("Oslo"),
                                               tools=TOOLS, temperature=0, max_tokens=120,
                                               stream=True))
  deltas = [c.choices[0].delta for c in chunks if c.choices]
  streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
  assert [tc.function.name for tc in streamed] == ["get_weather"]
  assert json.loads(streamed[0].function.arguments) == json.loads(call.function.arguments)
  assert "".join(d.content or "" for d in deltas) == ""
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
  # the tool result goes back (assistant content null + tool_calls, then a tool message)
  history = user("Oslo") + [
      {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
      {"role": "tool", "tool_call_id": call.id, "content": "7 C"}]
  r2 = client.chat.completions.create(model="weather_agent", messages=history, tools=TOOLS,
                                      temperature=0, max_tokens=40)
  assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content
  assert not r2.choices[0].message.tool_calls
  assert "7 C" in r2.choices[0].message.content
  first_prompt = r2.usage.prompt_tokens
  # agents 2 and 3 read the same conversation: the tool agent's tokens are served from cache
  convo = history + [{"role": "assistant", "content": r2.choices[0].message.content},
                     {"role": "user", "content": "plan the trip"}]
  for model, stream in (("planner", False), ("critic", True)):
    kw = dict(model=model, messages=convo, tools=TOOLS, temperature=0, max_tokens=8)
    if stream:
      chunks = list(client.chat.completions.create(stream=True,
                                                   stream_options={"include_usage": True}, **kw))
      usage = chunks[-1].usage
    else:
      usage = client.chat.completions.create(**kw).usage
    print(f"{model}: first prompt {first_prompt}, prompt {usage.prompt_tokens}, cached "
          f"{usage.prompt_tokens_details.cached_tokens}")  # docs/agents.md quotes these
    assert usage.prompt_tokens > first_prompt
    assert usage.prompt_tokens_details.cached_tokens >= first_prompt - 16  # whole pages of it
  # tool_choice="required" is enforced by the grammar, for the base model too (never trained
  # on tools: left alone it answers in text)
  bounded = [{"type": "function", "function": {
      "name": "get_weather", "parameters": {"type": "object", "properties": {
          "city": {"type": "string", "maxLength": 12}}, "required": ["city"],
          "additionalProperties": False}}}]
  for model in ("weather_agent", "base"):
    r = client.chat.completions.create(model=model, messages=user("Oslo"), tools=bounded,
                                       tool_choice="required", max_tokens=120, temperature=1.0,
                                       seed=2)
    assert r.choices[0].message.tool_calls, (model, r.choices[0])
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
  # what is not implemented is refused by name, never ignored
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(model="weather_agent", messages=user("Oslo"), tools=TOOLS,
                                   max_tokens=4, response_format={"type": "json_object"},
                                   tool_choice="required")
  assert e.value.body["param"] == "response_format"


@pytest.mark.slow
def test_openai_agents_sdk_runs_the_tool_loop(server):
  agents = pytest.importorskip("agents")
  from agents import Agent, FunctionTool, ModelSettings, OpenAIChatCompletionsModel, Runner
  from agents import set_tracing_disabled
  from openai import AsyncOpenAI
  set_tracing_disabled(True)
  calls = []

  async def get_weather(ctx, args: str) -> str:
    calls.append(json.loads(args))
    return "7 C"
  fn = TOOLS[0]["function"]
  tool = FunctionTool(name=fn["name"], description=fn["description"],
                      params_json_schema=fn["parameters"], on_invoke_tool=get_weather,
                      strict_json_schema=False)
  model = OpenAIChatCompletionsModel(model="weather_agent",
                                     openai_client=AsyncOpenAI(base_url=server + "/v1",
                                                               api_key="none"))
  agent = Agent(name="weather", model=model, tools=[tool],
                model_settings=ModelSettings(temperature=0, max_tokens=120))
  result = Runner.run_sync(agent, "Weather in Oslo?", max_turns=3)
  assert len(calls) == 1 and set(calls[0]) == {"city"}   # the SDK ran our function
  assert "7 C" in result.final_output                    # and the model answered from its result
