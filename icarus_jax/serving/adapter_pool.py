"""The serving-time adapter pool: every registered LoRA adapter stacked on a leading slot axis.

Layout (``A`` = capacity slots; slot 0 is the base, all zeros; ranks padded to ``max_rank``;
``b`` pre-multiplied by each adapter's scale, so padding and slot 0 contribute exactly 0):

    layers[t] = {"a": [L, A, in, R], "b": [L, A, R, out]}    t in targets
    lm_head   = {"a": [A, d_model, R], "b": [A, R, vocab]}   (if "lm_head" in targets)

Shapes are fixed at construction, so adding or removing adapters never recompiles a step.
Each batch row carries its slot; the step gathers ``a[rows]`` per layer (BGMV). Adding or
removing an adapter writes only its slot: the pool arrays are donated to one jitted update
(:func:`_write_slot`), so the cost is one slot's bytes, not the pool's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from icarus_jax.model.adapters import Adapter, lora_shapes, lora_weights
from icarus_jax.model.config import ModelConfig
from icarus_jax.errors import IcarusError

BASE_SLOT = 0


class SlotTable:
  """Which adapter holds which of ``capacity`` device slots (1..capacity; 0 is the base).

  Bookkeeping only: :class:`AdapterPool` writes the weights, the roofline runner has none.
  """

  def __init__(self, capacity: int):
    if capacity < 1:
      raise IcarusError(f"adapter pool capacity must be >= 1, got {capacity}")
    self.capacity = capacity
    self.slots: dict[str, int] = {}
    self._free = list(range(capacity, 0, -1))

  @property
  def has_free_slot(self) -> bool:
    return bool(self._free)

  def take(self, name: str) -> int:
    if name in self.slots:
      raise IcarusError(f"adapter {name!r} already holds slot {self.slots[name]}")
    if not self._free:
      raise IcarusError(f"adapter pool is full ({self.capacity} adapters); remove one first")
    self.slots[name] = self._free.pop()
    return self.slots[name]

  def release(self, name: str) -> int:
    slot = self.slots.pop(name)
    self._free.append(slot)
    return slot


class AdapterPool:

  def __init__(self, cfg: ModelConfig, *, capacity: int, max_rank: int, targets: tuple[str, ...]):
    self.table = SlotTable(capacity)
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

  @property
  def slots(self) -> dict[str, int]:
    return self.table.slots

  @property
  def has_free_slot(self) -> bool:
    return self.table.has_free_slot

  def check(self, name: str, adapter: Adapter) -> None:
    """Raises unless ``adapter`` fits this pool (LoRA kind, rank, targets)."""
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

  def add(self, name: str, adapter: Adapter) -> int:
    """Writes ``adapter`` into a free slot (in place); returns the slot."""
    self.check(name, adapter)
    ac = adapter.config
    lw = lora_weights(adapter)
    r = ac.rank
    new = self._empty_slot()
    for t in self.targets:
      src = lw.get("lm_head") if t == "lm_head" else lw["layers"].get(t)
      if src is None:
        continue  # a target the adapter does not train contributes exactly 0
      dst = new["lm_head"] if t == "lm_head" else new["layers"][t]
      a, b = np.asarray(src["a"], np.float32), np.asarray(src["b"], np.float32)
      dst["a"][..., :r] = a  # a [.., in, r] into [.., in, R]
      dst["b"][..., :r, :] = b  # b [.., r, out] into [.., R, out]
    slot = self.table.take(name)
    try:
      self.weights = _write_slot(self.weights, jnp.int32(slot), new)
    except Exception:
      self.table.release(name)
      raise
    return slot

  def remove(self, name: str) -> None:
    slot = self.table.release(name)
    self.weights = _write_slot(self.weights, jnp.int32(slot), self._empty_slot())

  def _empty_slot(self) -> dict:
    """Zeros shaped like one slot of every pool array (host memory, float32)."""
    def one(x):
      shape = x.shape[1:] if x.ndim == 3 else (x.shape[0],) + x.shape[2:]
      return np.zeros(shape, np.float32)
    return jax.tree_util.tree_map(one, self.weights)

  def nbytes(self) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self.weights)))


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_slot(weights: dict, slot: jax.Array, new: dict) -> dict:
  """``weights[..slot..] = new`` for every pool array, in place (``weights`` is donated).

  Layer factors ``[L, A, ...]`` take ``new [L, ...]`` at ``[:, slot]``; the head's ``[A, ...]``
  takes ``new [...]`` at ``[slot]``.
  """
  def put(w, n):
    n = n.astype(w.dtype)
    if w.ndim == 3 and n.ndim == 2:
      return w.at[slot].set(n)
    return w.at[:, slot].set(n)
  return jax.tree_util.tree_map(put, weights, new)
