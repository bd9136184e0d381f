"""The serving-time adapter pool: every registered LoRA adapter stacked on a leading slot axis.

Layout (``A`` = capacity slots; slot 0 is the base, all zeros; ranks padded to ``max_rank``;
``b`` pre-multiplied by each adapter's scale, so padding and slot 0 contribute exactly 0):

    layers[t] = {"a": [L, A, in, R], "b": [L, A, R, out]}    t in targets
    lm_head   = {"a": [A, d_model, R], "b": [A, R, vocab]}   (if "lm_head" in targets)

Shapes are fixed at construction, so adding or removing adapters never recompiles a step.
Each batch row carries its slot; the step gathers ``a[rows]`` per layer (BGMV).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from icarus_jax.adapters import Adapter, lora_shapes, lora_weights
from icarus_jax.config import ModelConfig
from icarus_jax.errors import IcarusError

BASE_SLOT = 0


class AdapterPool:

  def __init__(self, cfg: ModelConfig, *, capacity: int, max_rank: int, targets: tuple[str, ...]):
    if capacity < 1:
      raise IcarusError(f"adapter pool capacity must be >= 1, got {capacity}")
    self.cfg = cfg
    self.capacity = capacity
    self.max_rank = max_rank
    self.targets = tuple(targets)
    A, R = capacity + 1, max_rank
    shapes = lora_shapes(cfg, self.targets, R)
    dt = cfg.jnp_dtype
    w = {"layers": {}}
    for t, ab in shapes["layers"].items():
      L, din, _ = ab["a"]
      dout = ab["b"][2]
      w["layers"][t] = {"a": jnp.zeros((L, A, din, R), dt), "b": jnp.zeros((L, A, R, dout), dt)}
    if "lm_head" in shapes:
      w["lm_head"] = {"a": jnp.zeros((A, cfg.d_model, R), dt), "b": jnp.zeros((A, R, cfg.vocab_size), dt)}
    self.weights = w
    self.slots: dict[str, int] = {}
    self._free = list(range(capacity, 0, -1))

  def add(self, name: str, adapter: Adapter) -> int:
    ac = adapter.config
    if not ac.is_lora:
      raise IcarusError(f"adapter {name!r} is of kind {ac.kind!r}; the serving pool holds LoRA "
                        f"adapters (merge a full adapter into its own base to serve it)")
    if ac.rank > self.max_rank:
      raise IcarusError(f"adapter {name!r} has rank {ac.rank} > the pool's max_rank {self.max_rank}; "
                        f"create the Engine with max_rank>={ac.rank}")
    extra = [t for t in ac.targets if t not in self.targets]
    if extra:
      raise IcarusError(f"adapter {name!r} targets {extra}, which this pool does not hold "
                        f"(pool targets: {list(self.targets)})")
    if name in self.slots:
      raise IcarusError(f"adapter {name!r} is already registered")
    if not self._free:
      raise IcarusError(f"adapter pool is full ({self.capacity} adapters); remove one first")
    slot = self._free.pop()
    lw = lora_weights(adapter)
    r = ac.rank
    w = self.weights
    for t in self.targets:
      src = lw["lm_head"] if t == "lm_head" else lw["layers"].get(t)
      dst = w["lm_head"] if t == "lm_head" else w["layers"][t]
      if t == "lm_head":
        a = jnp.zeros(dst["a"].shape[1:], dst["a"].dtype)
        b = jnp.zeros(dst["b"].shape[1:], dst["b"].dtype)
        if src is not None:
          a = a.at[:, :r].set(src["a"].astype(a.dtype))
          b = b.at[:r, :].set(src["b"].astype(b.dtype))
        dst["a"] = dst["a"].at[slot].set(a)
        dst["b"] = dst["b"].at[slot].set(b)
      else:
        a = jnp.zeros((dst["a"].shape[0],) + dst["a"].shape[2:], dst["a"].dtype)
        b = jnp.zeros((dst["b"].shape[0],) + dst["b"].shape[2:], dst["b"].dtype)
        if src is not None:
          a = a.at[:, :, :r].set(src["a"].astype(a.dtype))
          b = b.at[:, :r, :].set(src["b"].astype(b.dtype))
        dst["a"] = dst["a"].at[:, slot].set(a)
        dst["b"] = dst["b"].at[:, slot].set(b)
    self.slots[name] = slot
    return slot

  def remove(self, name: str) -> None:
    slot = self.slots.pop(name)
    w = self.weights
    for t in self.targets:
      dst = w["lm_head"] if t == "lm_head" else w["layers"][t]
      if t == "lm_head":
        dst["a"] = dst["a"].at[slot].set(0)
        dst["b"] = dst["b"].at[slot].set(0)
      else:
        dst["a"] = dst["a"].at[:, slot].set(0)
        dst["b"] = dst["b"].at[:, slot].set(0)
    self._free.append(slot)

  def nbytes(self) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self.weights)))
