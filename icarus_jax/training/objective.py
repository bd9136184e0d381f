"""Training: the ICaRus objective and the conventional baselines, one jitted step, optax.

Modes (``TrainConfig.mode``):

* ``icarus_lora`` / ``icarus_full``: the encoder is the frozen base, run without gradients
  (``stop_gradient`` on its K/V); only the decoder stream's adapter is trained.
* ``lora``: standard LoRA (adapter on q, k, v, o, MLP, head): the model owns its K/V.
* ``full``: standard full fine-tuning (every weight, held as a ``full`` adapter).

The step runs the Flax NNX model (``model.modules``) as a pure function: it is split into a
graph, the frozen base state and the adapter state, and only the adapter state is
differentiated and given to the optimizer; the base is an argument of the step, never of
``optax`` (it cannot change). The loss is next-token cross-entropy averaged over
``mask`` (response tokens only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
import functools
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from icarus_jax.model.adapters import (DEFAULT_ICARUS_TARGETS, DEFAULT_LORA_TARGETS, Adapter,
                                 init_adapter)
from icarus_jax.model.config import ModelConfig
from icarus_jax.errors import IcarusError
from icarus_jax.model.modules import Transformer, adapter_params, merge, split
from icarus_jax.model.transformer import forward
from icarus_jax.model.params import Params

MODES = ("icarus_lora", "icarus_full", "lora", "full")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of one fine-tuning run."""

  mode: str = field(default="icarus_lora", metadata={
      "help": "what to train: icarus_lora / icarus_full (frozen encoder, trained decoder) or the "
              "conventional lora / full baselines", "choices": MODES})
  rank: int = field(default=8, metadata={"help": "LoRA rank"})
  alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale = alpha / rank)"})
  targets: tuple[str, ...] | None = field(default=None, metadata={
      "help": "LoRA targets (default: q,o,gate,up,down,lm_head for ICaRus; plus k,v for lora)"})
  learning_rate: float = field(default=3e-3, metadata={
      "help": "peak learning rate, used as given for every mode (full fine-tuning usually wants "
              "a lower one, e.g. 1e-3)"})
  warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
  total_steps: int = field(default=300, metadata={"help": "optimizer steps (cosine decay)"})
  weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
  clip_norm: float = field(default=1.0, metadata={"help": "global gradient-norm clip"})
  grad_accum: int = field(default=1, metadata={"help": "micro batches per optimizer step"})
  batch_size: int = field(default=32, metadata={"help": "examples per micro batch"})
  seq_len: int = field(default=128, metadata={
      "help": "tokens per example (launch.train: 0 = the task's default)"})
  seed: int = field(default=0, metadata={"help": "PRNG seed (init and data order)"})

  def __post_init__(self):
    if self.mode not in MODES:
      raise IcarusError(f"mode={self.mode!r} is unknown; accepted: {MODES}")
    if self.total_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
      raise IcarusError("total_steps, batch_size and grad_accum must be positive")


def init_trainable(cfg: ModelConfig, base: Params, tc: TrainConfig, *, name: str = "adapter") -> Adapter:
  """The adapter this run trains (LoRA B = 0, or a copy of the base weights for full modes)."""
  targets = tc.targets
  if targets is None and tc.mode in ("icarus_lora", "lora"):
    targets = DEFAULT_ICARUS_TARGETS if tc.mode == "icarus_lora" else DEFAULT_LORA_TARGETS
  return init_adapter(cfg, jax.random.key(tc.seed), name=name, kind=tc.mode, targets=targets,
                      rank=tc.rank, alpha=tc.alpha, base_params=base)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping, gradient accumulation."""
  sched = optax.warmup_cosine_decay_schedule(
      0.0, tc.learning_rate, max(1, min(tc.warmup_steps, tc.total_steps - 1)),
      max(tc.total_steps, 2), end_value=tc.learning_rate * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                   optax.adamw(sched, weight_decay=tc.weight_decay))
  if tc.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=tc.grad_accum)
  return tx


def masked_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy over ``mask``; also returns token accuracy over ``mask``."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  denom = jnp.maximum(mask.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == targets) * mask).sum() / denom
  return (nll * mask).sum() / denom, acc


def model_logits(cfg: ModelConfig, base: Params, adapter: Adapter | None, tokens: jax.Array) -> jax.Array:
  """Training-time logits ``[B, T, V]`` for ``adapter``'s kind (ICaRus: frozen encoder)."""
  return forward(cfg, base, tokens, adapter)  # ICaRus: frozen encoder, trained decoder


def state_loss(adapter_state: nnx.State, graphdef: nnx.GraphDef, base_state: nnx.State,
               batch: dict):
  """The loss as a function of the adapter state alone (the argument differentiated): the model
  is merged from its graph, the frozen base state and ``adapter_state``."""
  logits = merge(graphdef, base_state, adapter_state)(batch["inputs"])
  loss, acc = masked_ce(logits, batch["targets"], batch["mask"])
  return loss, {"loss": loss, "token_accuracy": acc}


def loss_fn(adapter: Adapter, cfg: ModelConfig, base: Params, batch: dict):
  """``state_loss`` of the NNX model holding ``base`` and ``adapter`` (functional entry)."""
  graphdef, base_state, adapter_state = split(Transformer(cfg, base, adapter))
  return state_loss(adapter_state, graphdef, base_state, batch)


@functools.partial(jax.jit, static_argnames=("cfg", "tx"), donate_argnums=(1, 2))
def train_step(cfg: ModelConfig, adapter: Adapter, opt_state, base: Params, batch: dict,
               tx: optax.GradientTransformation):
  """One optimizer step on ``adapter`` only. Returns ``(adapter, opt_state, metrics)``.

  The model is split into ``(graphdef, base_state, adapter_state)``; the gradient is taken with
  respect to ``adapter_state`` alone, and optax sees only its leaves (``Adapter.params``' layout,
  so optimizer states stay compatible with checkpoints)."""
  graphdef, base_state, adapter_state = split(Transformer(cfg, base, adapter))
  (_, metrics), g_state = jax.value_and_grad(state_loss, has_aux=True)(
      adapter_state, graphdef, base_state, batch)
  grads = adapter_params(g_state)
  updates, opt_state = tx.update(grads, opt_state, adapter.params)
  params = optax.apply_updates(adapter.params, updates)
  metrics["grad_norm"] = optax.global_norm(grads)
  return Adapter(params, adapter.config), opt_state, metrics


@functools.partial(jax.jit, static_argnames=("cfg",))
def eval_loss(cfg: ModelConfig, adapter: Adapter | None, base: Params, batch: dict):
  logits = model_logits(cfg, base, adapter, batch["inputs"])
  loss, acc = masked_ce(logits, batch["targets"], batch["mask"])
  return {"loss": loss, "token_accuracy": acc}


# ------------------------------------------------------------------------------ pretraining
@functools.partial(jax.jit, static_argnames=("cfg", "tx"), donate_argnums=(1, 2))
def pretrain_step(cfg: ModelConfig, params: Params, opt_state, batch: dict,
                  tx: optax.GradientTransformation):
  """One step of training a base model from scratch (every weight)."""
  def f(p):
    logits = model_logits(cfg, p, None, batch["inputs"])
    return masked_ce(logits, batch["targets"], batch["mask"])

  (loss, acc), grads = jax.value_and_grad(f, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {
      "loss": loss, "token_accuracy": acc, "grad_norm": optax.global_norm(grads)}


def param_diff(a: Params, b: Params) -> float:
  """Max |a - b| over all leaves (0.0 means bitwise equal values)."""
  diffs = jax.tree_util.tree_map(lambda x, y: jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))), a, b)
  return float(max(jax.tree_util.tree_leaves(diffs), default=0.0))
