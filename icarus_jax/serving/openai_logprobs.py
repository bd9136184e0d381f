"""Logprobs in the OpenAI response formats, from the engine's per-token entries.

The engine returns, per generated token, a :class:`~icarus_jax.serving.runner.TokenLogprobs`
(the sampled token's logprob and the ``k`` most likely tokens', computed inside the step from
the distribution the sampler draws from, see ``sampling``). This module only renders them:

* chat (``logprobs: true``, ``top_logprobs: k``): ``{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}``
* completions (``logprobs: k``): ``{"tokens", "token_logprobs", "top_logprobs": [{token:
  logprob}], "text_offset"}``

A token's text is the tokenizer's decoding of that token alone (a byte-level token that is part
of a multi-byte character decodes to U+FFFD, as in other servers); ``bytes`` are that text's
UTF-8 bytes.
"""

from __future__ import annotations

from typing import Sequence

from icarus_jax.serving.protocol import APIError
from icarus_jax.serving.runner import TokenLogprobs
from icarus_jax.serving.sampling import MAX_TOP_LOGPROBS


def requested(logprobs, top_logprobs, *, chat: bool, echo: bool = False) -> int | None:
  """How many alternatives a request asked for (``None``: no logprobs), or a 400 naming the
  field. Chat: ``logprobs`` is a bool and ``top_logprobs`` the count (it needs
  ``logprobs: true``); completions: ``logprobs`` is the count."""
  if chat:
    if logprobs not in (None, True, False):
      raise APIError(400, f"logprobs must be a boolean on chat completions, got {logprobs!r}",
                     param="logprobs")
    if top_logprobs is not None and not logprobs:
      raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if not logprobs:
      return None
    k = 0 if top_logprobs is None else top_logprobs
    field = "top_logprobs"
  else:
    if top_logprobs is not None:
      raise APIError(400, "top_logprobs is a chat completions field; on completions 'logprobs' "
                          "is the number of alternatives", param="top_logprobs")
    if logprobs is None or logprobs is False:
      return None
    k, field = logprobs, "logprobs"
    if echo:
      raise APIError(400, "logprobs with echo (prompt logprobs) are not supported; omit echo "
                          "or logprobs", param="echo")
  if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
    raise APIError(400, f"{field} must be an int in [0, {MAX_TOP_LOGPROBS}], got {k!r}",
                   param=field)
  return k


class Renderer:
  """Token texts (memoized) and the two response formats."""

  def __init__(self, tokenizer):
    self._tok = tokenizer
    self._text: dict[int, str] = {}

  def text(self, token: int) -> str:
    t = self._text.get(token)
    if t is None:
      t = self._text[token] = self._tok.decode([token])
    return t

  def chat(self, tokens: Sequence[int], entries: Sequence[TokenLogprobs]) -> dict:
    def one(tok: int, lp: float) -> dict:
      s = self.text(tok)
      return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [dict(one(t, e.logprob), top_logprobs=[one(i, v) for i, v in e.top])
                        for t, e in zip(tokens, entries)]}

  def completion(self, tokens: Sequence[int], entries: Sequence[TokenLogprobs],
                 offset: int = 0) -> dict:
    texts = [self.text(t) for t in tokens]
    offsets = []
    for s in texts:
      offsets.append(offset)
      offset += len(s)
    return {"tokens": texts, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.text(i): v for i, v in e.top} for e in entries],
            "text_offset": offsets}
