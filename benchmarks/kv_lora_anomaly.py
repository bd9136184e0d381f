"""Why does conventional LoRA with k/v targets fail `reversal` while the same LoRA without k/v learns
it? (issue 16, item 8). An experiment, not a tuned result.

    python benchmarks/kv_lora_anomaly.py            # resumable; docs/results/kv_lora_anomaly.{json,md,png}

Same base (the embedded small base), data order, rank 16 / alpha 32, LR 3e-3, 300 steps, batch 32,
seed 0; only the targets and the gradient clipping differ:

* ``matched``      : LoRA on q, o, gate, up, down, lm_head (ICaRus's targets), global-norm clip 1.0
* ``kv``           : + k, v (the default conventional targets), global-norm clip 1.0
* ``kv_noclip``    : + k, v, no clipping
* ``kv_pertarget`` : + k, v, each target's gradient clipped to norm 1.0 on its own
* ``k_only`` / ``v_only`` : ICaRus's targets + k (+ v): which of the two slows training
* ``kv_lr0.1``     : + k, v with the k/v updates scaled by 0.1 (a 10x smaller LR on k/v only)
* ``kv_2x_steps`` / ``matched_2x_steps`` : 600 steps (is it slower, or stuck?)

Every 10 steps it records the loss and the gradient norm of each target's (a, b) factors before
clipping, and the factor by which the global clip scaled the whole update. At the end: exact match
on 200 held-out test prompts. The hypothesis it tests: k/v gradients are much larger than the
others, so one global-norm clip shrinks every target's update and the superset trains slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icarus_jax.model.adapters import DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS, Adapter  # noqa: E402
from icarus_jax.checkpoints.assets import load_any_base  # noqa: E402
from icarus_jax.training.data import eval_prompts, examples_source, make_dataset  # noqa: E402
from icarus_jax.model.generation import exact_match_accuracy  # noqa: E402
from icarus_jax.model.tokenizer import ByteTokenizer  # noqa: E402
from icarus_jax.training.objective import TrainConfig, init_trainable, loss_fn, make_optimizer  # noqa: E402

#: name -> (targets, clipping, factor on the k/v updates, step multiplier)
CONFIGS = {
    "matched": (DEFAULT_ICARUS_TARGETS, "global", 1.0, 1),
    "kv": (DEFAULT_LORA_TARGETS, "global", 1.0, 1),
    "kv_noclip": (DEFAULT_LORA_TARGETS, "none", 1.0, 1),
    "kv_pertarget": (DEFAULT_LORA_TARGETS, "per_target", 1.0, 1),
    "k_only": (DEFAULT_ICARUS_TARGETS + ("k",), "global", 1.0, 1),
    "v_only": (DEFAULT_ICARUS_TARGETS + ("v",), "global", 1.0, 1),
    "kv_lr0.1": (DEFAULT_LORA_TARGETS, "global", 0.1, 1),
    "kv_2x_steps": (DEFAULT_LORA_TARGETS, "global", 1.0, 2),
    "matched_2x_steps": (DEFAULT_ICARUS_TARGETS, "global", 1.0, 2),
}


def target_norms(grads) -> dict[str, float]:
  """Gradient norm of each target's LoRA factors (a and b together)."""
  out = {}
  for t, ab in grads.get("layers", {}).items():
    out[t] = optax.global_norm(ab)
  if "lm_head" in grads:
    out["lm_head"] = optax.global_norm(grads["lm_head"])
  return out


def make_step(cfg, clip: str, tc: TrainConfig, kv_scale: float = 1.0):
  # the training code's optimizer (warmup + cosine AdamW) with its clip disabled: clipping is
  # done here, in the three variants compared
  adam = make_optimizer(dataclasses.replace(tc, clip_norm=float("inf")))

  @jax.jit
  def step(adapter, opt_state, base, batch):
    (_, met), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapter, cfg, base, batch)
    g = grads.params
    norms = target_norms(g)
    total = optax.global_norm(g)
    scale = jnp.float32(1.0)
    if clip == "global":
      scale = jnp.minimum(1.0, tc.clip_norm / (total + 1e-6))
      g = jax.tree.map(lambda x: x * scale, g)
    elif clip == "per_target":
      def clip_one(sub):
        n = optax.global_norm(sub)
        return jax.tree.map(lambda x: x * jnp.minimum(1.0, tc.clip_norm / (n + 1e-6)), sub)
      g = {k: ({t: clip_one(ab) for t, ab in v.items()} if k == "layers" else clip_one(v))
           for k, v in g.items()}
    updates, opt_state = adam.update(g, opt_state, adapter.params)
    if kv_scale != 1.0:
      updates = {**updates, "layers": {t: (jax.tree.map(lambda u: u * kv_scale, ab)
                                           if t in ("k", "v") else ab)
                                       for t, ab in updates["layers"].items()}}
    params = optax.apply_updates(adapter.params, updates)
    return Adapter(params, adapter.config), opt_state, met["loss"], norms, total, scale

  return step, adam


def run_one(name, cfg, base, ds, tok, prompts, answers, steps):
  targets, clip, kv_scale, mult = CONFIGS[name]
  steps *= mult
  tc = TrainConfig(mode="lora", rank=16, alpha=32.0, targets=tuple(targets), learning_rate=3e-3,
                   warmup_steps=20, total_steps=steps, batch_size=32, seq_len=32, seed=0)
  adapter = init_trainable(cfg, base, tc, name=name)
  step, adam = make_step(cfg, clip, tc, kv_scale)
  opt_state = adam.init(adapter.params)
  curve = []
  t0 = time.time()
  from tqdm.auto import tqdm
  for i in tqdm(range(steps), desc=name, leave=False):
    batch = {k: jnp.asarray(v) for k, v in ds[i].items()}
    adapter, opt_state, loss, norms, total, scale = step(adapter, opt_state, base, batch)
    if (i + 1) % 10 == 0 or i == 0:
      curve.append({"step": i + 1, "loss": float(loss), "grad_norm": float(total),
                    "clip_scale": float(scale),
                    "target_grad_norm": {t: float(n) for t, n in norms.items()}})
  acc, _ = exact_match_accuracy(cfg, base, adapter, prompts, answers, tok)
  return {"name": name, "targets": list(targets), "clip": clip, "kv_update_scale": kv_scale,
          "steps": steps,
          "final_loss": curve[-1]["loss"], "test_acc": acc, "test_n": len(answers),
          "curve": curve, "wall_s": round(time.time() - t0, 1)}


def plot(records, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for r in records:
    s = [c["step"] for c in r["curve"]]
    axes[0].plot(s, [c["loss"] for c in r["curve"]], label=f"{r['name']} ({100 * r['test_acc']:.0f}%)")
    axes[2].plot(s, [c["clip_scale"] for c in r["curve"]], label=r["name"])
  kv = next(r for r in records if r["name"] == "kv")
  s = [c["step"] for c in kv["curve"]]
  for t in kv["curve"][0]["target_grad_norm"]:
    axes[1].plot(s, [c["target_grad_norm"][t] for c in kv["curve"]], label=t)
  axes[0].set(title="reversal: train loss", xlabel="step", yscale="log")
  axes[1].set(title="'kv' run: gradient norm per target (before clip)", xlabel="step", yscale="log")
  axes[2].set(title="global clip scale applied to the update", xlabel="step", yscale="log")
  for ax in axes:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--configs", default=",".join(CONFIGS))
  ap.add_argument("--out", default="docs/results")
  ap.add_argument("--tfds_dir", default="~/tensorflow_datasets")
  a = ap.parse_args()
  out = Path(a.out)
  jsonl = out / "kv_lora_anomaly.jsonl"
  done = {json.loads(l)["name"] for l in jsonl.read_text().splitlines()} if jsonl.exists() else set()
  cfg, base = load_any_base(None)
  tok = ByteTokenizer()
  tfds_dir = os.path.expanduser(a.tfds_dir)
  ds = make_dataset(examples_source("reversal", "train", data_dir=tfds_dir), tok, batch_size=32,
                    seq_len=32, seed=0)
  prompts, answers = eval_prompts(examples_source("reversal", "test", data_dir=tfds_dir), tok, 200)
  for name in a.configs.split(","):
    if name in done:
      continue
    rec = run_one(name, cfg, base, ds, tok, prompts, answers, a.steps)
    with jsonl.open("a") as f:
      f.write(json.dumps(rec) + "\n")
    print(f"{name}: final loss {rec['final_loss']:.3f}, test {rec['test_acc']:.3f}", flush=True)
  records = [json.loads(l) for l in jsonl.read_text().splitlines()]
  summary = {"command": "python benchmarks/kv_lora_anomaly.py " + " ".join(sys.argv[1:]),
             "machine": f"{platform.machine()}, {os.cpu_count()} cores", "seed": 0,
             "date": time.strftime("%Y-%m-%d"), "records": records}
  (out / "kv_lora_anomaly.json").write_text(json.dumps(summary, indent=1) + "\n")
  plot(records, out / "kv_lora_anomaly.png")
  for r in records:
    c = r["curve"]
    mean = lambda t: np.mean([x["target_grad_norm"].get(t, np.nan) for x in c])
    print(f"{r['name']:13s} loss {r['final_loss']:.3f} acc {r['test_acc']:.3f} "
          f"mean clip scale {np.mean([x['clip_scale'] for x in c]):.3f} "
          f"grad norms k {mean('k'):.3g} v {mean('v'):.3g} q {mean('q'):.3g} o {mean('o'):.3g} "
          f"down {mean('down'):.3g} head {mean('lm_head'):.3g}")


if __name__ == "__main__":
  main()
