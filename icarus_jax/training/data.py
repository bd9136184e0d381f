"""Training data: examples -> token ids + loss masks, JSONL loading, splits and grain batching.

Examples are ``{"messages": [...], "tools": [...]}`` conversations (chat models; rendered by the
model's ``ChatTemplate`` exactly as the server renders them, loss on the assistant turns) or
``{"prompt", "response"}`` pairs (a chat model gets them as one user turn; a plain model as
``[bos] + prompt``, then ``response + [eos]``). Batches are dicts of ``inputs``, ``targets``
``[B, T]`` int32 and ``mask`` ``[B, T]`` float32 (targets = inputs shifted by one). Batch ``i`` is a
pure function of ``(seed, i)``, so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from icarus_jax.errors import ExampleTooLongError, IcarusError

LOSS_ON = ("last", "all")


def example_text(x) -> str:
  """A TFDS string field (bytes) or a JSONL one (str) as text."""
  return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


def is_chat(chat) -> bool:
  """Whether ``chat`` renders conversations (a Jinja template or the byte built-in)."""
  return chat is not None and getattr(chat, "template", None) is not None


def example_messages(example: dict) -> tuple[list[dict], list | None]:
  """``(messages, tools)`` of an example; a ``{prompt, response}`` pair is one user turn."""
  if "messages" in example:
    return list(example["messages"]), example.get("tools")
  return ([{"role": "user", "content": example_text(example.get("prompt", ""))},
           {"role": "assistant", "content": example_text(example.get("response", ""))}], None)


def prompt_ids(tok, prompt: str | list, chat=None, tools=None) -> list[int]:
  """Token ids of a prompt as the server sends it: messages (or a string as one user turn)
  through ``chat``'s template, or ``[bos] + prompt`` for a plain model."""
  if isinstance(prompt, list):
    from icarus_jax.model.chat_template import ChatTemplate
    return (chat if chat is not None else ChatTemplate(tok)).encode(prompt, tools)
  if is_chat(chat):
    return chat.encode([{"role": "user", "content": prompt}], tools)
  return tok.encode(prompt, add_bos=True)


def encode_conversation(tok, example: dict, max_len: int, chat=None, loss_on: str = "last"
                        ) -> tuple[np.ndarray, np.ndarray, dict]:
  """``(tokens [n], loss_mask [n], info)``; mask[t] = 1 where tokens[t] is an answer token.

  Conversations (and pairs, for a chat model) go through ``ChatTemplate.encode_training``: the
  prefix of each trained turn is what the server renders for the turns before it."""
  msgs, tools = example_messages(example)
  answer = msgs[-1].get("content") if msgs else None
  if not answer and not (msgs and msgs[-1].get("tool_calls")):
    raise IcarusError(f"example has an empty response (prompt "
                      f"{example_text(msgs[0].get('content', ''))[:60]!r}); every training "
                      f"example needs a non-empty answer")
  if "messages" in example or is_chat(chat):
    from icarus_jax.model.chat_template import ChatTemplate
    ct = chat if chat is not None else ChatTemplate(tok)
    ids, mask, info = ct.encode_training(msgs, tools, loss_on=loss_on, max_len=max_len)
    return np.array(ids, np.int32), np.array(mask, np.float32), info
  p = tok.encode(msgs[0]["content"], add_bos=True)
  r = tok.encode(answer) + [tok.eos_id]
  if len(p) + len(r) > max_len:
    raise ExampleTooLongError(f"example is {len(p) + len(r)} tokens long, more than "
                              f"max_len={max_len} (prompt {msgs[0]['content'][:60]!r}); raise "
                              f"--seq_len or filter the data")
  return (np.array(p + r, np.int32), np.array([0] * len(p) + [1] * len(r), np.float32),
          {"turns": 1, "turns_cut": 0})


def encode_example(tok, example: dict, max_len: int, chat=None, loss_on: str = "last"
                   ) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens [n], loss_mask [n])`` of one example (see ``encode_conversation``)."""
  ids, mask, _ = encode_conversation(tok, example, max_len, chat, loss_on)
  return ids, mask


def pad_batch(items: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> dict:
  """Stacks encoded examples into ``inputs/targets/mask [B, seq_len]``."""
  B = len(items)
  toks = np.full((B, seq_len + 1), pad_id, np.int32)
  mask = np.zeros((B, seq_len + 1), np.float32)
  for i, (ids, m) in enumerate(items):
    toks[i, :len(ids)] = ids
    mask[i, :len(m)] = m
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask[:, 1:]}


def _check_line(d, where: str) -> dict:
  from icarus_jax.model.chat_template import validate_messages, validate_tools
  if not isinstance(d, dict):
    raise IcarusError(f"{where}: expected a JSON object")
  if "messages" in d:
    try:
      msgs = validate_messages(d["messages"])
      tools = validate_tools(d.get("tools"))
    except IcarusError as e:
      raise IcarusError(f"{where}: {e}") from None
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
      raise IcarusError(f"{where}: a conversation needs a prompt turn and must end with the "
                        f"assistant's answer")
    return {"messages": d["messages"], **({"tools": tools} if tools else {})}
  if "prompt" in d and "response" in d:
    return {"prompt": str(d["prompt"]), "response": str(d["response"])}
  raise IcarusError(f"{where}: expected keys 'prompt' and 'response', or 'messages' "
                    f"(optionally 'tools'); got {sorted(d)}")


def load_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads ``{"prompt", "response"}`` lines or chat lines ``{"messages": [...], "tools": [...]}``
  (OpenAI message format: system / developer / user / assistant with optional ``tool_calls`` /
  tool); every line is validated, errors name the line."""
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
      out.append(_check_line(d, f"{path}:{n}"))
  if not out:
    raise IcarusError(f"{path}: no examples")
  return out


def split_examples(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
  """A seeded disjoint ``(train, eval)`` split; ``eval`` holds ``round(fraction * n)`` examples
  (at least one when the fraction is positive)."""
  if not 0.0 <= eval_fraction < 1.0:
    raise IcarusError(f"eval_fraction={eval_fraction}; accepted: 0 <= fraction < 1")
  n = len(examples)
  k = 0 if eval_fraction == 0 else max(1, round(eval_fraction * n))
  if k >= n:
    raise IcarusError(f"eval_fraction={eval_fraction} leaves no training example out of {n}")
  order = np.random.default_rng(seed).permutation(n)
  held = set(order[:k].tolist())
  return ([e for i, e in enumerate(examples) if i not in held],
          [e for i, e in enumerate(examples) if i in held])


def examples_source(task: str, split: str, *, data_dir=None, tfds_config: str = "default"):
  """A random-access source for a task name (TFDS builder) or a ``.jsonl`` path."""
  if task.endswith(".jsonl"):
    return load_jsonl(task)
  from icarus_jax.training.tfds_tasks import task_source
  return task_source(task, split, data_dir=data_dir, config=tfds_config)


def encode_all(source, tok, *, seq_len: int, chat=None, loss_on: str = "last",
               too_long: str = "error") -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
  """Every example encoded once: ``(items, stats)``; ``too_long``: ``"error"`` or ``"drop"``
  (examples whose first trained turn exceeds ``seq_len + 1`` tokens; counted in
  ``stats["dropped"]``; cut trailing turns in ``stats["turns_cut"]``)."""
  if too_long not in ("error", "drop"):
    raise IcarusError(f"too_long={too_long!r}; accepted: 'error', 'drop'")
  items, stats = [], {"examples": len(source), "dropped": 0, "turns_cut": 0, "loss_tokens": 0}
  for i in range(len(source)):
    try:
      ids, mask, info = encode_conversation(tok, source[i], seq_len + 1, chat, loss_on)
    except ExampleTooLongError:
      if too_long == "error":
        raise
      stats["dropped"] += 1
      continue
    stats["turns_cut"] += info["turns_cut"]
    stats["loss_tokens"] += int(mask.sum())
    items.append((ids, mask))
  if not items:
    raise IcarusError(f"no example fits seq_len={seq_len} ({stats['dropped']} dropped); raise "
                      f"--seq_len")
  return items, stats


def make_dataset(source, tok, *, batch_size: int, seq_len: int, seed: int, chat=None,
                 loss_on: str = "last", too_long: str = "error", stats: dict | None = None):
  """A grain ``MapDataset`` whose item ``i`` is training batch ``i`` (shuffled, repeating).

  Every example is encoded (and so validated) once, up front; ``stats`` (if given) receives
  ``encode_all``'s counts."""
  import grain
  if len(source) == 0:
    raise IcarusError("the training source is empty")
  items, st = encode_all(source, tok, seq_len=seq_len, chat=chat, loss_on=loss_on,
                         too_long=too_long)
  if stats is not None:
    stats.update(st)
  return (grain.MapDataset.range(len(items)).shuffle(seed=seed).repeat()
          .map(lambda i: items[int(i)])
          .batch(batch_size, batch_fn=lambda b: pad_batch(b, seq_len, tok.pad_id)))


def eval_prompts(source, tok, limit: int | None = None, chat=None
                 ) -> tuple[list[list[int]], list[str]]:
  """Prompt token ids (as served: ``prompt_ids``) and reference answers of an eval split.

  A conversation's prompt is every turn before its last (assistant) one; its reference answer is
  that turn's text as the model writes it (tool calls rendered as the template renders them)."""
  n = len(source) if limit is None else min(limit, len(source))
  prompts, answers = [], []
  for i in range(n):
    ex = source[i]
    if "messages" in ex:
      msgs, tools = example_messages(ex)
      p = prompt_ids(tok, msgs[:-1], chat, tools)
      ids, mask, _ = encode_conversation(tok, ex, 1 << 30, chat, "last")
      ans = [int(t) for t, m in zip(ids[len(p):], mask[len(p):]) if m and t != tok.eos_id]
      prompts.append(p)
      answers.append(tok.decode(ans))
    else:
      prompts.append(prompt_ids(tok, example_text(ex["prompt"]), chat))
      answers.append(example_text(ex["response"]))
  return prompts, answers
