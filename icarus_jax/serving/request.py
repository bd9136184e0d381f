"""A request's state inside the engine, and what it produced.

``Request`` is the scheduler's record of one request (its tokens, pages, adapter slot, sampling
and grammar state); its ``status`` says where it is, so no part of the engine infers state from
which list holds it. ``RequestOutput`` is what the caller sees (tokens, timing, finish reason);
it is filled in place as the request runs.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Hashable

from icarus_jax.serving.grammar import Matcher
from icarus_jax.serving.prefix_cache import InsertCursor
from icarus_jax.serving.runner import TokenLogprobs
from icarus_jax.serving.sampling import SamplingParams


class RequestStatus(enum.Enum):
  """Where a request is. WAITING -> PREFILLING -> DECODING -> FINISHED; a preempted request
  goes back to WAITING (its computed pages to the prefix cache) and recomputes what was lost."""
  WAITING = "waiting"        # queued: no pages held
  PREFILLING = "prefilling"  # admitted: its uncached prompt tokens run a chunk per step
  DECODING = "decoding"      # one new token per step
  FINISHED = "finished"      # ``output.finish_reason`` says why; pages released

  @property
  def live(self) -> bool:
    return self is not RequestStatus.FINISHED


@dataclasses.dataclass
class RequestOutput:
  """What a finished (or streaming) request produced, with its timing (the engine's clock)."""

  request_id: int
  adapter: str | None
  prompt_tokens: list[int]
  output_tokens: list[int]
  finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
  num_cached_tokens: int = 0        # prompt tokens served from the prefix cache at first admission
  arrival_time: float = 0.0
  first_token_time: float | None = None
  token_times: list[float] = dataclasses.field(default_factory=list)
  finish_time: float | None = None
  error: str | None = None
  #: one entry per output token when the request asked for logprobs (``SamplingParams.logprobs``)
  logprobs: list[TokenLogprobs] | None = None

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None


@dataclasses.dataclass(eq=False)
class Request:
  """One request as the scheduler tracks it.

  ``tokens`` is prompt + output so far; ``num_computed`` of them have K/V in ``page_table``'s
  pages (``page_table[i]`` holds positions ``[i * page_size, (i + 1) * page_size)``).
  """
  rid: int
  adapter: str | None
  ns: Hashable              # prefix-cache namespace (base fingerprint, tenant[, adapter, gen])
  prompt: list[int]
  tokens: list[int]
  sampling: SamplingParams
  callback: Callable | None  # callback(rid, token, finished) after every token
  out: RequestOutput
  order: int = 0            # arrival order (preemption takes the newest)
  session: Hashable | None = None
  retain_s: float = 0.0
  priority: int = 0
  matcher: Matcher | None = None  # its grammar's state (structured outputs)
  status: RequestStatus = RequestStatus.WAITING
  page_table: list[int] = dataclasses.field(default_factory=list)
  num_computed: int = 0
  admitted_once: bool = False
  cache_cursor: InsertCursor = dataclasses.field(default_factory=InsertCursor)

  @property
  def num_output(self) -> int:
    return len(self.tokens) - len(self.prompt)

  @property
  def prefilling(self) -> bool:
    return self.status is RequestStatus.PREFILLING

  @property
  def ready_to_decode(self) -> bool:
    """Decoding with exactly its last token still to compute (one new token per step)."""
    return (self.status is RequestStatus.DECODING
            and self.num_computed == len(self.tokens) - 1)
