"""Training data: tokenising prompt/response examples, JSONL loading and grain batching.

An example becomes ``[bos] + prompt + response + [eos]``; the loss covers the response and eos
(the model learns to answer and stop, not to repeat the prompt). Batches are dicts of
``inputs``, ``targets`` ``[B, T]`` int32 and ``mask`` ``[B, T]`` float32 (targets = inputs shifted
by one). Batch ``i`` is a pure function of ``(seed, i)``, so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from icarus_jax.errors import IcarusError


def example_text(x) -> str:
  """A TFDS string field (bytes) or a JSONL one (str) as text."""
  return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


def prompt_ids(tok, prompt: str, chat=None) -> list[int]:
  """Token ids of a prompt as the model expects it: through ``chat`` (a ``ChatTemplate`` with a
  Jinja template: one user turn, then the assistant header) or ``[bos] + prompt``."""
  if chat is not None and getattr(chat, "template", None) is not None:
    return chat.encode([{"role": "user", "content": prompt}])
  return tok.encode(prompt, add_bos=True)


def encode_example(tok, example: dict, max_len: int, chat=None) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens [n], loss_mask [n])`` where mask[t] = 1 if tokens[t] is a response/eos token.

  The prompt goes through ``prompt_ids`` (so a chat model trains on its own chat format); the
  response ends with the tokenizer's eos (a chat model's end-of-turn token)."""
  prompt = example_text(example.get("prompt", ""))
  response = example_text(example.get("response", ""))
  if not response:
    raise IcarusError(f"example has an empty response (prompt {prompt[:60]!r}); every training "
                      f"example needs a non-empty 'response'")
  p = prompt_ids(tok, prompt, chat)
  r = tok.encode(response) + [tok.eos_id]
  ids = p + r
  if len(ids) > max_len:
    raise IcarusError(f"example is {len(ids)} tokens long, more than max_len={max_len} "
                      f"(prompt {prompt[:60]!r}); raise --seq_len or filter the data")
  mask = [0] * len(p) + [1] * len(r)
  return np.array(ids, np.int32), np.array(mask, np.float32)


def pad_batch(items: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> dict:
  """Stacks encoded examples into ``inputs/targets/mask [B, seq_len]``."""
  B = len(items)
  toks = np.full((B, seq_len + 1), pad_id, np.int32)
  mask = np.zeros((B, seq_len + 1), np.float32)
  for i, (ids, m) in enumerate(items):
    toks[i, :len(ids)] = ids
    mask[i, :len(m)] = m
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask[:, 1:]}


def load_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads ``{"prompt", "response"}`` lines or chat lines ``{"messages": [{"role", "content"}]}``.

  A chat becomes a prompt of all turns but the last (``<role>: content`` lines) and the last
  assistant turn as the response.
  """
  path = Path(path)
  if not path.exists():
    raise IcarusError(f"{path}: no such file")
  out = []
  with path.open() as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        d = json.loads(line)
      except json.JSONDecodeError as e:
        raise IcarusError(f"{path}:{n}: malformed JSON ({e})") from None
      if not isinstance(d, dict):
        raise IcarusError(f"{path}:{n}: expected a JSON object")
      if "messages" in d:
        msgs = d["messages"]
        if (not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
          raise IcarusError(f"{path}:{n}: 'messages' must be a non-empty list of "
                            f"{{'role', 'content'}} objects")
        if msgs[-1]["role"] != "assistant":
          raise IcarusError(f"{path}:{n}: the last message must be the assistant's answer")
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + "assistant: "
        out.append({"prompt": prompt, "response": str(msgs[-1]["content"])})
      elif "prompt" in d and "response" in d:
        out.append({"prompt": str(d["prompt"]), "response": str(d["response"])})
      else:
        raise IcarusError(f"{path}:{n}: expected keys 'prompt' and 'response', or 'messages'; "
                          f"got {sorted(d)}")
  if not out:
    raise IcarusError(f"{path}: no examples")
  return out


def examples_source(task: str, split: str, *, data_dir=None, tfds_config: str = "default"):
  """A random-access source for a task name (TFDS builder) or a ``.jsonl`` path."""
  if task.endswith(".jsonl"):
    return load_jsonl(task)
  from icarus_jax.training.tfds_tasks import task_source
  return task_source(task, split, data_dir=data_dir, config=tfds_config)


def make_dataset(source, tok, *, batch_size: int, seq_len: int, seed: int, chat=None):
  """A grain ``MapDataset`` whose item ``i`` is training batch ``i`` (shuffled, repeating)."""
  import grain
  n = len(source)
  if n == 0:
    raise IcarusError("the training source is empty")
  # Validate every example once, up front, so bad data fails before training starts.
  for i in range(n):
    encode_example(tok, source[i], seq_len + 1, chat)
  ds = (grain.MapDataset.range(n).shuffle(seed=seed).repeat()
        .map(lambda i: encode_example(tok, source[int(i)], seq_len + 1, chat))
        .batch(batch_size, batch_fn=lambda items: pad_batch(items, seq_len, tok.pad_id)))
  return ds


def eval_prompts(source, tok, limit: int | None = None, chat=None
                 ) -> tuple[list[list[int]], list[str]]:
  """Prompt token ids (``prompt_ids``) and reference answers of an eval split."""
  n = len(source) if limit is None else min(limit, len(source))
  prompts, answers = [], []
  for i in range(n):
    ex = source[i]
    prompts.append(prompt_ids(tok, example_text(ex["prompt"]), chat))
    answers.append(example_text(ex["response"]))
  return prompts, answers
