"""Pallas kernels in interpret mode against their pure-jnp references.

Every case shuffles the page tables, fills every page slot no query may read with NaN (a stray
read poisons the output) and mixes lengths 1, ps - 1, ps, ps + 1 and a long one in one batch.
GPU-style kernels run with ``interpret=True``, TPU-style ones under ``pltpu.InterpretParams``
(DMA, semaphores and SMEM simulated; uninitialised VMEM is NaN, out-of-bounds reads raise).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.paged_attention import paged_attention, paged_attention_reference
from kernels_pallas.paged_decode_attention import (paged_decode_attention,
                                                   paged_decode_attention_reference)
from kernels_pallas.ragged_prefill_attention import (ragged_paged_prefill_attention,
                                                     ragged_paged_prefill_attention_reference)
from kernels_pallas.reference import page_shape

PS = 8
HD = 16
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


# benchmarks/device_check.sh gpu sets this on a GPU machine: the GPU-style cases then run the real
# Triton lowering (TPU-style cases stay in the interpreter).
ON_DEVICE = os.environ.get("ICARUS_KERNELS_ON_DEVICE") == "1"


def interp(impl):
  """Compiled where the lowering is the device's own (device_check.sh gpu|tpu), else the
  interpreter (TPU-style under ``pltpu.InterpretParams``)."""
  if ON_DEVICE and impl == jax.default_backend():
    return False
  return pltpu.InterpretParams() if impl == "tpu" else True


def ppc(n):
  """pages_per_chunk; the compiled GPU lowering needs >= 16 keys per chunk."""
  return max(n, 16 // PS) if ON_DEVICE else n


def make_pool(rng, lengths, *, kv_heads, dtype, pages_per_seq=None, extra_pages=5):
  """Pool with shuffled page tables; every slot at or past each row's length is NaN."""
  lengths = np.asarray(lengths)
  need = [max(1, -(-int(n) // PS)) for n in lengths]
  N = pages_per_seq or max(need) + 1
  P = sum(need) + extra_pages + 1
  pages = np.full((P, PS, 2 * kv_heads, HD), np.nan, np.float32)
  free = list(rng.permutation(np.arange(1, P)))
  table = np.zeros((len(lengths), N), np.int32)
  for b, n in enumerate(lengths):
    for j in range(N):
      table[b, j] = free.pop() if j < need[b] else rng.randint(0, P)  # unused: any page, NaN
    for p in range(int(n)):
      pages[table[b, p // PS], p % PS] = rng.randn(2 * kv_heads, HD)
  pages = pages.transpose(0, 2, 1, 3)  # built as [P, ps, 2K, hd]; the layout is [P, 2K, ps, hd]
  return jnp.asarray(pages, dtype), jnp.asarray(table)


def assert_close(out, ref, dtype):
  out = np.asarray(out.astype(jnp.float32))
  ref = np.asarray(ref.astype(jnp.float32))
  assert np.isfinite(out).all(), "NaN/inf leaked from a poisoned page"
  tol = TOL[dtype]
  np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)


LENGTHS = [1, PS - 1, PS, PS + 1, 6 * PS + 3]


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("streams,group", [(1, 1), (2, 4), (3, 8), (4, 1), (5, 4), (6, 8),
                                           (7, 1), (8, 4)])
def test_decode_matches_reference(impl, dtype, streams, group):
  rng = np.random.RandomState(streams * 10 + group)
  K = 2
  pages, table = make_pool(rng, LENGTHS, kv_heads=K, dtype=dtype)
  q = jnp.asarray(rng.randn(len(LENGTHS), streams, K * group, HD), dtype)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  ref = paged_decode_attention_reference(q, pages, table, lengths)
  out = paged_decode_attention(q, pages, table, lengths, impl=impl, interpret=interp(impl),
                               pages_per_chunk=ppc(2), num_splits=1 + streams % 3)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_close(out, ref, dtype)


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_decode_split_k_and_sliding_window(impl):
  """Split-K partials merge exactly; a sliding window skips and masks the pages it hides."""
  rng = np.random.RandomState(7)
  lengths = [3, 5 * PS, 9 * PS + 1]
  pages, table = make_pool(rng, lengths, kv_heads=2, dtype=jnp.float32)
  q = jnp.asarray(rng.randn(3, 2, 8, HD), jnp.float32)
  ln = jnp.asarray(lengths, jnp.int32)
  ref = paged_decode_attention_reference(q, pages, table, ln)
  for splits in (1, 2, 4, 16):
    out = paged_decode_attention(q, pages, table, ln, impl=impl, interpret=interp(impl),
                                 pages_per_chunk=ppc(1), num_splits=splits)
    assert_close(out, ref, jnp.float32)
  win = 2 * PS + 3
  ref_w = paged_decode_attention_reference(q, pages, table, ln, sliding_window=win)
  # Poison what the window hides: the kernel must not read it.
  pages_np = np.array(pages)
  for b, n in enumerate(lengths):
    for p in range(max(0, n - win)):
      pages_np[int(table[b, p // PS]), :, p % PS] = np.nan
  out = paged_decode_attention(q, jnp.asarray(pages_np), table, ln, sliding_window=win,
                               impl=impl, interpret=interp(impl), pages_per_chunk=ppc(2),
                               num_splits=2)
  assert_close(out, ref_w, jnp.float32)
  assert not np.allclose(np.asarray(ref_w), np.asarray(ref), atol=1e-3)


def test_streams_share_pages_with_single_stream_results():
  """Folding streams into the group gives each stream exactly its single-stream answer."""
  rng = np.random.RandomState(3)
  pages, table = make_pool(rng, LENGTHS, kv_heads=2, dtype=jnp.float32)
  q = jnp.asarray(rng.randn(len(LENGTHS), 8, 8, HD), jnp.float32)
  ln = jnp.asarray(LENGTHS, jnp.int32)
  fused = paged_decode_attention(q, pages, table, ln, impl="gpu", interpret=interp("gpu"))
  for s in (0, 3, 7):
    single = paged_decode_attention(q[:, s:s + 1], pages, table, ln, impl="gpu", interpret=interp("gpu"))
    np.testing.assert_allclose(np.asarray(fused[:, s:s + 1]), np.asarray(single), atol=1e-6)


def ragged_case(rng, *, kv_heads, dtype, q_lens, prefix_lens):
  kv_lens = [q + p for q, p in zip(q_lens, prefix_lens)]
  pages, table = make_pool(rng, kv_lens, kv_heads=kv_heads, dtype=dtype)
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  Tt = int(cu[-1]) + 3  # three padding rows at the end of the packed array
  return pages, table, jnp.asarray(cu), jnp.asarray(kv_lens, jnp.int32), Tt


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_ragged_prefill_matches_reference(impl, dtype, group):
  rng = np.random.RandomState(group)
  K = 2
  q_lens = [1, PS - 1, PS + 1, 3 * PS + 2, PS]
  prefix_lens = [0, PS, 3, 4 * PS + 1, 0]  # fresh prompts and prompts behind a cached prefix
  pages, table, cu, kv_lens, Tt = ragged_case(rng, kv_heads=K, dtype=dtype, q_lens=q_lens,
                                              prefix_lens=prefix_lens)
  q = jnp.asarray(rng.randn(Tt, K * group, HD), dtype)
  ref = ragged_paged_prefill_attention_reference(q, pages, table, cu, kv_lens)
  out = ragged_paged_prefill_attention(q, pages, table, cu, kv_lens, max_q_len=max(q_lens),
                                       q_block=8, pages_per_chunk=ppc(2), impl=impl,
                                       interpret=interp(impl))
  assert out.shape == q.shape and out.dtype == q.dtype
  assert_close(out, ref, dtype)
  assert np.all(np.asarray(out[int(cu[-1]):]) == 0)


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_ragged_prefill_sliding_window_and_splits(impl):
  rng = np.random.RandomState(11)
  pages, table, cu, kv_lens, Tt = ragged_case(rng, kv_heads=1, dtype=jnp.float32,
                                              q_lens=[2 * PS + 5, 3], prefix_lens=[3 * PS, 7])
  q = jnp.asarray(rng.randn(Tt, 4, HD), jnp.float32)
  for win in (None, PS + 3):
    ref = ragged_paged_prefill_attention_reference(q, pages, table, cu, kv_lens,
                                                   sliding_window=win)
    out = ragged_paged_prefill_attention(q, pages, table, cu, kv_lens, max_q_len=2 * PS + 5,
                                         q_block=4, sliding_window=win, num_splits=3,
                                         pages_per_chunk=ppc(1), impl=impl, interpret=interp(impl))
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("impl", ["gpu", "tpu"])
def test_general_positions_and_padding_rows(impl):
  """The engine's fused layout: prefill tokens plus a decoder row, and all-padding rows."""
  rng = np.random.RandomState(5)
  pages, table = make_pool(rng, [2 * PS + 3, 5], kv_heads=2, dtype=jnp.float32)
  q_pos = jnp.asarray([[16, 17, 18, 18], [-1, -1, -1, -1]], jnp.int32)
  q = jnp.asarray(rng.randn(2, 4, 4, HD), jnp.float32)
  out = paged_attention(q, pages, table, q_pos, q_block=3, impl=impl, interpret=interp(impl))
  ref = paged_attention_reference(q, pages, table, q_pos)
  assert_close(out, ref, jnp.float32)
  assert np.all(np.asarray(out[1]) == 0)


def test_tpu_kernel_race_free():
  """The double-buffered DMA schedule has no read/write race (interpreter race detector)."""
  rng = np.random.RandomState(9)
  pages, table = make_pool(rng, [5 * PS + 1, PS], kv_heads=1, dtype=jnp.float32)
  q = jnp.asarray(rng.randn(2, 2, 2, HD), jnp.float32)
  ln = jnp.asarray([5 * PS + 1, PS], jnp.int32)
  params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
  out = paged_decode_attention(q, pages, table, ln, impl="tpu", interpret=params,
                               pages_per_chunk=ppc(2))
  assert_close(out, paged_decode_attention_reference(q, pages, table, ln), jnp.float32)
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
  assert not ipc.races.races_found


# ----------------------------------------------------------------------------- validation

def _args():
  q = jnp.zeros((2, 3, 4, HD), jnp.float32)
  pages = jnp.zeros((6, 4, PS, HD), jnp.float32)
  table = jnp.zeros((2, 3), jnp.int32)
  return q, pages, table, jnp.zeros((2, 3), jnp.int32)


@pytest.mark.parametrize("change,kwargs,match", [
    (dict(q=jnp.zeros((2, 4, HD))), {}, "q must be"),
    (dict(pages=jnp.zeros((6, PS, HD))), {}, "pages must be"),
    (dict(pages=jnp.zeros((6, 4, PS, 8))), {}, "head_dim"),
    (dict(pages=jnp.zeros((6, 3, PS, HD))), {}, "must be even"),
    (dict(pages=jnp.zeros((6, 6, PS, HD))), {}, "multiple of the kv heads"),
    (dict(pages=jnp.zeros((6, 4, PS, HD), jnp.bfloat16)), {}, "q dtype"),
    (dict(q=jnp.zeros((2, 3, 4, HD), jnp.int32), pages=jnp.zeros((6, 4, PS, HD), jnp.int32)),
     {}, "unsupported"),
    (dict(page_table=jnp.zeros((3, 3), jnp.int32)), {}, "page_table"),
    (dict(page_table=jnp.zeros((2, 3), jnp.float32)), {}, "page_table"),
    (dict(q_pos=jnp.zeros((2, 2), jnp.int32)), {}, "q_pos"),
    ({}, dict(sliding_window=0), "sliding_window"),
    ({}, dict(q_block=0), "q_block"),
    ({}, dict(pages_per_chunk=-1), "pages_per_chunk"),
    ({}, dict(num_splits=0), "num_splits"),
    ({}, dict(impl="cuda"), "impl"),
])
def test_paged_attention_validation(change, kwargs, match):
  q, pages, table, pos = _args()
  args = dict(q=q, pages=pages, page_table=table, q_pos=pos)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    paged_attention(args["q"], args["pages"], args["page_table"], args["q_pos"], interpret=True,
                    **kwargs)


def test_decode_validation():
  q, pages, table, _ = _args()
  with pytest.raises(ValueError, match="q must be"):
    paged_decode_attention(q[0], pages, table, jnp.ones((2,), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="lengths"):
    paged_decode_attention(q, pages, table, jnp.ones((3,), jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="lengths"):
    paged_decode_attention(q, pages, table, jnp.ones((2,), jnp.float32), interpret=True)
  with pytest.raises(ValueError, match="num_splits"):
    paged_decode_attention(q, pages, table, jnp.ones((2,), jnp.int32), num_splits=0,
                           interpret=True)


def test_ragged_prefill_validation():
  _, pages, table, _ = _args()
  q = jnp.zeros((5, 4, HD), jnp.float32)
  cu = jnp.asarray([0, 2, 5], jnp.int32)
  kv = jnp.asarray([2, 3], jnp.int32)
  call = lambda **kw: ragged_paged_prefill_attention(  # noqa: E731
      **{**dict(q=q, pages=pages, page_tables=table, cu_q_lens=cu, kv_lens=kv, max_q_len=3,
                interpret=True), **kw})
  for kw, match in [(dict(q=q[None]), "q must be"), (dict(page_tables=table[0]), "page_tables"),
                    (dict(cu_q_lens=cu[:2]), "cu_q_lens"), (dict(kv_lens=kv[:1]), "kv_lens"),
                    (dict(kv_lens=kv.astype(jnp.float32)), "kv_lens"),
                    (dict(max_q_len=0), "max_q_len"), (dict(q_block=0), "q_block"),
                    (dict(impl="rocm"), "impl")]:
    with pytest.raises(ValueError, match=match):
      call(**kw)


def test_gpu_lowering_block_shape_validation():
  """Checked before lowering, so it is testable on CPU: Triton blocks must be powers of two."""
  q, pages, table, pos = _args()
  with pytest.raises(ValueError, match=r"pages_per_chunk \* page_size \(1 \* 8\)"):
    paged_attention(q, pages, table, pos, impl="gpu", interpret=False, pages_per_chunk=1)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("T,q_block,dtype,window,splits", [
    (2, None, jnp.bfloat16, None, 1),    # fused decode step, Llama-8B head shapes
    (8, None, jnp.bfloat16, None, 4),    # fan-out to 7 adapters + encoder row, split-K
    (33, 16, jnp.float32, 4096, 1),      # prefill chunk with a decoder row, sliding window
])
def test_real_lowerings_trace_on_cpu(monkeypatch, platform, T, q_block, dtype, window, splits):
  """Cross-lower for CUDA (Pallas -> Triton IR) and TPU (Pallas -> Mosaic MLIR) without the
  hardware: every op of both kernels must be supported by the real lowering, not only by the
  interpreter. (The final PTX / Mosaic compile still needs the device: benchmarks/device_check.sh gpu.)
  """
  if platform == "tpu":  # Mosaic asks the device for its generation; pretend a v5e.
    from jax._src.pallas.mosaic import tpu_info
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
  B, H, K, hd, P, ps, N = 4, 32, 8, 128, 64, 16, 8
  args = (jax.ShapeDtypeStruct((B, T, H, hd), dtype),
          jax.ShapeDtypeStruct(page_shape(P, ps, K, hd), dtype),
          jax.ShapeDtypeStruct((B, N), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.int32))
  impl = "gpu" if platform == "cuda" else "tpu"

  def f(q, pages, table, pos):
    return paged_attention(q, pages, table, pos, impl=impl, interpret=False, q_block=q_block,
                           pages_per_chunk=4, num_splits=splits, sliding_window=window)
  text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert ("__gpu$xla.gpu.triton" in text) if platform == "cuda" else ("tpu_custom_call" in text)


def test_masked_attention_against_a_numpy_loop():
  """The one jnp reference against a per-query numpy loop (float64): GQA grouping, the scale,
  a sliding window, NaN in keys no query sees, and a query that sees nothing (output 0)."""
  from kernels_pallas.reference import causal_visibility, masked_attention
  rng = np.random.RandomState(0)
  B, T, S, H, K, hd, win = 2, 3, 7, 4, 2, 8, 4
  q = rng.randn(B, T, H, hd).astype(np.float32)
  k = rng.randn(B, S, K, hd).astype(np.float32)
  v = rng.randn(B, S, K, hd).astype(np.float32)
  q_pos = np.array([[1, 4, 5], [-1, 2, 3]], np.int32)
  k[0, 6], v[1, 4:] = np.nan, np.inf  # row 0 never sees key 6, row 1 never sees keys >= 4
  vis = np.asarray(causal_visibility(jnp.asarray(q_pos), jnp.arange(S)[None], win))
  out = np.asarray(masked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                    jnp.asarray(vis)))
  for b in range(B):
    for t in range(T):
      seen = [s for s in range(S) if 0 <= s <= q_pos[b, t] and s > q_pos[b, t] - win]
      assert list(np.flatnonzero(vis[b, t])) == seen
      for h in range(H):
        if not seen:
          np.testing.assert_array_equal(out[b, t, h], 0.0)
          continue
        kk = k[b, seen, h // (H // K)].astype(np.float64)
        sc = kk @ q[b, t, h].astype(np.float64) / np.sqrt(hd)
        p = np.exp(sc - sc.max())
        want = (p / p.sum()) @ v[b, seen, h // (H // K)].astype(np.float64)
        np.testing.assert_allclose(out[b, t, h], want, atol=2e-6, rtol=1e-5)
