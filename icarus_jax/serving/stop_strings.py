"""Incremental detokenization and stop-string matching for one generated stream.

    m = StopStringMatcher(tokenizer, stops=["\\n\\n", "END"])
    for token in tokens:
      piece = m.add(token)      # text safe to emit now ("" while held back)
      if m.stopped:
        break                   # the caller aborts generation
    piece = m.finish()          # what was held back, at the end

Invariants (tested without HTTP in ``tests/test_stop_strings.py``):

* The concatenation of every ``add`` and ``finish`` result is ``m.text``, the same whether a
  stream is read token by token or all at once; without stops it equals
  ``tokenizer.decode(tokens)``.
* Text is emitted only when it can no longer become part of a stop string (the last
  ``max(len(stop)) - 1`` characters are held back) and never ends in half a character (a
  decoded piece ending in U+FFFD waits for the next token).
* With stops, ``m.text`` ends right before the earliest occurrence of any stop string, also when
  the stop string spans several tokens.
* Each token costs work proportional to a few tokens and the held-back text, not to the output
  so far (the old server re-decoded the whole output per token: quadratic).

Detokenization follows the prefix/read-offset scheme of vLLM's ``detokenize_incrementally``:
decode a short window that starts a little before the new tokens and emit only what the new
tokens added, so tokenizers whose decoding depends on the left context (leading spaces,
byte-fallback pieces) are handled.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class StopStringMatcher:

  def __init__(self, tokenizer, stops: Sequence[str] = ()):
    stops = list(stops)
    if any(not isinstance(s, str) or not s for s in stops):
      raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
    self._tok = tokenizer
    self.stops = stops
    self._hold = max((len(s) for s in stops), default=1) - 1
    self._tokens: list[int] = []
    self._prefix = 0   # window start for decoding (one piece before the unread tokens)
    self._read = 0     # tokens whose text has been produced
    self._pending = ""  # produced but not yet emitted (may start a stop string)
    self.text = ""     # emitted so far
    self.stopped = False
    self.finished = False

  def _decode_new(self, final: bool) -> str:
    """Text the unread tokens add (``""`` while it would end in half a character)."""
    if self._read == len(self._tokens):
      return ""
    before = self._tok.decode(self._tokens[self._prefix:self._read])
    after = self._tok.decode(self._tokens[self._prefix:])
    if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
      return ""
    self._prefix, self._read = self._read, len(self._tokens)
    return after[len(before):]

  def _emit(self, final: bool) -> str:
    cut = -1
    for s in self.stops:
      i = self._pending.find(s)
      if i >= 0 and (cut < 0 or i < cut):
        cut = i
    if cut >= 0:
      out, self._pending, self.stopped = self._pending[:cut], "", True
    else:
      keep = 0 if final else min(self._hold, len(self._pending))
      out = self._pending[:len(self._pending) - keep]
      self._pending = self._pending[len(out):]
    self.text += out
    return out

  def add(self, token: int) -> str:
    """Appends one generated token; returns the text now safe to emit."""
    if self.stopped or self.finished:
      return ""
    self._tokens.append(int(token))
    self._pending += self._decode_new(final=False)
    return self._emit(final=False)

  def finish(self) -> str:
    """End of generation: the held-back text (incomplete characters decoded as U+FFFD)."""
    if self.stopped or self.finished:
      self.finished = True
      return ""
    self.finished = True
    self._pending += self._decode_new(final=True)
    return self._emit(final=True)

  @property
  def tokens(self) -> list[int]:
    return list(self._tokens)
