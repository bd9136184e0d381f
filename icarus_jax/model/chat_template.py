"""Chat messages -> token ids, for serving (the prompt) and for training (prompt + answer + mask).

One renderer serves both: ``encode(messages, tools)`` is the prompt the server sends a model, and
``encode_training(messages, tools)`` builds a training example whose every prompt prefix is
exactly that ``encode`` of the turns before an assistant turn, so an adapter is trained on the
text it is served with.

Two kinds of template:
  * a Jinja template in the Hugging Face convention (``messages``, ``tools``,
    ``add_generation_prompt``, ``bos_token``, ``eos_token``), from a ``tokenizer_config.json``, a
    GGUF file or a Jinja file;
  * the byte tokenizer's built-in one: ``<role> content <sep>`` per message (special ids, so
    content can never forge a role marker; an assistant turn ends with ``<eos>``, the token the
    model emits to end it), then ``<assistant>``.

Messages as OpenAI clients send them: ``system`` / ``developer`` (as system) / ``user`` /
``assistant`` (``content`` may be null when it carries ``tool_calls``) / ``tool`` (with
``tool_call_id``); content as a string or text parts. Templates that know tools get ``tools`` and
structured ``tool_calls`` (arguments as objects, as Hugging Face templates expect); for the others
(the byte built-in, SmolLM2's) the default rendering below puts the tool list in the system
message and writes calls and results as Hermes-style ``<tool_call>`` / ``<tool_response>`` text,
the format ``icarus_jax.serving`` parses back.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from icarus_jax.errors import ExampleTooLongError, IcarusError

ROLES = ("system", "user", "assistant", "tool")
#: accepted as input and mapped onto ``ROLES``
ROLE_ALIASES = {"developer": "system"}
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def _text(content, where: str) -> str:
  if isinstance(content, list):  # OpenAI content parts: only text parts are supported
    parts = []
    for p in content:
      if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
        raise IcarusError(f"{where}: only text parts are supported")
      parts.append(p["text"])
    return "".join(parts)
  if not isinstance(content, str):
    raise IcarusError(f"{where} must be a string")
  return content


def _tool_calls(calls, where: str) -> list[dict]:
  """OpenAI ``tool_calls`` -> ``[{"id", "type", "function": {"name", "arguments": dict}}]``."""
  if not isinstance(calls, list) or not calls:
    raise IcarusError(f"{where} must be a non-empty list of tool calls")
  out = []
  for j, c in enumerate(calls):
    fn = c.get("function") if isinstance(c, dict) else None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
      raise IcarusError(f"{where}[{j}] must be {{'type': 'function', 'function': "
                        f"{{'name': str, 'arguments': JSON string or object}}}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
      try:
        args = json.loads(args) if args.strip() else {}
      except json.JSONDecodeError as e:
        raise IcarusError(f"{where}[{j}].function.arguments is not valid JSON ({e})") from None
    if not isinstance(args, dict):
      raise IcarusError(f"{where}[{j}].function.arguments must be a JSON object")
    out.append({"id": str(c.get("id") or f"call_{j}"), "type": "function",
                "function": {"name": fn["name"], "arguments": args}})
  return out


def validate_messages(messages) -> list[dict]:
  """Messages as clients send them -> ``[{"role", "content": str, ...}]`` or a clear error.

  Kept keys: ``tool_calls`` (assistant; arguments parsed to objects), ``tool_call_id`` and
  ``name`` (tool). ``developer`` becomes ``system``."""
  if not isinstance(messages, list) or not messages:
    raise IcarusError("messages must be a non-empty list of {role, content} objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise IcarusError(f"messages[{i}] must be an object with role and content")
    role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
    if role not in ROLES:
      raise IcarusError(f"messages[{i}].role={m.get('role')!r}; accepted: "
                        f"{list(ROLES) + list(ROLE_ALIASES)}")
    msg: dict = {"role": role}
    calls = m.get("tool_calls")
    if calls is not None:
      if role != "assistant":
        raise IcarusError(f"messages[{i}].tool_calls: only assistant messages carry tool calls")
      msg["tool_calls"] = _tool_calls(calls, f"messages[{i}].tool_calls")
    content = m.get("content")
    if content is None and calls is not None:
      content = ""
    msg["content"] = _text(content, f"messages[{i}].content")
    if role == "tool":
      for k in ("tool_call_id", "name"):
        if isinstance(m.get(k), str):
          msg[k] = m[k]
    out.append(msg)
  return out


def validate_tools(tools) -> list[dict] | None:
  """OpenAI ``tools`` (``[{"type": "function", "function": {"name", "description",
  "parameters"}}]``) or None; a clear error otherwise."""
  if tools is None:
    return None
  if not isinstance(tools, list):
    raise IcarusError("tools must be a list of {'type': 'function', 'function': {...}} objects")
  for j, t in enumerate(tools):
    fn = t.get("function") if isinstance(t, dict) else None
    if not (isinstance(t, dict) and t.get("type", "function") == "function"
            and isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
      raise IcarusError(f"tools[{j}] must be {{'type': 'function', 'function': {{'name': str, "
                        f"'description': str, 'parameters': JSON schema}}}}")
    if not isinstance(fn.get("parameters", {}), dict):
      raise IcarusError(f"tools[{j}].function.parameters must be a JSON schema object")
  # canonical: the fields a template renders, in one order (clients add others, e.g. "strict",
  # and would otherwise render different prompts for the same tool and share no cache)
  keys = ("name", "description", "parameters")
  return [{"type": "function", "function": {k: t["function"][k] for k in keys
                                            if k in t["function"]}} for t in tools] or None


def tool_call_text(name: str, arguments: dict) -> str:
  """One call as the default rendering writes it (and as the Hermes parser reads it)."""
  return (f"{TOOL_CALL_OPEN}\n" + json.dumps({"name": name, "arguments": arguments},
                                             ensure_ascii=False) + f"\n{TOOL_CALL_CLOSE}")


def tools_system_text(tools: list[dict]) -> str:
  """The default tool block appended to the system message (templates without ``tools``)."""
  sigs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
  return ("# Tools\n\nYou can call the functions below. Their signatures, one JSON object per "
          f"line, are inside <tools></tools>:\n<tools>\n{sigs}\n</tools>\n\nTo call one, answer "
          f"with a JSON object of its name and arguments inside {TOOL_CALL_OPEN}"
          f"{TOOL_CALL_CLOSE} tags, one block per call:\n{TOOL_CALL_OPEN}\n"
          f'{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n'
          f"{TOOL_CALL_CLOSE}")


def default_tool_rendering(messages: list[dict], tools: list[dict] | None) -> list[dict]:
  """Messages for a template that knows neither ``tools`` nor ``tool_calls``: the tool list goes
  into the (first, or a new) system message, calls into the assistant's text, results into
  ``<tool_response>`` text of the tool turn."""
  out = []
  for m in messages:
    m = dict(m)
    if m.get("tool_calls"):
      calls = "\n".join(tool_call_text(c["function"]["name"], c["function"]["arguments"])
                        for c in m.pop("tool_calls"))
      m["content"] = (m["content"] + "\n" + calls) if m["content"] else calls
    if m["role"] == "tool":
      m = {"role": "tool", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    out.append(m)
  if tools:
    block = tools_system_text(tools)
    if out[0]["role"] == "system":
      out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + block}
    else:
      out.insert(0, {"role": "system", "content": block})
  return out


class ChatTemplate:
  """``encode(messages, tools) -> list[int]`` and ``encode_training(...)`` for a tokenizer."""

  def __init__(self, tokenizer, template: str | None = None):
    self.tokenizer = tokenizer
    self.template = template
    self._jinja = None
    if template is not None:
      import jinja2
      from jinja2.sandbox import ImmutableSandboxedEnvironment
      env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                          extensions=["jinja2.ext.loopcontrols"])

      def raise_exception(msg):
        raise IcarusError(f"chat template: {msg}")

      def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # as Hugging Face renders templates: plain JSON, no HTML escaping, keys in order
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

      def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)
      env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
      env.filters["tojson"] = tojson
      try:
        self._jinja = env.from_string(template)
      except jinja2.TemplateError as e:
        raise IcarusError(f"chat template does not compile: {e}") from None
    elif not hasattr(tokenizer, "special"):
      raise IcarusError("this tokenizer has no built-in chat template; pass one (a Jinja file, or "
                        "a tokenizer_config.json with chat_template)")
    # Which tool features the template renders itself (else: default_tool_rendering).
    self.native_tools = template is not None and "tools" in template
    self.native_tool_calls = template is not None and "tool_calls" in template

  @classmethod
  def from_path(cls, tokenizer, path: str | os.PathLike | None) -> "ChatTemplate":
    """``path``: a Jinja file, a ``tokenizer_config.json``, a dir holding one, or None."""
    if path is None:
      return cls(tokenizer)
    p = os.fspath(path)
    if os.path.isdir(p):
      p = os.path.join(p, "tokenizer_config.json")
      if not os.path.exists(p):
        return cls(tokenizer)
    with open(p) as f:
      text = f.read()
    if p.endswith(".json"):
      tmpl = json.loads(text).get("chat_template")
      if isinstance(tmpl, list):  # named templates: take "default"
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
      return cls(tokenizer, tmpl)
    return cls(tokenizer, text)

  def _prepare(self, messages, tools) -> tuple[list[dict], list[dict] | None]:
    messages = validate_messages(list(messages))
    tools = validate_tools(tools)
    uses_tools = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if (tools and not self.native_tools) or (uses_tools and not self.native_tool_calls):
      return default_tool_rendering(messages, tools), None
    return messages, tools

  def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, *,
             add_generation_prompt: bool = True) -> str:
    """The text of a Jinja template, as transformers' ``apply_chat_template(messages,
    tools=tools, tokenize=False, add_generation_prompt=...)`` renders it."""
    if self._jinja is None:
      raise IcarusError("the byte tokenizer's built-in template works on token ids; use encode()")
    messages, tools = self._prepare(messages, tools)
    return self._render(messages, tools, add_generation_prompt)

  def _render(self, messages, tools, add_generation_prompt) -> str:
    tok = self.tokenizer
    bos = getattr(tok, "bos_id", None)
    eos = getattr(tok, "eos_id", None)
    dec = getattr(tok, "token_text", None)
    kw = {"tools": tools} if tools else {}
    return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt,
                              bos_token=dec(bos) if dec and bos is not None else "",
                              eos_token=dec(eos) if dec and eos is not None else "", **kw)

  def _builtin(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    tok = self.tokenizer
    sp = tok.special
    ids: list[int] = []
    for m in messages:
      end = tok.eos_id if m["role"] == "assistant" else sp["<sep>"]
      ids += [sp[f"<{m['role']}>"]] + tok.encode(m["content"]) + [end]
    return ids + [sp["<assistant>"]] if add_generation_prompt else ids

  def encode(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
    """Prompt ids: the conversation, then the assistant's generation prompt."""
    return self._prompt(*self._prepare(messages, tools))

  def _prompt(self, messages: list[dict], tools) -> list[int]:
    """Prompt ids of already prepared messages (``_prepare``)."""
    if self._jinja is None:
      return self._builtin(messages, True)
    return self.tokenizer.encode(self._render(messages, tools, True))

  def _answer(self, messages: list[dict], tools, prompt: list[int]) -> tuple[list[int], int]:
    """``(ids, n_loss)``: the tokens the model produces for the assistant turn ``messages[-1]``
    after ``prompt`` (``encode(messages[:-1])``), and how many of them carry loss: through the
    end-of-turn token; what the template writes after it (e.g. a newline) carries none."""
    tok = self.tokenizer
    if self._jinja is None:
      full = self._builtin(messages, False)
      ids = full[len(prompt):]
    else:
      pre = self._render(messages[:-1], tools, True)
      full = self._render(messages, tools, False)
      if not full.startswith(pre):
        raise IcarusError("this chat template does not render an assistant turn as a "
                          "continuation of its generation prompt, so training text cannot equal "
                          "the served prompt")
      ids = tok.encode(full[len(pre):])
    if tok.eos_id in ids:
      return ids, ids.index(tok.eos_id) + 1
    return ids + [tok.eos_id], len(ids) + 1

  def encode_training(self, messages: Sequence[dict], tools: Sequence[dict] | None = None, *,
                      loss_on: str = "last", max_len: int | None = None
                      ) -> tuple[list[int], list[int], dict]:
    """A conversation -> ``(ids, mask, info)`` for training.

    ``loss_on``: ``"last"`` (the final assistant turn) or ``"all"`` (every assistant turn). The
    prefix before each trained turn is exactly ``encode(turns before it, tools)``: what the
    server sends. ``max_len``: in ``"all"`` mode trailing turns that do not fit are cut
    (``info["turns_cut"]``); an example whose first trained turn does not fit raises.
    """
    if loss_on not in ("last", "all"):
      raise IcarusError(f"loss_on={loss_on!r}; accepted: 'last', 'all'")
    messages, tools = self._prepare(messages, tools)
    if messages[-1]["role"] != "assistant":
      raise IcarusError("the last message of a training conversation must be the assistant's")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    if loss_on == "last":
      turns = turns[-1:]
    ids: list[int] = []
    mask: list[int] = []
    cut = 0
    for k, a in enumerate(turns):
      prompt = self._prompt(messages[:a], tools)
      if prompt[:len(ids)] != ids:
        raise IcarusError("the prompt of a later assistant turn does not extend the earlier "
                          "turns' tokens with this tokenizer and template; train with "
                          "loss_on='last'")
      ans, n_loss = self._answer(messages[:a + 1], tools, prompt)
      new_ids = prompt[len(ids):] + ans
      if max_len is not None and len(ids) + len(new_ids) > max_len:
        if k == 0:
          raise ExampleTooLongError(f"example is {len(ids) + len(new_ids)} tokens long, more "
                                    f"than max_len={max_len}")
        cut = len(turns) - k
        break
      mask += [0] * (len(prompt) - len(ids)) + [1] * n_loss + [0] * (len(ans) - n_loss)
      ids += new_ids
    return ids, mask, {"turns": len(turns) - cut, "turns_cut": cut}
