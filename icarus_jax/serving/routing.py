"""Replica routing policies, in plain Python: which replica gets a request.

One place for the policies that both the Ray Serve router (``serving/ray_app.py``, keys from
the request's rendered text) and the replica projection (``bench/replica_set.py``, keys from
token ids on roofline runners) apply, so the measured and the projected policy are the same code.

A policy ranks replica ids given each replica's load (requests queued or running there); the
first is preferred. ``record`` tells it where a request went.
"""

from __future__ import annotations

import hashlib
import random
from typing import Hashable, Sequence

Rid = Hashable


def chain_keys(blocks: Sequence[bytes], salt: str = "") -> list[str]:
  """One key per block, each hashing every block before it too (key i = the whole prefix up
  to block i), so a longer context extends a shorter one's keys."""
  h, keys = hashlib.sha1(salt.encode()), []
  for b in blocks:
    h.update(b)
    keys.append(h.copy().hexdigest())
  return keys


def token_keys(tokens: Sequence[int], block: int, salt: str = "") -> list[str]:
  """``chain_keys`` over complete ``block``-token blocks of a prompt (a page each)."""
  n = len(tokens) // block
  return chain_keys([repr(list(tokens[i * block:(i + 1) * block])).encode() for i in range(n)],
                    salt)


class ContextAffinity:
  """The replica that served the longest prefix of this context (or this session) first,
  whatever the model; unless its load exceeds the lightest replica's by more than
  ``imbalance``. New contexts: the lightest replica, then the one owning the fewest contexts."""

  def __init__(self, imbalance: int = 4, max_keys: int = 200_000):
    self.imbalance = imbalance
    self.max_keys = max_keys
    self._owner: dict[str, Rid] = {}  # insertion order = age (the oldest dropped first)
    self.counts = {"affinity": 0, "new_context": 0, "overflow": 0}

  def rank(self, keys: Sequence[str], loads: dict[Rid, int]) -> list[Rid]:
    owner = None
    for k in reversed(keys):  # the longest matching prefix first
      if self._owner.get(k) in loads:
        owner = self._owner[k]
        break
    lightest = min(loads.values())
    if owner is not None and loads[owner] - lightest <= self.imbalance:
      self.counts["affinity"] += 1
      return [owner] + sorted((r for r in loads if r != owner), key=lambda r: (loads[r], str(r)))
    self.counts["overflow" if owner is not None else "new_context"] += 1
    owned = {r: 0 for r in loads}
    for r in self._owner.values():
      if r in owned:
        owned[r] += 1
    return sorted(loads, key=lambda r: (loads[r], owned[r], str(r)))

  def record(self, keys: Sequence[str], rid: Rid) -> None:
    for k in keys:
      self._owner.pop(k, None)
      self._owner[k] = rid
    while len(self._owner) > self.max_keys:
      self._owner.pop(next(iter(self._owner)))

  def forget(self, rid: Rid) -> None:
    """A replica died: its contexts route anew."""
    self._owner = {k: v for k, v in self._owner.items() if v != rid}


class ModelAffinity:
  """The conventional multi-LoRA routing (Ray's ``MultiplexMixin`` policy): a replica that has
  the model loaded (the lightest of them), else the replica with the fewest models loaded (then
  the lightest), which then has it."""

  def __init__(self, max_models_per_replica: int = 64):
    self.max_models = max_models_per_replica
    self._loaded: dict[Rid, list] = {}

  def rank(self, model, loads: dict[Rid, int]) -> list[Rid]:
    has = [r for r in loads if model in self._loaded.get(r, [])]
    rest = sorted((r for r in loads if r not in has),
                  key=lambda r: (len(self._loaded.get(r, [])), loads[r], str(r)))
    return sorted(has, key=lambda r: (loads[r], str(r))) + rest

  def record(self, model, rid: Rid) -> None:
    models = self._loaded.setdefault(rid, [])
    if model in models:
      models.remove(model)
    models.append(model)  # LRU order
    del models[:-self.max_models]

  def forget(self, rid: Rid) -> None:
    self._loaded.pop(rid, None)


class PowerOfTwo:
  """Ray Serve's default: two replicas at random, the lighter first."""

  def __init__(self, seed: int = 0):
    self._rng = random.Random(seed)

  def rank(self, _key, loads: dict[Rid, int]) -> list[Rid]:
    ids = list(loads)
    pick = self._rng.sample(ids, min(2, len(ids)))
    return sorted(pick, key=lambda r: loads[r]) + [r for r in ids if r not in pick]

  def record(self, _key, rid: Rid) -> None:
    pass

  def forget(self, rid: Rid) -> None:
    pass
