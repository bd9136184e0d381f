"""Roofline cost model and virtual clock: the engine's scheduler and cache, projected to real
hardware (PROJECTION, not a measurement).

``Engine(..., simulator=RooflineSimulator(cfg, hw))`` runs the same admission, prefix cache,
eviction and preemption code with no arrays (``runner.RooflineRunner``); each step advances a
virtual clock by

    t = max(bytes / (HBM bandwidth * mem_eff), flops / (peak * flop_eff)) + step_overhead

where bytes = base weights (read once per step; both ICaRus streams share the read)
+ LoRA factors of the adapters in the batch + K/V read by attention (once per row: the ICaRus
kernel folds the decoder stream into the encoder's page read) + K/V written, and flops = 2 x
(non-embedding parameters) per processed token row (ICaRus: encoder tokens + one decoder row
per request) + attention (4 x layers x heads x head_dim x context per query) + the LM head per
logits row.
"""

from __future__ import annotations

import dataclasses

from icarus_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  hbm_bandwidth: float   # bytes / s
  peak_flops: float      # dense bf16 FLOP / s
  mem_efficiency: float = 0.8
  flop_efficiency: float = 0.6
  step_overhead_s: float = 0.004
  memory_bytes: float = 80e9
  #: Bandwidth of attention's K/V read (bytes / s) when it is not streamed with the weights:
  #: None (accelerators: a paged-attention kernel reads pages at HBM speed, inside the
  #: roofline's ``max``) or a separately fitted rate, added to the step (XLA:CPU runs the
  #: reference backend's page gather as its own loop, far below its matmul bandwidth).
  kv_read_bandwidth: float | None = None


HARDWARE = {  # per chip: vendor data sheets (dense bf16 peak, HBM bandwidth, HBM capacity)
    "h100": Hardware("NVIDIA H100 SXM (80 GB)", 3.35e12, 989e12, memory_bytes=80e9),
    "h200": Hardware("NVIDIA H200 (141 GB)", 4.8e12, 989e12, memory_bytes=141e9),
    "a100": Hardware("NVIDIA A100 SXM (80 GB)", 2.0e12, 312e12, memory_bytes=80e9),
    "tpu-v5e": Hardware("Google TPU v5e (16 GB per chip)", 8.19e11, 197e12, memory_bytes=16e9),
    "tpu-v6e": Hardware("Google TPU v6e (32 GB per chip)", 1.64e12, 918e12, memory_bytes=32e9),
}


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
  """Where the accelerator memory goes (bytes), and what is left for the KV pool."""

  total: float
  usable: float
  weights: float
  activations: float
  adapter_pool: float
  kv: float
  kv_pages: int


def kv_budget(cfg: ModelConfig, hw: Hardware, *, chips: int = 1, utilization: float = 0.9,
              bytes_per_param: int = 2, max_tokens_per_step: int = 8192,
              adapter_slots: int = 16, lora_rank: int = 16, page_size: int = 16) -> MemoryBudget:
  """KV pool budget = memory x utilization - weights - activations - adapter pool (vLLM's
  ``gpu_memory_utilization`` accounting, with the activation peak estimated instead of profiled).

  Weights: every parameter once (the base; ICaRus adds no second copy; norms neglected). Activations: the peak
  of one step of ``max_tokens_per_step`` tokens: hidden states and attention/MLP intermediates
  (``2 d + q + 2 kv + 2 mlp`` values per token in the compute dtype) plus float32 logits for the
  rows that sample (at most one per sequence; bounded here by the token count). Adapter pool:
  ``adapter_slots`` LoRA slots of ``lora_rank`` on every target. Raises if nothing is left.
  """
  total = hw.memory_bytes * chips
  usable = total * utilization
  sim = RooflineSimulator(cfg, hw, lora_rank=lora_rank, bytes_per_param=bytes_per_param)
  weights = sim.weight_bytes  # tied embeddings are counted once
  activations = activation_bytes(cfg, max_tokens_per_step, bytes_per_param)
  adapter_pool = adapter_slots * sim.lora_bytes
  kv = usable - weights - activations - adapter_pool
  if kv <= 0:
    raise ValueError(f"{cfg.name} on {chips} x {hw.name}: weights {weights / 1e9:.1f} GB + "
                     f"activations {activations / 1e9:.1f} GB + adapters {adapter_pool / 1e9:.1f} GB"
                     f" exceed {utilization:.0%} of {total / 1e9:.0f} GB; add chips")
  page = sim.kv_bytes_per_token * page_size
  return MemoryBudget(total, usable, weights, activations, adapter_pool, kv, int(kv // page))


def activation_bytes(cfg: ModelConfig, max_tokens_per_step: int = 8192,
                     bytes_per_param: int = 2) -> float:
  """Peak activation workspace of one step of ``max_tokens_per_step`` tokens (see
  :func:`kv_budget`)."""
  c = cfg
  per_tok = (2 * c.d_model + c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim
             + 2 * c.mlp_dim) * bytes_per_param
  return max_tokens_per_step * per_tok + min(max_tokens_per_step, 1024) * c.vocab_size * 4


class VirtualClock:

  def __init__(self):
    self.t = 0.0

  def __call__(self) -> float:
    return self.t

  def advance(self, dt: float) -> None:
    self.t += dt

  def advance_to(self, t: float) -> None:
    self.t = max(self.t, t)


class RooflineSimulator:
  """Step-time model for ``cfg`` on ``hw`` with bf16 weights and KV."""

  def __init__(self, cfg: ModelConfig, hw: Hardware, *, lora_rank: int = 16, bytes_per_param: int = 2,
               executed_shape: bool = False):
    """``executed_shape``: price the bucketed program the device runs (every padded row, query
    and page: what a dense reference backend computes) instead of the real rows (what a ragged
    paged kernel does). The CPU validation uses it; projections for accelerators do not."""
    self.cfg = cfg
    self.hw = hw
    self.executed_shape = executed_shape
    self.clock = VirtualClock()
    c = cfg
    per_layer = (c.d_model * c.num_heads * c.head_dim * 2 + c.d_model * c.num_kv_heads * c.head_dim * 2
                 + 3 * c.d_model * c.mlp_dim)
    self.layer_params = per_layer * c.num_layers
    self.head_params = c.d_model * c.vocab_size
    embed = c.vocab_size * c.d_model
    self.weight_bytes = (self.layer_params + self.head_params + (0 if c.tie_embeddings else embed)) * bytes_per_param
    self.kv_bytes_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * bytes_per_param
    lora_per_layer = lora_rank * (2 * c.d_model + c.num_heads * c.head_dim * 2 + 3 * (c.d_model + c.mlp_dim)
                                  + 2 * (c.d_model + c.num_kv_heads * c.head_dim))
    self.lora_bytes = lora_per_layer * c.num_layers * bytes_per_param
    self.total_time = 0.0
    self.steps = 0

  def step_bytes(self, rows, icarus: bool) -> dict:
    """Bytes one step moves through memory. ``rows``: (context after the step, new tokens, slot).

    The engine writes K/V in place and attention reads only each row's pages, so nothing here
    depends on the pool's size (``benchmarks/kv_pool_scaling.py`` checks the compiled step
    against this): base weights once, the LoRA factors of the adapters in the batch, each row's
    K/V once (the ICaRus kernel folds the decoder stream into the encoder's page read) and the
    new tokens' K/V.
    """
    del icarus  # both streams share the weight and page reads
    slots = {slot for _, _, slot in rows if slot}
    kv_read = sum(ctx for ctx, _, _ in rows) * self.kv_bytes_per_token
    kv_write = sum(n for _, n, _ in rows) * self.kv_bytes_per_token
    lora = len(slots) * self.lora_bytes
    return {"weights": self.weight_bytes, "lora": lora, "kv_read": kv_read, "kv_write": kv_write,
            "total": self.weight_bytes + lora + kv_read + kv_write}

  def step_time(self, rows, decode: bool, icarus: bool, *, dense: bool = False) -> float:
    """``rows``: list of (context length after this step, new tokens, slot). ``dense``: every
    query attends to the whole context (a masked dense reference) instead of ~its causal half."""
    c = self.cfg
    flops = 0.0
    for ctx, n_new, slot in rows:
      q_rows = n_new + (1 if icarus else 0)  # ICaRus: + the decoder row at the last position
      flops += 2.0 * self.layer_params * q_rows
      flops += 2.0 * self.head_params  # one logits row per request
      # attention: each query row attends to ~its context (causal average for prefill chunks)
      avg_ctx = ctx if decode or dense else max(ctx - n_new / 2.0, 1.0)
      flops += 4.0 * c.num_layers * c.num_heads * c.head_dim * avg_ctx * q_rows
    b = self.step_bytes(rows, icarus)
    t_gather = 0.0
    streamed = b["total"]
    if self.hw.kv_read_bandwidth is not None:
      t_gather = b["kv_read"] / (self.hw.kv_read_bandwidth * self.hw.mem_efficiency)
      streamed -= b["kv_read"]
    t_mem = streamed / (self.hw.hbm_bandwidth * self.hw.mem_efficiency)
    t_flop = flops / (self.hw.peak_flops * self.hw.flop_efficiency)
    return max(t_mem, t_flop) + t_gather + self.hw.step_overhead_s

  def price(self, step, page_size: int, icarus: bool) -> float:
    """Time of one scheduled ``step`` (``step_batch.Step``): its real rows, or with
    ``executed_shape`` its bucket ``(B, T, N)`` as B rows of T new tokens over N pages each."""
    if not self.executed_shape:
      return self.step_time(step.row_costs(), step.decode, icarus)
    B, T, N = step.shape
    slots = [r.slot for r in step.rows] + [0] * (B - step.num_rows)
    return self.step_time([(N * page_size, T, s) for s in slots], step.decode, icarus, dense=True)
