"""Fine-tune on your own chat data and serve it (the user's path, end to end): a multi-turn
``.jsonl`` with a held-out fraction, an adapter saved under its name, served by that name through
the subprocess server and answered through the ``openai`` client exactly as the in-process greedy
reference answers the same messages (so the server renders the prompt the adapter trained on)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import icarus_jax.training.data as data
from icarus_jax.checkpoints.assets import load_any_base
from icarus_jax.checkpoints.peft_io import adapter_specs
from icarus_jax.errors import IcarusError
from icarus_jax.model.chat_template import ChatTemplate
from icarus_jax.model.generation import greedy_generate
from icarus_jax.model.tokenizer import ByteTokenizer
from icarus_jax.training.finetune import train_one

from conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "Reply with one word."


def chats(n=30):
  rows = []
  for i in range(n):
    rows.append({"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"code q{i:02d}?"},
        {"role": "assistant", "content": f"a{i % 3}"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": f"b{i % 2}"}]})
  return rows


def healthy(url):
  try:
    return httpx.get(url + "/health", timeout=2).status_code == 200
  except httpx.HTTPError:
    return False


@pytest.mark.slow
def test_train_chat_jsonl_with_held_out_split_then_serve_by_name(tmp_path, monkeypatch):
  f = tmp_path / "chats.jsonl"
  f.write_text("".join(json.dumps(r) + "\n" for r in chats()))
  seen = {}
  orig = data.make_dataset

  def capture(source, *a, **k):
    seen["ds"] = ds = orig(source, *a, **k)
    return ds
  monkeypatch.setattr(data, "make_dataset", capture)
  steps, bs = 6, 4
  adapter, _, out = train_one(mode="icarus_lora", task=str(f), steps=steps, batch_size=bs,
                              seq_len=64, lr=1e-2, warmup=1, workdir=tmp_path / "run",
                              eval_fraction=0.2, eval_examples=-1, name="coder", loss_on="all",
                              progress=False)
  assert out["name"] == "coder" and out["data"]["held_out_examples"] == 6
  assert out["data"]["train_examples"] == 24 and out["eval_examples"] == 6
  assert 0.0 <= out["held_out_token_accuracy"] <= 1.0
  # the held-out conversations never enter a training batch
  held = {f"q{i:02d}" for i in range(30)} - {
      bytes(t for t in row if t < 256).decode().split("code ")[1][:3]
      for i in range(steps) for row in seen["ds"][i]["inputs"].tolist()}
  assert len(held) == 6
  _, held_ex = data.split_examples(data.load_jsonl(f), 0.2, seed=0)
  assert {e["messages"][1]["content"][5:8] for e in held_ex} == held
  # two adapters with one name: a startup error naming both paths
  train_one(mode="icarus_lora", task=str(f), steps=1, batch_size=bs, seq_len=64,
            workdir=tmp_path / "run2", name="coder", progress=False)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  a1, a2 = tmp_path / "run" / "adapter", tmp_path / "run2" / "adapter"
  with pytest.raises(IcarusError, match="two adapters are named 'coder'") as e:
    adapter_specs([str(a1), str(a2)])  # what launch.serve --adapters=a1,a2 reads
  assert str(a1) in str(e.value) and str(a2) in str(e.value)
  assert adapter_specs([str(a1), f"other={a2}"]) == [("coder", a1), ("other", a2)]
  # served by its recorded name (and a second copy renamed with name=path)
  port = free_port()
  proc = subprocess.Popen([sys.executable, "-m", "launch.serve", f"--port={port}",
                           f"--adapters={a1},other={a2}", "--log_level=warning",
                           "--kv_pages=64"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: healthy(url), 180), proc.stdout.read() if proc.poll() else "timeout"
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    assert {m.id for m in client.models.list()} == {"base", "coder", "other"}
    cfg, params = load_any_base(None)
    tok = ByteTokenizer()
    for ex in held_ex[:2]:
      msgs = ex["messages"][:-1]
      got = client.chat.completions.create(model="coder", messages=msgs, max_tokens=6,
                                           temperature=0).choices[0].message.content
      ids = ChatTemplate(tok).encode(msgs)  # what training used as this turn's prefix
      (ref,) = greedy_generate(cfg, params, adapter, [ids], 6, eos_id=tok.eos_id)
      assert got == tok.decode([t for t in ref if t != tok.eos_id])
  finally:
    proc.terminate()
    proc.wait(30)


def test_cli_prints_where_the_adapter_is_and_how_to_serve_it(tmp_path):
  from icarus_jax.training.finetune import run_summary
  out = {"name": "coder", "mode": "icarus_lora", "steps": 5, "final_loss": 1.25,
         "train_wall_s": 3.0, "adapter": str(tmp_path / "adapter"), "accuracy": 0.5,
         "eval_examples": 4, "held_out_token_accuracy": 0.75,
         "data": {"train_examples": 20, "dropped_too_long": 2, "turns_cut": 1}}
  text = run_summary(out, base="smollm2", mode="icarus_lora", workdir=str(tmp_path))
  assert f"python -m launch.serve --base=smollm2 --mode=icarus --adapters={tmp_path}/adapter" in text
  assert "2 examples longer than --seq_len dropped, 1 trailing turns cut" in text
  assert "exact match 50.0%, per-token accuracy 75.0%" in text
