"""Tool-call parsing (Hermes blocks, Llama-3 JSON), plain and streamed at every split point: the
streamed content plus the calls equal the one-shot parse, and text that is not a call is never
lost."""

import json

import pytest

from icarus_jax.serving.tool_calls import ToolCallStream, parse_tool_calls, parser_for

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
TWO = CALL + "\n" + CALL.replace("Oslo", "Lima").replace("get_weather", "get_time")


def args(c):
  return json.loads(c["function"]["arguments"])


@pytest.mark.parametrize("text,content,names", [
    (CALL, "", ["get_weather"]),
    ("Let me check. " + CALL, "Let me check.", ["get_weather"]),
    (TWO, "", ["get_weather", "get_time"]),
    ("no call here", "no call here", []),
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ("a <tool_call>\n{\"name\": \"f\", \"arguments\": {}}", "a", ["f"]),  # unterminated at eos
    ("x < y and <b>", "x < y and <b>", []),
])
def test_hermes(text, content, names):
  got_content, calls = parse_tool_calls(text, "hermes")
  assert got_content == content and [c["function"]["name"] for c in calls] == names
  assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
  if names:
    assert args(calls[0]) in ({"city": "Oslo"}, {})


def test_llama3_json():
  content, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Oslo"}}',
                                    "llama3_json")
  assert content == "" and calls[0]["function"]["name"] == "get_weather"
  assert args(calls[0]) == {"city": "Oslo"}
  content, calls = parse_tool_calls('<|python_tag|>{"name": "a", "parameters": {}}; '
                                    '{"name": "b", "parameters": {"x": 1}}', "llama3_json")
  assert [c["function"]["name"] for c in calls] == ["a", "b"]
  assert parse_tool_calls("The weather is fine.", "llama3_json") == ("The weather is fine.", [])
  assert parse_tool_calls('{"oops": 1}', "llama3_json") == ('{"oops": 1}', [])


@pytest.mark.parametrize("parser,text", [
    ("hermes", "Checking the weather now. " + TWO + " done"),
    ("hermes", "plain answer with a < sign and <tool"),
    ("hermes", "Sure: " + CALL),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
    ("llama3_json", "It is sunny."),
])
def test_streamed_equals_one_shot_at_every_split(parser, text):
  want_content, want_calls = parse_tool_calls(text, parser)
  for cut in range(len(text) + 1):
    for step in (1, 3):
      s = ToolCallStream(parser)
      sent = s.feed(text[:cut])
      for i in range(cut, len(text), step):
        sent += s.feed(text[i:i + step])
      rest, calls = s.finish()
      sent += rest
      assert [(c["function"]["name"], args(c)) for c in calls] == \
          [(c["function"]["name"], args(c)) for c in want_calls]
      assert sent.strip() == want_content.strip()
      if not want_calls:
        assert sent == text  # nothing the model wrote is lost


def test_parser_for_templates():
  assert parser_for(None) == "hermes"
  assert parser_for("{{ '<tool_call>' }}") == "hermes"
  assert parser_for('{"name": function name, "parameters": ...} <|eot_id|>') == "llama3_json"
