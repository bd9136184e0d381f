"""LoRA fine-tuning speed on SmolLM2-135M: this project vs transformers + peft (PyTorch, CPU).

    python benchmarks/train_speed.py --cores=0 --torch_python=/path/to/venv-with-torch/bin/python

Same model shape (SmolLM2-135M: 30 layers, d=576, 9 q / 3 kv heads, vocab 49152, tied
embedding), batch, sequence length, LoRA rank/alpha, targets (q, o, gate, up, down, lm_head:
ICaRus's decoder targets), optimizer (AdamW), fp32, and the same CPU cores (each framework runs in
its own process pinned with ``taskset`` to ``--cores``; torch gets ``set_num_threads(len(cores))``,
XLA's CPU client sees the same affinity). Steps after ``--warmup`` untimed steps (compilation
excluded) are timed; tokens/s = batch x seq_len / median step time. Rows:

* ``jax_lora``: conventional single-stream LoRA in this project (the like-for-like PEFT row);
* ``jax_icarus_lora``: ICaRus-LoRA (frozen encoder stream + trained decoder stream): the cost of
  the second stream, against ``jax_lora``;
* ``torch_peft_lora``: ``transformers.LlamaForCausalLM`` + ``peft.LoraConfig`` on the same targets.

Writes ``docs/results/train_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q", "o", "gate", "up", "down", "lm_head")
HF_TARGETS = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def jax_worker(args) -> dict:
  """Runs in a pinned subprocess: median step time of this project's train_step."""
  import jax
  import numpy as np
  from icarus_jax.checkpoints.assets import load_any_base
  from icarus_jax.training.objective import TrainConfig, init_trainable, make_optimizer, train_step
  cfg, base = load_any_base("smollm2")
  tc = TrainConfig(mode=args.mode, rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS,
                   batch_size=args.batch_size, seq_len=args.seq_len, total_steps=1000,
                   warmup_steps=1)
  adapter = init_trainable(cfg, base, tc)
  tx = make_optimizer(tc)
  opt = tx.init(adapter.params)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), dtype=np.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
           "mask": np.ones((args.batch_size, args.seq_len), np.float32)}
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    adapter, opt, met = train_step(cfg, adapter, opt, base, batch, tx=tx)
    jax.block_until_ready(met["loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  return {"step_times_s": times, "devices": str(jax.devices()), "jax": jax.__version__}


def torch_worker(args) -> dict:
  # benchmarks/kernels.py would shadow the `kernels` package transformers imports
  here = str(Path(__file__).resolve().parent)
  sys.path[:] = [p for p in sys.path if p not in ("", here)]
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.set_num_threads(len(args.cores.split(",")))
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True, attn_implementation="sdpa")
  model = LlamaForCausalLM(cfg).float()
  model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                           target_modules=HF_TARGETS, lora_dropout=0.0))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
  g = torch.Generator().manual_seed(0)
  toks = torch.randint(0, 49152, (args.batch_size, args.seq_len), generator=g)
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    out = model(input_ids=toks, labels=toks)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  import peft
  import transformers
  return {"step_times_s": times, "torch": torch.__version__, "transformers":
          transformers.__version__, "peft": peft.__version__,
          "threads": torch.get_num_threads(),
          "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def pinned(python: str, row: str, args) -> dict:
  cmd = ["taskset", "-c", args.cores, python, str(Path(__file__).resolve()), f"--worker={row}",
         f"--cores={args.cores}", f"--batch_size={args.batch_size}", f"--seq_len={args.seq_len}",
         f"--rank={args.rank}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": str(len(args.cores.split(",")))}
  torch_row = row.startswith("torch")
  if not torch_row:  # the torch venv must not see this checkout's packages on its path
    env["PYTHONPATH"] = str(ROOT)
  else:
    env.pop("PYTHONPATH", None)
  r = subprocess.run(cmd, capture_output=True, text=True, env=env,
                     cwd="/" if torch_row else ROOT)
  if r.returncode != 0:
    raise SystemExit(f"{row} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--worker", default=None)
  ap.add_argument("--cores", default="0", help="CPU cores for every row (taskset list)")
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--torch_python", default=sys.executable)
  ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
  args = ap.parse_args()
  if args.worker:
    args.mode = {"jax_lora": "lora", "jax_icarus_lora": "icarus_lora"}.get(args.worker)
    res = torch_worker(args) if args.worker == "torch_peft_lora" else jax_worker(args)
    print(json.dumps(res))
    return
  rows = {}
  for row, py in (("jax_lora", sys.executable), ("jax_icarus_lora", sys.executable),
                  ("torch_peft_lora", args.torch_python)):
    res = pinned(py, row, args)
    med = statistics.median(res["step_times_s"])
    res.update(median_step_s=round(med, 3),
               tokens_per_s=round(args.batch_size * args.seq_len / med, 1))
    rows[row] = res
    print(f"{row:16s} median step {med:.3f} s  {res['tokens_per_s']:.0f} tokens/s", flush=True)
  ratio = rows["jax_lora"]["tokens_per_s"] / rows["torch_peft_lora"]["tokens_per_s"]
  icarus_cost = rows["jax_lora"]["tokens_per_s"] / rows["jax_icarus_lora"]["tokens_per_s"]
  out = {"command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
         "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
         f"{os.cpu_count()} cores visible, rows pinned to cores {args.cores}",
         "config": {k: getattr(args, k) for k in ("batch_size", "seq_len", "rank", "steps",
                                                  "warmup", "cores")},
         "targets": list(TARGETS), "rows": rows,
         "jax_lora_over_peft": round(ratio, 3), "icarus_over_lora_step_cost": round(icarus_cost, 3)}
  Path(args.out).mkdir(parents=True, exist_ok=True)
  (Path(args.out) / "train_speed.json").write_text(json.dumps(out, indent=1) + "\n")
  print(json.dumps({k: out[k] for k in ("jax_lora_over_peft", "icarus_over_lora_step_cost")}))


if __name__ == "__main__":
  main()
