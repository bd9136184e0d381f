"""Chat messages -> prompt token ids.

Two kinds of template:
  * a Jinja template in the Hugging Face convention (``messages``, ``add_generation_prompt``,
    ``bos_token``, ``eos_token``), from a tokenizer's ``tokenizer_config.json`` or a file;
  * the byte tokenizer's built-in one: ``<role> content <sep>`` per message (special ids, so
    content can never forge a role marker), then ``<assistant>``.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from icarus_jax.errors import IcarusError

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages) -> list[dict]:
  """``[{"role": ..., "content": str}]`` or a clear ``IcarusError``."""
  if not isinstance(messages, list) or not messages:
    raise IcarusError("messages must be a non-empty list of {role, content} objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise IcarusError(f"messages[{i}] must be an object with role and content")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
      raise IcarusError(f"messages[{i}].role={role!r}; accepted: {list(ROLES)}")
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
      parts = []
      for p in content:
        if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
          raise IcarusError(f"messages[{i}].content: only text parts are supported")
        parts.append(p["text"])
      content = "".join(parts)
    if not isinstance(content, str):
      raise IcarusError(f"messages[{i}].content must be a string")
    out.append({"role": role, "content": content})
  return out


class ChatTemplate:
  """``encode(messages) -> list[int]`` for a tokenizer (byte built-in or a Jinja template)."""

  def __init__(self, tokenizer, template: str | None = None):
    self.tokenizer = tokenizer
    self.template = template
    self._jinja = None
    if template is not None:
      import jinja2
      from jinja2.sandbox import ImmutableSandboxedEnvironment
      env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

      def raise_exception(msg):
        raise IcarusError(f"chat template: {msg}")
      env.globals["raise_exception"] = raise_exception
      try:
        self._jinja = env.from_string(template)
      except jinja2.TemplateError as e:
        raise IcarusError(f"chat template does not compile: {e}") from None
    elif not hasattr(tokenizer, "special"):
      raise IcarusError("this tokenizer has no built-in chat template; pass one (a Jinja file, or "
                        "a tokenizer_config.json with chat_template)")

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

  def render(self, messages: Sequence[dict]) -> str:
    """The prompt text of a Jinja template (with the generation prompt), as transformers'
    ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` renders it."""
    if self._jinja is None:
      raise IcarusError("the byte tokenizer's built-in template works on token ids; use encode()")
    tok = self.tokenizer
    bos = getattr(tok, "bos_id", None)
    eos = getattr(tok, "eos_id", None)
    dec = getattr(tok, "token_text", None)
    return self._jinja.render(messages=validate_messages(list(messages)), add_generation_prompt=True,
                              bos_token=dec(bos) if dec and bos is not None else "",
                              eos_token=dec(eos) if dec and eos is not None else "")

  def encode(self, messages: Sequence[dict]) -> list[int]:
    messages = validate_messages(list(messages))
    tok = self.tokenizer
    if self._jinja is None:
      sp = tok.special
      ids: list[int] = []
      for m in messages:
        ids += [sp[f"<{m['role']}>"]] + tok.encode(m["content"]) + [sp["<sep>"]]
      return ids + [sp["<assistant>"]]
    return tok.encode(self.render(messages))
