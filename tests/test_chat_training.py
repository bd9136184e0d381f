"""One renderer for training and serving: a training example's prompt prefix is, token for token,
what the server sends the model for the same messages (system prompt, two user turns, a tool call
with its result), for SmolLM2's template and the Qwen2.5 / Llama-3.1 formats; the loss covers the
assistant turns only."""

import json
from pathlib import Path

import jinja2
import numpy as np
import pytest

from icarus_jax.errors import IcarusError
from icarus_jax.model.chat_template import ChatTemplate
from icarus_jax.model.tokenizer import ByteTokenizer, HFTokenizer
from icarus_jax.training.data import (encode_conversation, eval_prompts, load_jsonl, prompt_ids,
                                      split_examples)

FIX = Path(__file__).parent / "fixtures" / "chat_templates"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CONVO = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": -3}"},
    {"role": "assistant", "content": "It is -3 C in Oslo."},
    {"role": "user", "content": "And is that cold?"},
    {"role": "assistant", "content": "Yes, below freezing."},
]
ASSISTANT = [i for i, m in enumerate(CONVO) if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def smollm2():
  from icarus_jax.checkpoints.assets import load_base_tokenizer
  from icarus_jax.checkpoints.gguf_io import resolve_named_base
  from icarus_jax.errors import CheckpointError
  try:
    resolve_named_base("smollm2")
  except CheckpointError as e:
    pytest.skip(f"SmolLM2 not available: {e}")
  return load_base_tokenizer("smollm2")


def llama_tokenizer(smol_tok):
  """SmolLM2's BPE with Llama-3's header tokens added as specials (eos = <|eot_id|>)."""
  from tokenizers import AddedToken, Tokenizer
  t = Tokenizer.from_str(smol_tok._tok.to_str())
  names = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
  t.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
  v = t.get_vocab()
  return HFTokenizer.from_tokenizer(t, eos_id=v["<|eot_id|>"], bos_id=v["<|begin_of_text|>"])


def hf_render(template: str, messages, tools, bos: str, eos: str, gen: bool) -> str:
  """An independent oracle: the template rendered the way transformers does (plain jinja2,
  JSON without HTML escaping, tool-call arguments as objects)."""
  env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
  msgs = []
  for m in messages:
    m = dict(m)
    if m.get("content") is None:
      m["content"] = ""
    if m.get("tool_calls"):
      m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(
          c["function"]["arguments"])}} for c in m["tool_calls"]]
    msgs.append(m)
  return env.from_string(template).render(messages=msgs, tools=tools, bos_token=bos,
                                          eos_token=eos, add_generation_prompt=gen)


def cases(smollm2):
  tok, chat = smollm2
  ltok = llama_tokenizer(tok)
  return {"smollm2": (tok, chat),
          "qwen2_5": (tok, ChatTemplate(tok, (FIX / "qwen2_5.jinja").read_text())),
          "llama3_1": (ltok, ChatTemplate(ltok, (FIX / "llama3_1.jinja").read_text()))}


@pytest.mark.parametrize("name", ["smollm2", "qwen2_5", "llama3_1"])
@pytest.mark.parametrize("loss_on", ["all", "last"])
def test_training_prefix_is_the_served_prompt(smollm2, name, loss_on):
  tok, chat = cases(smollm2)[name]
  if name == "llama3_1" and loss_on == "all":
    # SmolLM2's BPE splits Llama's "<|end_header_id|>\n\n{" as "\n" "\n{" inside a history
    # but the served prompt ends in one "\n\n" token: no single sequence can hold every turn's
    # served prefix, and the renderer says so instead of training on a prefix never served.
    with pytest.raises(IcarusError, match="loss_on='last'"):
      encode_conversation(tok, {"messages": CONVO, "tools": TOOLS}, 4096, chat, loss_on)
    return
  ids, mask, info = encode_conversation(tok, {"messages": CONVO, "tools": TOOLS}, 4096, chat,
                                        loss_on)
  ids, mask = ids.tolist(), mask.tolist()
  trained = ASSISTANT if loss_on == "all" else ASSISTANT[-1:]
  assert info == {"turns": len(trained), "turns_cut": 0}
  starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
  assert len(starts) == len(trained)
  for a, s in zip(trained, starts):
    served = chat.encode(CONVO[:a], TOOLS)            # what the server sends (server.py's call)
    assert ids[:s] == served
    if chat.native_tools:                              # and what transformers would render
      assert served == tok.encode(hf_render(chat.template, CONVO[:a], TOOLS,
                                            tok.token_text(tok.bos_id) if tok.bos_id else "",
                                            tok.token_text(tok.eos_id), True))
  # the loss covers exactly the assistant answers, each through its end-of-turn token
  spans, cur = [], []
  for t, m in zip(ids, mask):
    if m:
      cur.append(t)
    elif cur:
      spans.append(cur)
      cur = []
  spans += [cur] if cur else []
  assert all(s[-1] == tok.eos_id and tok.eos_id not in s[:-1] for s in spans)
  texts = [tok.decode(s[:-1]) for s in spans]
  want = {2: "get_weather", 4: "It is -3 C in Oslo.", 6: "Yes, below freezing."}
  for a, text in zip(trained, texts):
    assert want[a] in text and "Weather in Oslo" not in text
  if 2 in trained:  # the call is written as the model family writes calls
    call = texts[0]
    assert ('"parameters": {"city": "Oslo"}' in call if name == "llama3_1"
            else '"arguments": {"city": "Oslo"}' in call)


def test_smollm2_default_tool_rendering_and_pairs(smollm2):
  """SmolLM2's template knows no tools: the documented default puts them in the system turn and
  calls / results in <tool_call> / <tool_response> text; a {prompt, response} pair is one user
  turn, exactly as /v1/chat/completions renders a single user message."""
  tok, chat = smollm2
  text = chat.render(CONVO[:4], TOOLS)
  assert text.startswith("<|im_start|>system\nYou answer briefly.\n\n# Tools")
  assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
  assert "<|im_start|>tool\n<tool_response>\n{\"temp_c\": -3}\n</tool_response><|im_end|>" in text
  ids, mask, _ = encode_conversation(tok, {"prompt": "Hi there", "response": "Hello!"}, 512, chat)
  served = chat.encode([{"role": "user", "content": "Hi there"}])
  assert ids.tolist()[:len(served)] == served and mask[:len(served)].sum() == 0
  assert tok.decode(ids[mask > 0][:-1]) == "Hello!"
  assert prompt_ids(tok, "Hi there", chat) == served


def test_byte_builtin_multiturn_and_truncation():
  tok = ByteTokenizer()
  ex = {"messages": CONVO[:2] + [{"role": "assistant", "content": "cold"},
                                 {"role": "user", "content": "why"},
                                 {"role": "assistant", "content": "winter"}]}
  ids, mask, info = encode_conversation(tok, ex, 4096, None, "all")
  ids = ids.tolist()
  assert tok.decode([t for t, m in zip(ids, mask) if m]) == "coldwinter"
  assert [t for t, m in zip(ids, mask) if m].count(tok.eos_id) == 2
  ct = ChatTemplate(tok)
  assert ids[:len(ct.encode(ex["messages"][:4]))] == ct.encode(ex["messages"][:4])
  short = ids.index(tok.eos_id) + 1  # room for the first turn only
  ids2, mask2, info2 = encode_conversation(tok, ex, short, None, "all")
  assert info2 == {"turns": 1, "turns_cut": 1} and ids2.tolist() == ids[:short]
  with pytest.raises(IcarusError, match="more than max_len"):
    encode_conversation(tok, ex, 10, None, "all")


def test_jsonl_validation_split_and_eval(tmp_path):
  f = tmp_path / "c.jsonl"
  rows = [{"messages": [{"role": "developer", "content": "terse"},
                        {"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}"}]} for i in range(20)]
  f.write_text("".join(json.dumps(r) + "\n" for r in rows))
  exs = load_jsonl(f)
  train, held = split_examples(exs, 0.2, seed=3)
  assert len(held) == 4 and len(train) == 16
  key = lambda e: e["messages"][1]["content"]
  assert not {key(e) for e in train} & {key(e) for e in held}
  assert split_examples(exs, 0.2, seed=3)[1] == held != split_examples(exs, 0.2, seed=4)[1]
  tok = ByteTokenizer()
  prompts, answers = eval_prompts(held, tok)
  assert answers == [e["messages"][-1]["content"] for e in held]
  assert prompts[0] == ChatTemplate(tok).encode(held[0]["messages"][:-1])
  for bad, match in [({"messages": [{"role": "user", "content": "x"}]}, "must end with"),
                     ({"messages": [{"role": "user", "content": "x"},
                                    {"role": "assistant", "content": None,
                                     "tool_calls": [{"function": {"name": "f",
                                                                  "arguments": "{oops"}}]}]},
                      "not valid JSON"),
                     ({"messages": [{"role": "bot", "content": "x"}]}, "role='bot'")]:
    f.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(IcarusError, match=rf"c.jsonl:2: .*{match}"):
      load_jsonl(f)
  with pytest.raises(IcarusError, match="eval_fraction"):
    split_examples(exs, 1.0, seed=0)
