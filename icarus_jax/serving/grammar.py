"""Structured outputs: grammars compiled by llguidance, one matcher per request, a token bitmask
per step applied by the jitted sampler on the device.

Why llguidance (``docs/server.md``, "Structured outputs"): it has no dependencies (xgrammar
needs torch, triton and transformers, which a JAX server should not pull in), it reads any
Hugging Face ``tokenizer.json`` and byte-level vocabularies, and its mask costs 0.05-0.14 ms per
token on this CPU for JSON schemas and tool calls with the SmolLM2 (49,152 tokens) and byte
vocabularies (``benchmarks/structured_outputs.py``, ``docs/results/structured_outputs.md``).

* :class:`GrammarCompiler` (one per tokenizer): ``json_object()``, ``json_schema(schema)``,
  ``tool_calls(tools, name=None, parallel=True, fmt="hermes")`` return a grammar (llguidance's
  text form) that ``SamplingParams.grammar`` carries; :meth:`GrammarCompiler.matcher` makes the
  per-request state. Invalid schemas raise :class:`IcarusError` (a 400 at the server).
* :class:`Matcher`: ``mask() -> int32 [ceil(V / 32)]`` (bit ``v % 32`` of word ``v // 32`` set:
  token ``v`` allowed), ``consume(token)``, ``done`` (the grammar is complete).

JSON is generated compact (``", "`` and ``": "`` separators, no free whitespace), so a sampled
model cannot spend its tokens on whitespace inside a valid document.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from icarus_jax.errors import IcarusError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llg():
  try:
    import llguidance
    import llguidance.numpy  # noqa: F401
  except ImportError:  # pragma: no cover - a declared dependency
    raise IcarusError("structured outputs need the llguidance package (pip install "
                      "llguidance)") from None
  return llguidance


class _ByteVocab:
  """llguidance's tokenizer interface for ``ByteTokenizer``: ids < 256 are bytes, the rest
  special tokens."""

  def __init__(self, tok):
    self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
    self.tokens = [bytes([i]) for i in range(256)] + [
        f"<|special_{i}|>".encode() for i in range(256, tok.vocab_size)]
    self.special_token_ids = list(range(256, tok.vocab_size))

  def __call__(self, s):
    return list(s) if isinstance(s, bytes) else list(s.encode("utf-8"))


class GrammarCompiler:
  """Grammars for one tokenizer and a model vocabulary of ``vocab_size`` ids (which may exceed
  the tokenizer's: the extra ids are never allowed)."""

  def __init__(self, tokenizer, vocab_size: int):
    llg = _llg()
    self.vocab_size = vocab_size
    self.words = (vocab_size + 31) // 32
    from icarus_jax.model.tokenizer import ByteTokenizer, HFTokenizer
    if isinstance(tokenizer, ByteTokenizer):
      self._tok = llg.LLTokenizer(llg.TokenizerWrapper(_ByteVocab(tokenizer)), n_vocab=vocab_size)
    elif isinstance(tokenizer, HFTokenizer):
      self._tok = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                  eos_token=tokenizer.eos_id)
    else:
      raise IcarusError(f"structured outputs support the byte and Hugging Face tokenizers, not "
                        f"{type(tokenizer).__name__}")

  # ------------------------------------------------------------------ grammars
  def json_object(self) -> str:
    """Any JSON object (OpenAI ``response_format: {"type": "json_object"}``)."""
    return self._checked(self._schema({"type": "object"}))

  def json_schema(self, schema: Any) -> str:
    """Documents valid under ``schema`` (a JSON Schema object)."""
    if not isinstance(schema, dict):
      raise IcarusError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return self._checked(self._schema(schema))

  def tool_calls(self, tools: Sequence[dict], *, name: str | None = None, parallel: bool = True,
                 fmt: str = "hermes") -> str:
    """Calls of ``tools`` (OpenAI tool objects) in the model family's format: ``hermes``
    (``<tool_call>\\n{"name", "arguments"}\\n</tool_call>`` blocks, one or more when
    ``parallel``) or ``llama3_json`` (``{"name", "parameters"}``, ``;``-separated). ``name``
    restricts to that function (``tool_choice`` named), else any of them (``required``)."""
    fns = [t.get("function", {}) for t in tools if isinstance(t, dict)]
    if name is not None:
      fns = [f for f in fns if f.get("name") == name]
      if not fns:
        raise IcarusError(f"tool_choice names function {name!r}, which is not in tools")
    if not fns:
      raise IcarusError("tool_choice 'required' needs at least one function in tools")
    key = "parameters" if fmt == "llama3_json" else "arguments"
    options = []
    for f in fns:
      params = f.get("parameters") or {"type": "object"}
      options.append({"type": "object", "properties": {"name": {"const": f.get("name")},
                                                        key: params},
                      "required": ["name", key], "additionalProperties": False})
    call_schema = dict(options[0] if len(options) == 1 else {"anyOf": options},
                       **{"x-guidance": JSON_STYLE})  # compact, as in _schema
    body = f"%json {json.dumps(call_schema)}"
    if fmt == "llama3_json":
      sep = json.dumps("; ")
      lark = f"start: call ({sep} call)*\ncall: {body}\n" if parallel else f"start: {body}\n"
    elif fmt == "hermes":
      from icarus_jax.model.chat_template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
      nl = "\n"
      call = f"{json.dumps(TOOL_CALL_OPEN + nl)} {body} {json.dumps(nl + TOOL_CALL_CLOSE)}"
      lark = (f"start: call ({json.dumps(nl)} call)*\ncall: {call}\n" if parallel
              else f"start: {call}\n")
    else:
      raise IcarusError(f"unknown tool-call format {fmt!r}; accepted: hermes, llama3_json")
    return self._checked(_llg().LLMatcher.grammar_from_lark(lark))

  def _schema(self, schema: dict) -> str:
    try:
      return _llg().LLMatcher.grammar_from_json_schema(schema, overrides=JSON_STYLE)
    except ValueError as e:
      raise IcarusError(f"invalid JSON schema: {e}") from None

  def _checked(self, grammar: str) -> str:
    err = _llg().LLMatcher.validate_grammar(grammar, self._tok)
    if err and not err.startswith("WARNING"):
      raise IcarusError(f"the grammar does not compile: {err.strip().splitlines()[0][:300]}")
    return grammar

  # ------------------------------------------------------------------ per request
  def matcher(self, grammar: str) -> "Matcher":
    m = _llg().LLMatcher(self._tok, grammar, log_level=0)
    if m.is_error():
      raise IcarusError(f"the grammar does not compile: {m.get_error()[:300]}")
    return Matcher(m, self.words)


class Matcher:
  """One request's position in its grammar."""

  def __init__(self, m, words: int):
    self._m, self._words = m, words
    self._llgn = _llg().numpy

  def mask(self) -> np.ndarray:
    """The next token's allowed set as ``int32 [ceil(V / 32)]`` bit words."""
    out = np.zeros((1, self._words), np.int32)
    self._llgn.fill_next_token_bitmask(self._m, out)
    return out[0]

  def consume(self, token: int) -> None:
    if not self._m.consume_token(int(token)):
      raise IcarusError(f"token {token} is not allowed by the request's grammar: "
                        f"{self._m.get_error()[:200]}")

  @property
  def done(self) -> bool:
    """The grammar is complete (nothing but the end may follow)."""
    return self._m.is_stopped()
