r"""Paged attention kernels vs the jnp reference: correctness on the real lowering, then timings.

  python -m benchmarks.kernels --out docs/results/kernels_gpu.json            # on a GPU / TPU
  python -m benchmarks.kernels --preset=cpu --out /tmp/kernels_cpu.json       # smoke run on CPU

For every point of the sweep (batch, streams, context length, page size) it times the Pallas
decode kernel and the jnp reference (median of ``--iters`` after warm-up), and reports the bytes
the kernel must read (the K/V pages of every row, once, plus q and the output), the achieved
bandwidth and its fraction of the device's peak. ``fold_speedup`` compares one call with S
streams against S single-stream calls: the page reads the stream folding saves. A short ragged
prefill sweep follows. On CPU the kernels run in interpret mode: those timings say nothing about
kernel speed, the run only proves the script works.

Every kernel output is first checked against the reference (max abs error written to the JSON;
the run fails if it exceeds the dtype's tolerance).
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kernels_pallas.paged_decode_attention import (paged_decode_attention,
                                                   paged_decode_attention_reference)
from kernels_pallas.ragged_prefill_attention import (ragged_paged_prefill_attention,
                                                     ragged_paged_prefill_attention_reference)
from kernels_pallas.reference import page_shape

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs/results/kernels.json", "where to write the JSON results")
flags.DEFINE_enum("preset", "auto", ["auto", "gpu", "cpu"], "sweep size (auto: by backend)")
flags.DEFINE_integer("iters", 20, "timed iterations per point")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_string("impl", "auto", "kernel lowering: auto | gpu | tpu")

# Peak HBM bandwidth in bytes/s by device_kind substring (vendor data sheets).
PEAK_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 3.0e11, "TPU v5 lite": 8.19e11,
           "TPU v5e": 8.19e11, "TPU v5p": 2.765e12, "TPU v6": 1.64e12, "TPU v4": 1.2e12}
TOL = {"float32": 2e-4, "bfloat16": 3e-2}

PRESETS = {
    # Llama-3.1-8B attention shapes: 32 query heads, 8 kv heads, head_dim 128, bf16.
    "gpu": dict(heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", batches=(1, 16),
                streams=(1, 2, 4, 8), contexts=(1024, 8192), page_sizes=(16, 64),
                prefill=((4, 512, 0), (4, 512, 2048), (16, 128, 1024))),
    "cpu": dict(heads=4, kv_heads=2, head_dim=16, dtype="float32", batches=(1, 4),
                streams=(1, 2, 4, 8), contexts=(64,), page_sizes=(8, 16),
                prefill=((2, 16, 0), (2, 16, 32))),
}


def peak_bandwidth(kind: str) -> float | None:
  for key, bw in PEAK_BW.items():
    if key.lower() in kind.lower():
      return bw
  return None


def time_fn(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def make_pool(rng, batch, ctx, ps, kv_heads, hd, dtype):
  """Shuffled page tables; the pool holds exactly the pages the rows use, plus the null page."""
  n = math.ceil(ctx / ps)
  P = batch * n + 1
  pages = jnp.asarray(rng.standard_normal(page_shape(P, ps, kv_heads, hd), np.float32), dtype)
  table = jnp.asarray(rng.permutation(np.arange(1, P)).reshape(batch, n).astype(np.int32))
  return pages, table


def default_splits(batch: int, kv_heads: int, n_pages: int, ppc: int, num_cores: int) -> int:
  """Enough split-K programs to fill the device when batch * kv_heads alone does not."""
  programs = batch * kv_heads
  if programs >= num_cores:
    return 1
  return max(1, min(n_pages // ppc, math.ceil(num_cores / programs), 32))


def decode_point(rng, p, batch, streams, ctx, ps, interpret, num_cores, iters):
  H, K, hd, dtype = p["heads"], p["kv_heads"], p["head_dim"], jnp.dtype(p["dtype"])
  pages, table = make_pool(rng, batch, ctx, ps, K, hd, dtype)
  lengths = jnp.full((batch,), ctx, jnp.int32)
  q = jnp.asarray(rng.standard_normal((batch, streams, H, hd), np.float32), dtype)
  ppc = max(1, 128 // ps)  # 128 keys per inner step
  splits = default_splits(batch, K, table.shape[1], ppc, num_cores)
  kern = jax.jit(lambda q, pg, t, ln: paged_decode_attention(
      q, pg, t, ln, pages_per_chunk=ppc, num_splits=splits, impl=FLAGS.impl,
      interpret=interpret))
  ref = jax.jit(paged_decode_attention_reference)
  out, want = kern(q, pages, table, lengths), ref(q, pages, table, lengths)
  err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))
  if not err <= TOL[p["dtype"]]:
    raise SystemExit(f"kernel/reference mismatch {err} at batch={batch} streams={streams} "
                     f"ctx={ctx} ps={ps}")
  t_k = time_fn(kern, q, pages, table, lengths, iters=iters)
  t_r = time_fn(ref, q, pages, table, lengths, iters=iters)
  isz = dtype.itemsize
  kv_bytes = batch * ctx * 2 * K * hd * isz
  qo_bytes = 2 * batch * streams * H * hd * isz
  row = dict(kind="decode", batch=batch, streams=streams, context=ctx, page_size=ps,
             pages_per_chunk=ppc, num_splits=splits, max_abs_err=err, kernel_s=t_k,
             reference_s=t_r, speedup_vs_reference=t_r / t_k, bytes=kv_bytes + qo_bytes,
             kernel_bw=(kv_bytes + qo_bytes) / t_k)
  return row


def prefill_point(rng, p, seqs, q_len, prefix, interpret, iters, ps=16):
  H, K, hd, dtype = p["heads"], p["kv_heads"], p["head_dim"], jnp.dtype(p["dtype"])
  kv_len = q_len + prefix
  pages, table = make_pool(rng, seqs, kv_len, ps, K, hd, dtype)
  cu = jnp.arange(seqs + 1, dtype=jnp.int32) * q_len
  kv_lens = jnp.full((seqs,), kv_len, jnp.int32)
  q = jnp.asarray(rng.standard_normal((seqs * q_len, H, hd), np.float32), dtype)
  kern = jax.jit(lambda q, pg, t, c, kl: ragged_paged_prefill_attention(
      q, pg, t, c, kl, max_q_len=q_len, q_block=min(q_len, 64), pages_per_chunk=max(1, 64 // ps),
      impl=FLAGS.impl, interpret=interpret))
  ref = jax.jit(ragged_paged_prefill_attention_reference)
  out, want = kern(q, pages, table, cu, kv_lens), ref(q, pages, table, cu, kv_lens)
  err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))
  if not err <= TOL[p["dtype"]]:
    raise SystemExit(f"prefill kernel/reference mismatch {err} at seqs={seqs} q_len={q_len}")
  t_k = time_fn(kern, q, pages, table, cu, kv_lens, iters=iters)
  t_r = time_fn(ref, q, pages, table, cu, kv_lens, iters=iters)
  # Causal FLOPs: each new token sees prefix + its own index + 1 keys; 4 * hd per (q head, key).
  keys = seqs * (q_len * prefix + q_len * (q_len + 1) / 2)
  flops = 4 * hd * H * keys
  return dict(kind="prefill", seqs=seqs, q_len=q_len, prefix=prefix, page_size=ps,
              max_abs_err=err, kernel_s=t_k, reference_s=t_r, speedup_vs_reference=t_r / t_k,
              kernel_tflops=flops / t_k / 1e12)


def main(_):
  backend = jax.default_backend()
  preset = FLAGS.preset if FLAGS.preset != "auto" else ("cpu" if backend == "cpu" else "gpu")
  p = PRESETS[preset]
  interpret = backend == "cpu"
  dev = jax.devices()[0]
  kind = dev.device_kind
  num_cores = getattr(dev, "core_count", None) or 132
  peak = peak_bandwidth(kind)
  rng = np.random.default_rng(FLAGS.seed)
  rows = []
  try:
    from tqdm import tqdm
  except ImportError:  # the GPU image may lack tqdm
    tqdm = lambda x, **_: x  # noqa: E731
  points = [(b, s, c, ps) for b in p["batches"] for c in p["contexts"] for ps in p["page_sizes"]
            for s in p["streams"]]
  for b, s, c, ps in tqdm(points, desc="decode"):
    row = decode_point(rng, p, b, s, c, ps, interpret, num_cores, FLAGS.iters)
    row["peak_bw"] = peak
    row["bw_fraction"] = row["kernel_bw"] / peak if peak else None
    rows.append(row)
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}),
          flush=True)
  for r in rows:  # one S-stream call vs S one-stream calls on the same pool
    one = next(o for o in rows if o["batch"] == r["batch"] and o["context"] == r["context"]
               and o["page_size"] == r["page_size"] and o["streams"] == 1)
    r["fold_speedup"] = r["streams"] * one["kernel_s"] / r["kernel_s"]
  for seqs, q_len, prefix in tqdm(p["prefill"], desc="prefill"):
    row = prefill_point(rng, p, seqs, q_len, prefix, interpret, FLAGS.iters)
    rows.append(row)
    print(json.dumps(row), flush=True)
  result = dict(
      command="python -m benchmarks.kernels " + " ".join(
          f"--{k}={getattr(FLAGS, k)}" for k in ("out", "preset", "iters", "seed", "impl")),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      backend=backend, device_kind=kind, num_devices=jax.device_count(), jax=jax.__version__,
      host=platform.node(), interpret=interpret, model=p, peak_bw=peak, rows=rows)
  out = Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  dec = [r for r in rows if r["kind"] == "decode"]
  best = max(dec, key=lambda r: r["kernel_bw"])
  print(f"wrote {out}: {len(rows)} points on {kind} ({backend}); best decode bandwidth "
        f"{best['kernel_bw'] / 1e9:.1f} GB/s"
        + (f" = {best['kernel_bw'] / peak:.0%} of peak" if peak else ""))


if __name__ == "__main__":
  app.run(main)
