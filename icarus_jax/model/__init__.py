"""The model: configuration, weights (``params``), adapters, the transformer as pure functions
(``transformer``: ``block``, ``encode``, ``decode``, ``forward``), logical sharding, greedy
generation, and the text interface (tokenizers, chat templates). Imports only ``errors`` and
``kernels_pallas.reference``.

The transformer's entry points are re-exported here, so ``icarus_jax.model.forward`` keeps
working.
"""

from icarus_jax.model.transformer import (block, decode, encode, forward, forward_with_cache,
                                          init_cache)

__all__ = ["block", "decode", "encode", "forward", "forward_with_cache", "init_cache"]
