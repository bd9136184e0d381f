"""Pallas kernels over the one shared paged KV pool (each file: wrapper, kernel, jnp reference).

  paged_attention           the shared kernels (GPU-style and TPU-style lowerings) with a
                            position per query row; the engine's ``attention_backend="pallas"``
  paged_decode_attention    decode with several query streams per sequence folded into the
                            GQA group, split-K with a log-sum-exp merge
  ragged_prefill_attention  packed (cu_q_lens) new tokens over cached prefix pages, causal
"""

from kernels_pallas.paged_attention import paged_attention, paged_attention_reference
from kernels_pallas.paged_decode_attention import (paged_decode_attention,
                                                   paged_decode_attention_reference)
from kernels_pallas.ragged_prefill_attention import (ragged_paged_prefill_attention,
                                                     ragged_paged_prefill_attention_reference)

__all__ = ["paged_attention", "paged_attention_reference", "paged_decode_attention",
           "paged_decode_attention_reference", "ragged_paged_prefill_attention",
           "ragged_paged_prefill_attention_reference"]
