"""``EngineConfig``: every knob of the serving engine, declared once.

The ``Engine`` constructor takes these fields as keywords (and keeps the result as
``engine.engine_config``); ``launch.serve`` generates its engine flags from this dataclass
(``icarus_jax.flag_utils``), so a knob has one name, one default and one check everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

from icarus_jax.errors import IcarusError

MODES = ("icarus", "isolated")
ATTENTION_BACKENDS = ("reference", "pallas")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """How one serving engine is sized and what it computes."""

  mode: str = field(default="icarus", metadata={
      "help": "icarus: one shared KV cache for every model; isolated: the conventional baseline "
              "(each model its own K/V, standard LoRA)", "choices": MODES})
  num_pages: int = field(default=256, metadata={
      "help": "KV pool pages (the KV memory budget)"})
  page_size: int = field(default=16, metadata={"help": "tokens per KV page"})
  max_batch: int = field(default=8, metadata={"help": "most requests decoded together"})
  prefill_chunk: int = field(default=64, metadata={
      "help": "most new prompt tokens per request in one prefill call"})
  max_num_batched_tokens: int | None = field(default=None, metadata={
      "help": "most tokens one step computes (decode rows first, then prefill chunks in what "
              "is left): smaller keeps running requests' token gaps short while a long prompt "
              "is prefilled, at the cost of its TTFT; default: max_batch * prefill_chunk"})
  max_adapters: int = field(default=8, metadata={
      "help": "device adapter slots; any number of adapters can be registered and are swapped "
              "into a slot on demand (LRU)"})
  max_rank: int = field(default=16, metadata={"help": "largest LoRA rank the slots hold"})
  max_seq_len: int | None = field(default=None, metadata={
      "help": "context limit (default: the model's)"})
  attention_backend: str = field(default="reference", metadata={
      "help": "attention over the paged cache: jnp reference or the Pallas kernels",
      "choices": ATTENTION_BACKENDS})
  max_host_adapters: int | None = field(default=None, metadata={
      "help": "host-memory adapter copies (LRU) when adapters are registered by path (disk "
              "tier); default: all in memory"})
  mixed_steps: bool = field(default=False, metadata={
      "help": "decode rows ride along with the first prefill call of a step (vLLM-V1 style)"})
  min_page_bucket: int = field(default=1, metadata={
      "help": "smallest page-count bucket a step reads (rounded up to a power of two): fewer "
              "compiled programs (each costs seconds on a real model) for more masked page "
              "reads at short contexts"})

  def __post_init__(self):
    if self.mode not in MODES:
      raise IcarusError(f"mode={self.mode!r} is unknown; accepted: {MODES}")
    if self.attention_backend not in ATTENTION_BACKENDS:
      raise IcarusError(f"attention_backend={self.attention_backend!r} is unknown; accepted: "
                        f"{ATTENTION_BACKENDS}")
    for name in ("num_pages", "page_size", "max_batch", "prefill_chunk", "max_adapters",
                 "max_rank", "min_page_bucket"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise IcarusError(f"{name} must be a positive int, got {v!r}")
    v = self.max_num_batched_tokens
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < self.max_batch):
      raise IcarusError(f"max_num_batched_tokens must be an int >= max_batch ({self.max_batch}: "
                        f"every running request decodes in each step) or None, got {v!r}")
    if self.max_seq_len is not None and self.max_seq_len < 1:
      raise IcarusError(f"max_seq_len must be positive or None, got {self.max_seq_len}")
    if self.max_host_adapters is not None and self.max_host_adapters < 0:
      raise IcarusError(f"max_host_adapters must be >= 0 or None, got {self.max_host_adapters}")
