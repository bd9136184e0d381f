"""Request handling of the OpenAI server: one request (its choices, prompts, sampling, grammar,
logprobs, stop strings, tool calls) from validated body to JSON or SSE response.

:class:`RequestHandler` is what the routes in :mod:`icarus_jax.serving.server` call; it talks to
the engine only through :class:`~icarus_jax.serving.async_engine.AsyncEngine` (submit, abort,
call) and its public properties.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from icarus_jax.errors import IcarusError, RequestTooLargeError, UnknownAdapterError
from icarus_jax.serving import openai_logprobs
from icarus_jax.serving.async_engine import AsyncEngine, EngineDeadError
from icarus_jax.serving.engine import RequestOutput
from icarus_jax.serving.protocol import APIError, SamplingRequest
from icarus_jax.serving.sampling import SamplingParams
from icarus_jax.serving.stop_strings import StopStringMatcher
from icarus_jax.serving.tool_calls import ToolCallStream, parse_tool_calls


class _Gen:
  """One choice of a request in flight."""

  def __init__(self, index: int, rid: int, queue: asyncio.Queue, matcher: StopStringMatcher,
               prompt_len: int, echo: str, first_of_prompt: bool):
    self.index, self.rid, self.queue = index, rid, queue
    self.prompt_len, self.echo, self.first_of_prompt = prompt_len, echo, first_of_prompt
    self.tokens: list[int] = []
    self.logprobs: list = []  # one TokenLogprobs per token when the request asked
    self.text_offset = 0      # streamed completions: where the next token's text starts
    self.matcher = matcher  # incremental detokenization + stop strings
    self.finish_reason: str | None = None
    self.out: RequestOutput | None = None

  @property
  def text(self) -> str:
    return self.matcher.text


class RequestHandler:
  """Generation requests against one :class:`AsyncEngine`; ``base_name`` is the base's model
  name in the API."""

  def __init__(self, aengine: AsyncEngine, tokenizer, base_name: str):
    self.aengine, self.engine = aengine, aengine.engine
    self.tokenizer, self.base_name = tokenizer, base_name
    self.lp_render = openai_logprobs.Renderer(tokenizer)

  def resolve_model(self, name: str) -> str | None:
    """The base name -> None; any other name goes to the engine, which owns the adapter set
    (checked on its thread at submit, so a just-loaded adapter is never refused)."""
    return None if name == self.base_name else name

  async def adapter_names(self) -> list[str]:
    return await self.aengine.acall(lambda e: list(e.adapter_names))

  def max_tokens_of(self, req: SamplingRequest, prompt_len: int) -> int:
    """``max_completion_tokens`` or ``max_tokens``; neither: the rest of the context (as OpenAI
    and vLLM do), bounded by what the KV pool can hold for one request."""
    return (req.max_completion_tokens or req.max_tokens
            or max(1, self.engine.max_request_tokens - prompt_len))

  def sampling_for(self, req: SamplingRequest, index: int, max_tokens: int,
                   logprobs: int | None, grammar: str | None) -> SamplingParams:
    stop_ids = list(req.stop_token_ids or [])
    eos = getattr(self.tokenizer, "eos_id", None)
    if not req.ignore_eos and eos is not None:
      stop_ids.append(eos)
    # Any int64 seed is accepted (as vLLM does) and folded into the sampler's 32-bit range.
    seed = ((req.seed if req.seed is not None else secrets.randbits(31)) + index) % 2**32
    try:
      bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    except ValueError:
      raise APIError(400, f"logit_bias keys must be token ids (integers as strings), got "
                          f"{sorted(req.logit_bias)[:5]}", param="logit_bias") from None
    try:
      sp = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          seed=seed, max_tokens=max_tokens, stop_token_ids=tuple(stop_ids),
                          min_p=req.min_p, presence_penalty=req.presence_penalty,
                          frequency_penalty=req.frequency_penalty,
                          repetition_penalty=req.repetition_penalty, logit_bias=bias,
                          logprobs=logprobs, grammar=grammar)
      sp.check_vocab(self.engine.cfg.vocab_size)
      return sp
    except IcarusError as e:
      raise APIError(400, str(e), param="logit_bias" if "logit_bias" in str(e) else None) from None

  def stop_strings(self, req: SamplingRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stops):
      raise APIError(400, "stop strings must be non-empty", param="stop")
    return stops

  async def grammar_for(self, req: SamplingRequest, tool_fmt: str | None) -> str | None:
    """The request's structured-output grammar: ``response_format`` json_object / json_schema,
    or ``tool_choice`` required / named (in the model's tool-call format ``tool_fmt``)."""
    rf = getattr(req, "response_format", None)
    kind = rf.get("type", "text") if isinstance(rf, dict) else ("text" if rf is None else rf)
    choice = getattr(req, "tool_choice", None)
    forced = isinstance(choice, dict) or choice == "required"
    if kind not in ("text", "json_object", "json_schema"):
      raise APIError(400, f"response_format type {kind!r}; accepted: 'text', 'json_object', "
                          f"'json_schema'", param="response_format")
    if kind != "text" and forced:
      raise APIError(400, "response_format and a forced tool_choice cannot be combined",
                     param="response_format")
    if kind == "text" and not forced:
      return None
    compiler = self.engine.grammar_compiler
    try:
      if kind == "json_object":
        return await asyncio.to_thread(compiler.json_object)
      if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
          raise APIError(400, "response_format json_schema needs json_schema.schema (a JSON "
                              "Schema object)", param="response_format")
        return await asyncio.to_thread(compiler.json_schema, spec["schema"])
      name = None
      if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
          raise APIError(400, "a named tool_choice is {\"type\": \"function\", \"function\": "
                              "{\"name\": ...}}", param="tool_choice")
      return await asyncio.to_thread(
          compiler.tool_calls, req.tools, name=name,
          parallel=req.parallel_tool_calls is not False, fmt=tool_fmt)
    except IcarusError as e:
      raise APIError(400, str(e), param="tool_choice" if forced else "response_format") from None

  async def start(self, req: SamplingRequest, prompts: list[tuple[list[int], str]],
                  adapter: str | None, request: Request, stops: list[str],
                  logprobs: int | None, grammar: str | None) -> list[_Gen]:
    """Submits ``n`` choices of every prompt (choice ``p * n + i``); on any error aborts what
    was submitted and raises the APIError."""
    tenant = req.cache_salt or request.headers.get("x-cache-salt")
    gens: list[_Gen] = []
    try:
      for p, (ids, echo) in enumerate(prompts):
        for i in range(req.n):
          index = p * req.n + i
          sp = self.sampling_for(req, index, self.max_tokens_of(req, len(ids)), logprobs,
                                 grammar)
          rid, q = await self.aengine.submit(ids, adapter, sp, tenant=tenant)
          gens.append(_Gen(index, rid, q, StopStringMatcher(self.tokenizer, stops), len(ids), echo,
                           i == 0))
    except EngineDeadError as e:
      raise APIError(503, f"the engine is not running ({e}); the server must be restarted",
                     "server_error") from None
    except UnknownAdapterError:
      for g in gens:
        self.aengine.abort(g.rid)
      raise APIError(404, f"The model `{req.model}` does not exist. Available: "
                          f"{[self.base_name] + await self.adapter_names()}", "NotFoundError",
                     "model") from None
    except RequestTooLargeError as e:
      for g in gens:
        self.aengine.abort(g.rid)
      raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
    except IcarusError as e:
      for g in gens:
        self.aengine.abort(g.rid)
      raise APIError(400, str(e)) from None
    return gens

  def apply_event(self, g: _Gen, ev) -> tuple[str, bool]:
    """Folds one engine event into ``g``; returns (new text safe to send, finished)."""
    kind, val = ev[0], ev[1]
    if kind == "done":
      g.out = val
      if g.finish_reason is None:
        g.finish_reason = {"abort": "stop"}.get(val.finish_reason, val.finish_reason)
        if val.finish_reason == "error":
          raise APIError(500, val.error or "engine failure", "server_error")
      return "", True
    if g.finish_reason is not None:
      return "", False  # tokens after a stop string: dropped
    g.tokens.append(val)
    if ev[2] is not None:
      g.logprobs.append(ev[2])
    new = g.matcher.add(val)
    if g.matcher.stopped:
      g.finish_reason = "stop"
      self.aengine.abort(g.rid, "stop")  # free its pages now (recorded as the client sees it)
    return new, False

  async def next_event(self, g: _Gen, request: Request):
    while True:
      try:
        return await asyncio.wait_for(g.queue.get(), timeout=1.0)
      except asyncio.TimeoutError:
        if await request.is_disconnected():
          raise asyncio.CancelledError("client disconnected") from None

  def flush_text(self, g: _Gen) -> str:
    """Text held back for stop-string matching, released at the end ("" after a stop)."""
    return g.matcher.finish()

  def usage(self, gens: list[_Gen]) -> dict:
    comp = sum(len(g.tokens) for g in gens)
    firsts = [g for g in gens if g.first_of_prompt]
    prompt_len = sum(g.prompt_len for g in firsts)
    cached = sum(g.out.num_cached_tokens for g in firsts if g.out)
    return {"prompt_tokens": prompt_len, "completion_tokens": comp,
            "total_tokens": prompt_len + comp,
            "prompt_tokens_details": {"cached_tokens": cached}}

  async def run_request(self, req: SamplingRequest, prompts: list[tuple[list[int], str]],
                        request: Request, *, chat: bool, tool_parser: str | None = None):
    """``prompts``: (token ids, echoed text) of each prompt (completions may batch several)."""
    adapter = self.resolve_model(req.model)
    grammar = await self.grammar_for(req, tool_parser)
    n_logprobs = openai_logprobs.requested(req.logprobs, req.top_logprobs, chat=chat,
                                           echo=bool(getattr(req, "echo", False)))
    stops = self.stop_strings(req)
    for prompt_ids, _ in prompts:
      max_tokens = self.max_tokens_of(req, len(prompt_ids))
      if prompt_ids and len(prompt_ids) + max_tokens > self.engine.max_seq_len:
        raise APIError(400, f"This model's maximum context length is {self.engine.max_seq_len} "
                            f"tokens. However, you requested {len(prompt_ids) + max_tokens} "
                            f"tokens ({len(prompt_ids)} in the prompt, {max_tokens} in the "
                            f"completion). Please reduce the prompt or max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    gens = await self.start(req, prompts, adapter, request, stops, n_logprobs, grammar)
    rid_str = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    obj = "chat.completion" if chat else "text_completion"
    now = int(time.time())

    def abort_all():
      for g in gens:
        if g.out is None:
          self.aengine.abort(g.rid)

    if not req.stream:
      try:
        for g in gens:
          done = False
          while not done:
            _, done = self.apply_event(g, await self.next_event(g, request))
          self.flush_text(g)
      except BaseException:
        abort_all()
        raise
      choices = []
      for g in gens:
        c: dict[str, Any] = {"index": g.index, "finish_reason": g.finish_reason}
        if chat:
          if n_logprobs is not None:
            c["logprobs"] = self.lp_render.chat(g.tokens, g.logprobs)
          c["message"] = {"role": "assistant", "content": g.text}
          if tool_parser is not None:
            content, calls = parse_tool_calls(g.text, tool_parser)
            if calls:
              c["message"] = {"role": "assistant", "content": content or None,
                              "tool_calls": calls}
              c["finish_reason"] = g.finish_reason = "tool_calls"
        else:
          c["text"] = g.echo + g.text
          c["logprobs"] = (None if n_logprobs is None else
                           self.lp_render.completion(g.tokens, g.logprobs, len(g.echo)))
        if req.return_token_ids:
          c["token_ids"] = g.tokens
        choices.append(c)
      return JSONResponse({"id": rid_str, "object": obj, "created": now, "model": req.model,
                           "choices": choices, "usage": self.usage(gens)})

    include_usage = bool((req.stream_options or {}).get("include_usage"))
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    streams = {g.index: ToolCallStream(tool_parser) for g in gens} if tool_parser else {}
    for g in gens:
      g.text_offset = len(g.echo)

    def chunk(g: _Gen, text: str, finish: str | None, first: bool = False, token_ids=None,
              calls=None, lps=None):
      if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
            {"content": text} if text else {})
        if calls:
          delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
        c: dict[str, Any] = {"index": g.index, "delta": delta, "finish_reason": finish}
        if lps:
          c["logprobs"] = self.lp_render.chat(token_ids, lps)
      else:
        c = {"index": g.index, "text": text, "finish_reason": finish,
             "logprobs": self.lp_render.completion(token_ids, lps, g.text_offset) if lps else None}
        if lps:
          g.text_offset += sum(len(self.lp_render.text(t)) for t in token_ids)
      if req.return_token_ids and token_ids is not None:
        c["token_ids"] = token_ids
      body = {"id": rid_str, "object": chunk_obj, "created": now, "model": req.model,
              "choices": [c]}
      if include_usage:
        body["usage"] = None
      return f"data: {json.dumps(body)}\n\n"

    async def events():
      pending: dict = {}
      try:
        if chat:
          for g in gens:
            yield chunk(g, "", None, first=True)
        pending = {asyncio.ensure_future(g.queue.get()): g for g in gens}
        while pending:
          done, _ = await asyncio.wait(pending, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
          if not done:
            if await request.is_disconnected():
              raise asyncio.CancelledError("client disconnected")
            continue
          for fut in done:
            g = pending.pop(fut)
            ev = fut.result()
            n_before = len(g.tokens)
            text, finished = self.apply_event(g, ev)
            ts = streams.get(g.index)
            if finished:
              text += self.flush_text(g)
              calls = None
              if ts is not None:
                text = ts.feed(text)
                rest, calls = ts.finish()
                text += rest
                if calls:
                  g.finish_reason = "tool_calls"
              yield chunk(g, text, g.finish_reason, token_ids=[], calls=calls)
              continue
            if ts is not None:
              text = ts.feed(text)
            new_ids = g.tokens[n_before:]
            lps = g.logprobs[n_before:] if n_logprobs is not None else None
            if text or lps or (req.return_token_ids and new_ids):
              yield chunk(g, text, None, token_ids=new_ids, lps=lps)
            pending[asyncio.ensure_future(g.queue.get())] = g
        if include_usage:
          body = {"id": rid_str, "object": chunk_obj, "created": now, "model": req.model,
                  "choices": [], "usage": self.usage(gens)}
          yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
      except APIError as e:
        err = {"error": {"message": e.message, "type": e.type, "param": e.param,
                         "code": e.code or str(e.status)}}
        yield f"data: {json.dumps(err)}\n\n"
      finally:
        for fut in pending:
          fut.cancel()
        abort_all()  # client went away (or the stream ended early): free the pages

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
