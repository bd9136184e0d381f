"""The KV pool and the adapter pool are updated in place: no compiled serving program copies them.

Oracle: XLA's own buffer assignment (``compiled.memory_analysis()``) and the compiled HLO, for
two pool sizes that differ 64x. A program that materialises a new pool (the old scan over
``xs``/``ys`` of pages, or a non-donated ``.at[].set`` on the pool) needs a pool-sized temporary
and a pool-shaped ``copy``; an in-place one needs neither. Nothing is run or timed here (the
step-time sweep is ``benchmarks/kv_pool_scaling.py``); programs are lowered from shapes only, so
the large pool is never allocated.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icarus_jax.serving import engine_steps
from icarus_jax.serving.adapter_pool import AdapterPool, _write_slot
from icarus_jax.model.adapters import DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS

PS = 8
SMALL, LARGE = 256, 16_384
ATTN = {"reference": engine_steps.paged_attention_reference,
        "pallas": engine_steps.paged_attention_pallas}


def sds(shape, dtype=jnp.int32):
  return jax.ShapeDtypeStruct(shape, dtype)


def pool_copies(hlo: str, shapes: list[tuple[int, ...]]) -> list[str]:
  """HLO ``copy`` instructions whose result has one of ``shapes`` (any layout)."""
  pats = [re.compile(r"\[" + ",".join(map(str, s)) + r"\]\{") for s in shapes]
  return [l.strip() for l in hlo.splitlines()
          if re.search(r"=\s*\S+\s+copy\(", l) and any(p.search(l) for p in pats)]


def analyse(lowered):
  c = lowered.compile()
  return c.memory_analysis().temp_size_in_bytes, c.as_text()


def pages_shape(cfg, P):
  return engine_steps.pool_shape(cfg, P, PS)


def lower_step(cfg, base, mode, backend, P, T, B=4, N=4):
  pages = sds(pages_shape(cfg, P), cfg.jnp_dtype)
  targets = DEFAULT_ICARUS_TARGETS if mode == "icarus" else DEFAULT_LORA_TARGETS
  pool = AdapterPool(cfg, capacity=2, max_rank=4, targets=targets).weights
  common = (sds((B, T)), sds((B, T)), sds((B, T), jnp.bool_), sds((B, N)))
  if mode == "icarus":
    return engine_steps.icarus_step.lower(cfg, base, pool, pages, *common, sds((B,)), sds((B,)),
                                          sds((B,)), attn_fn=ATTN[backend])
  return engine_steps.conventional_step.lower(cfg, base, pool, pages, *common, sds((B,)),
                                              sds((B,)), attn_fn=ATTN[backend])


@pytest.mark.parametrize("T", [1, 16], ids=["decode", "prefill"])
@pytest.mark.parametrize("backend", ["reference", "pallas"])
@pytest.mark.parametrize("mode", ["icarus", "isolated"])
def test_serving_steps_do_not_copy_the_pool(tiny, mode, backend, T):
  cfg, base = tiny
  temps, big_bytes = [], 0
  for P in (SMALL, LARGE):
    temp, hlo = analyse(lower_step(cfg, base, mode, backend, P, T))
    temps.append(temp)
    shape = pages_shape(cfg, P)
    flat = (shape[0] * shape[1],) + shape[2:]
    assert not pool_copies(hlo, [shape, flat]), pool_copies(hlo, [shape, flat])[:3]
    big_bytes = int(np.prod(shape)) * jnp.dtype(cfg.jnp_dtype).itemsize
  # 64x the pool (33.5 MB vs 0.5 MB here): the temporaries may not grow by 1% of the large pool.
  # Observed: identical (0 bytes of growth) for every step, backend and bucket.
  assert abs(temps[1] - temps[0]) < 0.01 * big_bytes, (temps, big_bytes)


def test_copy_on_write_does_not_copy_the_pool(tiny):
  cfg, _ = tiny
  temps = []
  for P in (SMALL, LARGE):
    shape = pages_shape(cfg, P)
    temp, hlo = analyse(engine_steps.copy_pages.lower(sds(shape, cfg.jnp_dtype), sds((2,)),
                                                      sds((2,))))
    temps.append(temp)
    assert not pool_copies(hlo, [shape])
  assert temps[0] == temps[1], temps


@pytest.mark.parametrize("targets", [DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS])
def test_adapter_pool_updates_one_slot_in_place(tiny, targets):
  cfg, _ = tiny
  temps = []
  for capacity in (4, 256):
    pool = AdapterPool(cfg, capacity=capacity, max_rank=8, targets=targets)
    w = jax.tree_util.tree_map(lambda x: sds(x.shape, x.dtype), pool.weights)
    new = jax.tree_util.tree_map(lambda x: sds(x.shape, x.dtype), pool._empty_slot())
    temp, hlo = analyse(_write_slot.lower(w, sds(()), new))
    temps.append(temp)
    shapes = [x.shape for x in jax.tree_util.tree_leaves(pool.weights)]
    assert not pool_copies(hlo, shapes), pool_copies(hlo, shapes)[:3]
  assert temps[0] == temps[1], temps


def test_in_place_writes_touch_only_the_written_slots(tiny, tiny_adapters):
  """Behaviour, not just buffers: one decode step changes exactly the slots of its valid tokens
  (every layer), padding tokens write nowhere (not even the null page), and the donated input
  buffer is really consumed."""
  cfg, base = tiny
  pool = AdapterPool(cfg, capacity=2, max_rank=8, targets=DEFAULT_ICARUS_TARGETS)
  pool.add("a", tiny_adapters[0])
  rng = np.random.RandomState(0)
  shape = pages_shape(cfg, 12)
  before = rng.randn(*shape).astype(np.float32)
  pages = jnp.asarray(before)
  # row 0 writes position 9 (page_table[0, 1] = 5 -> page 5, slot 1); row 1 is padding
  tokens = np.array([[7], [3]], np.int32)
  positions = np.array([[9], [0]], np.int32)
  valid = np.array([[True], [False]])
  table = np.array([[2, 5], [0, 0]], np.int32)
  _, out = engine_steps.icarus_step(cfg, base, pool.weights, pages, tokens, positions, valid,
                                    table, np.array([7, 3], np.int32), np.array([9, 0], np.int32),
                                    np.array([1, 0], np.int32))
  assert pages.is_deleted()  # donated: the step reused the buffer
  after = np.asarray(out)
  changed = np.argwhere(np.any(after != before, axis=(2, 4)))  # [L, P, 2K, ps, hd] -> (l, p, slot)
  assert sorted(map(tuple, changed.tolist())) == [(l, 5, 1) for l in range(cfg.num_layers)]
