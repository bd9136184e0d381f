"""The training objective against an independent computation.

Oracle: the batch layout rebuilt by hand from the raw prompt / response strings (the target at
position ``t`` is token ``t + 1`` of the example; the loss covers exactly the positions whose
target is a response or end-of-sequence token; padding covers nothing), the masked next-token
loss recomputed in float64 numpy from the model's logits, and the gradient checked by central
finite differences of that numpy loss along random directions of the adapter's parameters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icarus_jax import init_adapter, init_base_params, tiny_config
from icarus_jax.model.tokenizer import ByteTokenizer
from icarus_jax.training.data import encode_example, pad_batch
from icarus_jax.training.objective import loss_fn, model_logits

TOK = ByteTokenizer()
EXAMPLES = [{"prompt": "2+2=", "response": "4"}, {"prompt": "sort cab:", "response": "abc"},
            {"prompt": "a", "response": "long answer here"}]
SEQ = 24


def by_hand(examples, seq_len, pad_id):
  """inputs / targets / mask [B, seq_len] built from the strings alone."""
  B = len(examples)
  inputs = np.full((B, seq_len), pad_id, np.int64)
  targets = np.full((B, seq_len), pad_id, np.int64)
  mask = np.zeros((B, seq_len))
  for b, ex in enumerate(examples):
    prompt = [TOK.bos_id] + list(ex["prompt"].encode())
    ids = prompt + list(ex["response"].encode()) + [TOK.eos_id]
    for t in range(seq_len):
      if t < len(ids):
        inputs[b, t] = ids[t]
      if t + 1 < len(ids):
        targets[b, t] = ids[t + 1]
        mask[b, t] = 1.0 if t + 1 >= len(prompt) else 0.0
  return inputs, targets, mask


def numpy_loss(logits, targets, mask) -> float:
  lg = np.asarray(logits, np.float64)
  lg = lg - lg.max(-1, keepdims=True)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return float((nll * mask).sum() / max(mask.sum(), 1.0))


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(dtype="float32")
  base = init_base_params(cfg, jax.random.key(0), scale=0.1)
  ad = init_adapter(cfg, jax.random.key(1), name="t", base_params=base, rank=4, b_std=0.05)
  return cfg, base, ad


def test_batch_targets_and_mask_are_the_shifted_response(model):
  batch = pad_batch([encode_example(TOK, ex, SEQ) for ex in EXAMPLES], SEQ, TOK.pad_id)
  inputs, targets, mask = by_hand(EXAMPLES, SEQ, TOK.pad_id)
  np.testing.assert_array_equal(batch["mask"], mask)
  np.testing.assert_array_equal(batch["inputs"], inputs)
  live = mask > 0
  np.testing.assert_array_equal(batch["targets"][live], targets[live])
  # the response of "2+2=" is "4" + eos: exactly 2 predicted tokens
  assert mask[0].sum() == 2


def test_loss_and_gradient_equal_the_numpy_objective(model):
  cfg, base, ad = model
  inputs, targets, mask = by_hand(EXAMPLES, SEQ, TOK.pad_id)
  batch = {"inputs": jnp.asarray(inputs, jnp.int32), "targets": jnp.asarray(targets, jnp.int32),
           "mask": jnp.asarray(mask, jnp.float32)}

  def np_loss(adapter):
    return numpy_loss(model_logits(cfg, base, adapter, batch["inputs"]), targets, mask)

  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(ad, cfg, base, batch)
  assert abs(float(loss) - np_loss(ad)) < 1e-5
  rng = np.random.RandomState(0)
  leaves, tree = jax.tree_util.tree_flatten(ad.params)
  g_leaves = jax.tree_util.tree_leaves(grads.params)
  g_norm = float(np.sqrt(sum(float(jnp.vdot(g, g)) for g in g_leaves)))
  for i in range(3):
    # a unit direction, half along the gradient (so the check has a large signal), half random
    d = [rng.standard_normal(x.shape) for x in leaves]
    n = np.sqrt(sum((x ** 2).sum() for x in d))
    d = [(0.5 * x / n + (0.5 * np.asarray(g) / g_norm if i else 0)).astype(np.float32)
         for x, g in zip(d, g_leaves)]
    eps = 1e-2

    def moved(sign):
      p = jax.tree_util.tree_unflatten(tree, [x + sign * eps * di for x, di in zip(leaves, d)])
      return type(ad)(p, ad.config)
    fd = (np_loss(moved(+1)) - np_loss(moved(-1))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, di)) for g, di in zip(g_leaves, d))
    assert abs(fd - analytic) <= 1e-2 * g_norm, (fd, analytic, g_norm)
