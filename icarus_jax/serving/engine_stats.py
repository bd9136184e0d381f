"""The engine's counters (what ``Engine.snapshot`` and the benchmarks report)."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class EngineStats:
  prompt_tokens: int = 0
  cached_prompt_tokens: int = 0
  prefill_tokens_computed: int = 0
  decode_tokens: int = 0
  preemptions: int = 0
  adapter_loads: int = 0        # host -> device slot writes
  adapter_evictions: int = 0    # device slots given to another adapter (LRU)
  retained_contexts: int = 0   # finished requests whose context was kept for their session
  retention_hits: int = 0      # admissions that found their session's context still retained
  retention_expired: int = 0   # retained contexts released by their TTL
  retention_reclaimed: int = 0  # retained contexts released early because memory ran out
  adapter_disk_reads: int = 0   # adapters read from disk (registration, or after the host
                                # tier dropped them)
  isolated_faults: int = 0  # batches that raised and were re-run row by row
  peak_pages_used: int = 0
  steps: int = 0
  per_adapter: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(
      lambda: {"prompt_tokens": 0, "cached_tokens": 0, "prefill_tokens_computed": 0}))

  def hit_rate(self, adapter: str | None = "__all__") -> float:
    if adapter == "__all__":
      return self.cached_prompt_tokens / max(1, self.prompt_tokens)
    d = self.per_adapter[adapter]
    return d["cached_tokens"] / max(1, d["prompt_tokens"])
