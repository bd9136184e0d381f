r"""A small mutation tester: do the tests notice when the code is subtly wrong?

  python -m benchmarks.mutation --out docs/results/mutation.json          # by hand, not in CI
  python -m benchmarks.mutation --only sampling --max_per_target 5          # one target, quick

For each target (a function or class of one module, with the tests that should guard it) it
parses the module with ``ast``, generates every single-point mutant of the target's code
(comparison flipped or made strict/loose, ``+``/``-`` and ``*``/``//`` swapped, an integer
constant moved by one, ``and``/``or`` swapped, a ``not`` dropped, ``min``/``max`` swapped, a
slice bound moved by one), samples at most ``--max_per_target`` of them with a fixed seed,
writes each mutant over the module, runs the guarding tests (``pytest -x -q``, with a timeout),
and restores the file. A mutant is *killed* if the tests fail or time out. Results (each mutant
with its line, the change and the outcome) go to JSON; ``docs/results/mutation.md`` explains
the survivors. Resumable: finished mutants are read back from ``--out`` and skipped.

The module file is always restored (``finally``), also on Ctrl-C.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs/results/mutation.json", "results JSON (resumed if present)")
flags.DEFINE_list("only", None, "target names to run (default: all)")
flags.DEFINE_integer("max_per_target", 12, "mutants sampled per target")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_integer("timeout", 600, "seconds per test run (a timeout counts as killed)")
flags.DEFINE_bool("rerun_survivors", False, "re-run only the mutants recorded as survived in "
                  "--out (after tests were added); each record keeps its first outcome in "
                  "'first_status'")
flags.DEFINE_bool("planted", False, "run the hand-planted bug catalogue (PLANTED) instead; "
                  "writes <out>.planted.json")
flags.DEFINE_string("root", None, "repository copy to mutate (default: this checkout); use a copy "
                    "to keep working in the checkout meanwhile")

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  module: str          # path relative to the repo root
  scopes: tuple        # qualified names of functions / classes / methods to mutate
  tests: tuple         # pytest arguments


TARGETS = [
    Target("sampling", "icarus_jax/serving/sampling.py",
           ("sample_rows", "_truncate", "adjusted_logits", "grammar_masked", "adjustments",
            "SamplingParams.__post_init__"),
           ("tests/test_sampler.py", "tests/test_oracles.py", "tests/test_hardening.py", "-k",
            "sampling or greedy or sampled or adjusted or share or engine")),
    Target("kv_cache_manager", "icarus_jax/serving/kv_cache_manager.py",
           ("KVCacheManager.reserve", "KVCacheManager.copied", "KVCacheManager.release",
            "KVCacheManager.ensure_free", "KVCacheManager._retain", "KVCacheManager.expire"),
           ("tests/test_oracles.py", "tests/test_engine.py", "tests/test_workflow_aware.py", "-k",
            "repeated or watermark or retain or retention or accounting or preempt")),
    Target("prefix_cache", "icarus_jax/serving/prefix_cache.py",
           ("PrefixCache.match", "PrefixCache.insert", "PrefixCache.evict",
            "PrefixCache.num_unreferenced", "PrefixCache.drop_namespace"),
           ("tests/test_prefix_cache.py",)),
    Target("page_allocator", "icarus_jax/serving/page_allocator.py",
           ("PageAllocator.allocate", "PageAllocator.incref", "PageAllocator.decref",
            "PageAllocator.free"), ("tests/test_prefix_cache.py",)),
    Target("adapter_gate", "icarus_jax/model/adapters.py", ("AdapterConfig.__post_init__",),
           ("tests/test_oracles.py::test_gate_refuses_every_weight_upstream_of_kv",
            "tests/test_oracles.py::test_adapter_config_refuses_bad_lora_shapes",
            "tests/test_adapters.py")),
    Target("training_objective", "icarus_jax/training/objective.py", ("model_logits", "masked_ce"),
           ("tests/test_oracles.py::test_training_objective_logits_equal_serving_logits",
            "tests/test_oracles.py::test_masked_cross_entropy_and_accuracy_by_hand",
            "tests/test_training.py::test_step_zero_equals_base",
            "tests/test_training.py::test_no_gradient_reaches_the_encoder",
            "tests/test_training.py::test_icarus_training_lowers_loss_and_never_touches_the_base")),
    Target("scheduler", "icarus_jax/serving/scheduler.py",
           ("Scheduler._reserve", "Scheduler._shares_page", "Scheduler._admit",
            "Scheduler.schedule", "Scheduler._reserve_decode_pages"),
           ("tests/test_oracles.py", "tests/test_engine.py", "-k",
            "repeated or watermark or budget or status_follows or (reference and (mixed or "
            "cross_model_reuse_icarus or fan_out or accounting))")),
    Target("stop_strings", "icarus_jax/serving/stop_strings.py",
           ("StopStringMatcher.__init__", "StopStringMatcher._decode_new",
            "StopStringMatcher._emit", "StopStringMatcher.add", "StopStringMatcher.finish"),
           ("tests/test_stop_strings.py",)),
    Target("server_streaming", "icarus_jax/serving/openai_requests.py",
           ("RequestHandler.apply_event", "RequestHandler.flush_text"),
           ("tests/test_server.py", "tests/test_server_hardening.py", "-k",
            "stop or streamed or dead_engine")),
]


# Hand-planted bugs of the kinds that once survived the suite (issue: tests that catch real
# bugs). Each: (name, module, exact text, replacement, pytest args). ``--planted`` runs them.
PLANTED = [
    ("training encoder sees the adapter", "icarus_jax/model/transformer.py",
     '_, kv = single_stream(cfg, base, {"layers": {}}, tokens, positions, None, False)',
     '_, kv = single_stream(cfg, *model_view(base, adapter), tokens, positions, None, False)',
     ("tests/test_oracles.py", "-k", "training")),
    ("top-p off by one", "icarus_jax/serving/sampling.py",
     "cutoff_idx = jnp.sum(cum - probs < s.top_p[:, None], axis=-1) - 1",
     "cutoff_idx = jnp.sum(cum < s.top_p[:, None], axis=-1) - 1",
     ("tests/test_oracles.py", "-k", "sampling")),
    ("temperature ignored", "icarus_jax/serving/sampling.py", "tempered = x / t", "tempered = x",
     ("tests/test_oracles.py", "-k", "sampling")),
    ("isolated mode reuses the last prompt token of a fully cached prompt",
     "icarus_jax/serving/scheduler.py", "limit = len(S) if icarus else len(S) - 1",
     "limit = len(S)", ("tests/test_oracles.py", "-k", "repeated")),
    ("stop-string hold-back removed in streaming", "icarus_jax/serving/stop_strings.py",
     "self._hold = max((len(s) for s in stops), default=1) - 1", "self._hold = 0",
     ("tests/test_server.py", "-k", "streamed_text")),
    ("LRU eviction turned into MRU", "icarus_jax/serving/prefix_cache.py",
     "heap = [(nd.last_access, id(nd), nd)", "heap = [(-nd.last_access, id(nd), nd)",
     ("tests/test_prefix_cache.py",)),
    ("gate no longer refuses k/v biases and k-norm", "icarus_jax/model/params.py",
     'ENCODER_ONLY_WEIGHTS = ("embed", "k", "v", "k_bias", "v_bias", "k_norm")',
     'ENCODER_ONLY_WEIGHTS = ("embed", "k", "v")', ("tests/test_oracles.py", "-k", "gate")),
    ("refcount leak after copy-on-write", "icarus_jax/serving/kv_cache_manager.py",
     "    if res.copy is not None:\n      self.alloc.decref([res.copy[0]])",
     "    if res.copy is not None:\n      pass", ("tests/test_oracles.py", "-k", "repeated")),
    ("logit_bias ignored", "icarus_jax/serving/sampling.py",
     "  x = logits + dense(s.adj_bias, jnp.float32)", "  x = logits",
     ("tests/test_sampler.py",)),
    ("grammar mask not applied", "icarus_jax/serving/sampling.py",
     "  x = adjusted_logits(grammar_masked(logits, s.allowed), s)",
     "  x = adjusted_logits(logits, s)", ("tests/test_sampler.py", "-k", "grammar")),
]


def run_planted(out_path) -> list[dict]:
  results = []
  for name, module, old, new, tests in PLANTED:
    path = ROOT / module
    original = path.read_text()
    if original.count(old) != 1:
      raise SystemExit(f"planted bug {name!r}: the text to replace is not unique in {module}")
    try:
      path.write_text(original.replace(old, new))
      status, secs = run_tests(tests, FLAGS.timeout)
    finally:
      path.write_text(original)
    results.append({"bug": name, "module": module, "tests": " ".join(tests), "status": status,
                    "seconds": round(secs, 1)})
    print(f"{name:70s} {status}")
  out_path.write_text(json.dumps({"planted": results, "date": time.strftime("%Y-%m-%d")},
                                 indent=1))
  return results


# ----------------------------------------------------------------------------- mutants

CMP_SWAPS = {ast.Lt: [ast.LtE, ast.Gt], ast.LtE: [ast.Lt, ast.GtE], ast.Gt: [ast.GtE, ast.Lt],
             ast.GtE: [ast.Gt, ast.LtE], ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq],
             ast.In: [ast.NotIn], ast.NotIn: [ast.In], ast.Is: [ast.IsNot], ast.IsNot: [ast.Is]}
BIN_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult,
             ast.Div: ast.Mult}


def _scopes(tree):
  """{qualified name: node} for functions and classes, nested names joined by dots."""
  out = {}

  def walk(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        name = f"{prefix}.{child.name}" if prefix else child.name
        out[name] = child
        walk(child, name)
      else:
        walk(child, prefix)
  walk(tree, "")
  return out


def mutants(source: str, scopes) -> list[tuple[int, str, str]]:
  """Every single-point mutant inside ``scopes``: (line, description, mutated source)."""
  tree = ast.parse(source)
  found = _scopes(tree)
  missing = [s for s in scopes if s not in found]
  if missing:
    raise SystemExit(f"scopes not found: {missing}")
  sites = []
  for s in scopes:
    for node in ast.walk(found[s]):
      if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
          for new in CMP_SWAPS.get(type(op), []):
            sites.append((node, ("cmp", i, new), f"{type(op).__name__} -> {new.__name__}"))
      elif isinstance(node, ast.BinOp) and type(node.op) in BIN_SWAPS:
        new = BIN_SWAPS[type(node.op)]
        sites.append((node, ("bin", new), f"{type(node.op).__name__} -> {new.__name__}"))
      elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        sites.append((node, ("bool", new), f"{type(node.op).__name__} -> {new.__name__}"))
      elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        sites.append((node, ("not",), "drop not"))
      elif (isinstance(node, ast.Constant) and type(node.value) is int
            and not isinstance(node.value, bool)):
        sites.append((node, ("int", 1), f"{node.value} -> {node.value + 1}"))
        sites.append((node, ("int", -1), f"{node.value} -> {node.value - 1}"))
      elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
          node.func.id in ("min", "max"):
        new = "max" if node.func.id == "min" else "min"
        sites.append((node, ("call", new), f"{node.func.id} -> {new}"))
  seen_src = {ast.unparse(tree)}
  out = []
  for idx, (node, change, desc) in enumerate(sites):
    t2 = copy.deepcopy(tree)
    target = [n for n in ast.walk(t2)][[n for n in ast.walk(tree)].index(node)]
    kind = change[0]
    if kind == "cmp":
      target.ops[change[1]] = change[2]()
    elif kind == "bin":
      target.op = change[1]()
    elif kind == "bool":
      target.op = change[1]()
    elif kind == "not":
      _replace(t2, target, target.operand)
    elif kind == "int":
      target.value = target.value + change[1]
    elif kind == "call":
      target.func.id = change[1]
    src = ast.unparse(t2)
    if src in seen_src:
      continue
    seen_src.add(src)
    out.append((node.lineno, desc, src))
  return out


def _replace(tree, old, new):
  for parent in ast.walk(tree):
    for field, value in ast.iter_fields(parent):
      if value is old:
        setattr(parent, field, new)
        return
      if isinstance(value, list) and old in value:
        value[value.index(old)] = new
        return


def run_tests(tests, timeout) -> tuple[str, float]:
  t0 = time.time()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  try:
    p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                        *tests], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
  except subprocess.TimeoutExpired:
    return "killed (timeout)", time.time() - t0
  if p.returncode == 5:
    raise SystemExit(f"no tests selected by {tests}")
  return ("survived" if p.returncode == 0 else "killed"), time.time() - t0


def main(argv):
  del argv
  global ROOT
  from tqdm import tqdm
  out_path = ROOT / FLAGS.out
  if FLAGS.root:
    ROOT = Path(FLAGS.root).resolve()
  if FLAGS.planted:
    run_planted(out_path.with_suffix(".planted.json"))
    return
  done = json.loads(out_path.read_text()) if out_path.exists() else {"mutants": []}
  seen = {(m["target"], m["line"], m["change"], m["index"]) for m in done["mutants"]}
  targets = [t for t in TARGETS if not FLAGS.only or t.name in FLAGS.only]
  plan = []
  for t in targets:
    path = ROOT / t.module
    src = path.read_text()
    ms = mutants(src, t.scopes)
    rng = random.Random(f"{FLAGS.seed}/{t.name}")
    picked = sorted(rng.sample(range(len(ms)), min(FLAGS.max_per_target, len(ms))))
    for i in picked:
      plan.append((t, i, ms[i], len(ms)))
  for t in targets:  # the unmutated tests must pass, or every mutant would look killed
    status, _ = run_tests(t.tests, FLAGS.timeout)
    if status != "survived":
      raise SystemExit(f"target {t.name}: its tests fail on the unmutated code")
  if FLAGS.rerun_survivors:
    names = {t.name for t in targets}
    again = {(m["target"], m["index"]) for m in done["mutants"]
             if m["status"] == "survived" and m["target"] in names}
    done["mutants"] = [m for m in done["mutants"] if (m["target"], m["index"]) not in again]
    first = {k: "survived" for k in again}
    plan = [p for p in plan if (p[0].name, p[1]) in again]
    seen = set()
  else:
    first = {}
  for t, i, (line, desc, msrc), total in tqdm(plan, desc="mutants"):
    key = (t.name, line, desc, i)
    if key in seen:
      continue
    path = ROOT / t.module
    original = path.read_text()
    try:
      path.write_text(msrc + "\n")
      status, secs = run_tests(t.tests, FLAGS.timeout)
    finally:
      path.write_text(original)
    done["mutants"].append({"target": t.name, "module": t.module, "index": i, "line": line,
                            "change": desc, "status": status, "seconds": round(secs, 1),
                            "mutants_in_target": total,
                            "first_status": first.get((t.name, i), status)})
    tqdm.write(f"{t.name:20s} line {line:4d} {desc:28s} {status}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(done, indent=1))  # resumable after every mutant
  summary = {}
  for m in done["mutants"]:
    s = summary.setdefault(m["target"], {"run": 0, "killed": 0, "survived": []})
    s["run"] += 1
    if m["status"].startswith("killed"):
      s["killed"] += 1
    else:
      s["survived"].append(f"{m['module']}:{m['line']} {m['change']}")
  done["summary"] = summary
  done["command"] = "python -m benchmarks.mutation " + " ".join(sys.argv[1:])
  done["date"] = time.strftime("%Y-%m-%d")
  out_path.write_text(json.dumps(done, indent=1))
  for name, s in summary.items():
    print(f"{name:20s} killed {s['killed']}/{s['run']}  survivors: {s['survived']}")


if __name__ == "__main__":
  app.run(main)
