"""Tool calls in generated text -> OpenAI ``tool_calls``, per model family, plain and streamed.

Formats (``parser_for(template)`` picks one from the chat template's text):

* ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks, any
  number, after optional text (Qwen2.5 / Qwen3, Hermes models, and this project's default
  rendering for templates without tools: SmolLM2, the byte model);
* ``llama3_json``: the whole answer is ``{"name": ..., "parameters": {...}}`` (several calls
  separated by ``;``), optionally after ``<|python_tag|>`` (Llama-3.1 / 3.2 JSON tool calling).

``ToolCallStream`` is the streaming form: text deltas in, content deltas out as long as they
cannot be the start of a call; calls come out whole when the generation ends (one
``delta.tool_calls`` entry per call, which every OpenAI client accumulates like fragments).
Text that looks like a call but does not parse stays content: nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import uuid

from icarus_jax.model.chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

PARSERS = ("hermes", "llama3_json")


def parser_for(template: str | None) -> str:
  """The tool-call format a chat template teaches (``hermes`` when it says nothing)."""
  if template and TOOL_CALL_OPEN not in template and (
      "<|python_tag|>" in template or '"parameters"' in template):
    return "llama3_json"
  return "hermes"


def _call(name, args) -> dict | None:
  if not isinstance(name, str) or not name or not isinstance(args, dict):
    return None
  return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
          "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _hermes(text: str) -> tuple[str, list[dict]]:
  calls, content, pos = [], [], 0
  while True:
    start = text.find(TOOL_CALL_OPEN, pos)
    if start < 0:
      content.append(text[pos:])
      break
    end = text.find(TOOL_CALL_CLOSE, start)
    body = text[start + len(TOOL_CALL_OPEN):end if end >= 0 else len(text)]
    try:
      obj = json.loads(body.strip())
      call = _call(obj.get("name"), obj.get("arguments", {})) if isinstance(obj, dict) else None
    except json.JSONDecodeError:
      call = None
    if call is None:  # not a call after all: keep it as text
      content.append(text[pos:end + len(TOOL_CALL_CLOSE) if end >= 0 else len(text)])
    else:
      content.append(text[pos:start])
      calls.append(call)
    if end < 0:
      break
    pos = end + len(TOOL_CALL_CLOSE)
  return "".join(content), calls


def _llama3_json(text: str) -> tuple[str, list[dict]]:
  body = text.strip()
  if body.startswith("<|python_tag|>"):
    body = body[len("<|python_tag|>"):]
  calls = []
  for part in (p for p in body.split(";") if p.strip()):
    try:
      obj = json.loads(part)
    except json.JSONDecodeError:
      return text, []
    call = _call(obj.get("name"), obj.get("parameters", obj.get("arguments", {}))) \
        if isinstance(obj, dict) else None
    if call is None:
      return text, []
    calls.append(call)
  return ("", calls) if calls else (text, [])


def parse_tool_calls(text: str, parser: str = "hermes") -> tuple[str, list[dict]]:
  """``(content, calls)``: the text outside tool calls and the calls in OpenAI form."""
  if parser not in PARSERS:
    raise ValueError(f"unknown tool-call parser {parser!r}; accepted: {PARSERS}")
  content, calls = _raw(text, parser)
  return (content.strip() if calls else content), calls


def _raw(text: str, parser: str) -> tuple[str, list[dict]]:
  return _hermes(text) if parser == "hermes" else _llama3_json(text)


class ToolCallStream:
  """Incremental parsing: ``feed(delta) -> content to send now``; ``finish() -> (rest, calls)``."""

  def __init__(self, parser: str = "hermes"):
    if parser not in PARSERS:
      raise ValueError(f"unknown tool-call parser {parser!r}; accepted: {PARSERS}")
    self.parser = parser
    self.text = ""      # everything generated
    self.sent = 0       # characters released as content
    self.holding = False

  def _safe_end(self) -> int:
    """How far the text can be released: up to a (possible) call start."""
    t = self.text
    if self.parser == "llama3_json":
      s = t.lstrip()
      if not s or s[0] in "{<":  # may be a JSON call: hold everything until the end
        return self.sent
      return len(t)
    i = t.find(TOOL_CALL_OPEN, self.sent)
    if i >= 0:
      return i
    # hold back a suffix that could begin "<tool_call>"
    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(t) - self.sent), 0, -1):
      if TOOL_CALL_OPEN.startswith(t[len(t) - k:]):
        return len(t) - k
    return len(t)

  def feed(self, delta: str) -> str:
    self.text += delta
    if self.holding:
      return ""
    end = self._safe_end()
    if self.parser == "hermes" and self.text.find(TOOL_CALL_OPEN, self.sent) >= 0:
      self.holding = True
    out, self.sent = self.text[self.sent:end], max(self.sent, end)
    return out

  def finish(self) -> tuple[str, list[dict]]:
    """The content not yet sent and the calls (empty when the tail is plain text)."""
    content, calls = _raw(self.text, self.parser)
    if not calls:
      rest, self.sent = self.text[self.sent:], len(self.text)
      return rest, []
    # what was streamed is text before the first call, so a prefix of ``content``
    rest, self.sent = content[self.sent:], len(self.text)
    return rest.rstrip(), calls
