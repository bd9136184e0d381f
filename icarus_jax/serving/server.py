"""OpenAI-compatible HTTP server: every adapter is a model, one KV cache behind them all.

Routes (FastAPI on uvicorn; the engine runs on its own thread, see :mod:`async_engine`):

  GET  /health                      200 while the engine thread is alive
  GET  /metrics                     Prometheus text
  GET  /v1/models                   the base and every adapter (``parent`` = the base)
  POST /v1/completions              prompt (text or token ids), stream, n, usage...
  POST /v1/chat/completions         messages through the chat template, stream, n, usage...
  POST /v1/load_lora_adapter        {"lora_name", "lora_path"}: ICaRus gate + base fingerprint
                                    (403 unless started with allow_runtime_lora; lora_roots)
  POST /v1/unload_lora_adapter      {"lora_name"}: running requests finish, new ones get 404

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 malformed JSON,
bad fields (ranges, lone surrogates, unsupported ``logprobs``) or prompt too long; 401 bad API
key; 403 runtime adapter loading disabled or path outside the allowed roots; 404 unknown model;
500 a request failed in the engine (only that request: the engine isolates faults); 503 the
engine thread is dead (``/health`` says why).
``cache_salt`` (body) or the ``X-Cache-Salt`` header partitions the prefix cache per tenant.
Non-standard extras, as in vLLM: ``return_token_ids`` (token ids in each choice),
``top_k``, ``stop_token_ids``, ``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from icarus_jax.serving.async_engine import AsyncEngine, EngineDeadError
from icarus_jax.model.chat_template import ChatTemplate
from icarus_jax.serving.tool_calls import ToolCallStream, parse_tool_calls, parser_for
from icarus_jax.serving.engine import RequestOutput
from icarus_jax.errors import IcarusError, RequestTooLargeError, UnknownAdapterError
from icarus_jax.serving.protocol import (APIError, ChatRequest, CompletionRequest, LoadLoraRequest,
                                 UnloadLoraRequest, first_line, SamplingRequest, error_response)
from icarus_jax.serving.sampling import SamplingParams
from icarus_jax.serving.server_metrics import ServerMetrics
from icarus_jax.serving.stop_strings import StopStringMatcher

log = logging.getLogger("icarus_jax.serving.server")


# ----------------------------------------------------------------------------- the app

class _Gen:
  """One choice of a request in flight."""

  def __init__(self, index: int, rid: int, queue: asyncio.Queue, matcher: StopStringMatcher):
    self.index, self.rid, self.queue = index, rid, queue
    self.tokens: list[int] = []
    self.matcher = matcher  # incremental detokenization + stop strings
    self.finish_reason: str | None = None
    self.out: RequestOutput | None = None

  @property
  def text(self) -> str:
    return self.matcher.text


def create_app(aengine: AsyncEngine, tokenizer, *, base_name: str = "base",
               chat_template: ChatTemplate | None = None, api_key: str | None = None,
               adapter_loader=None, allow_runtime_lora: bool = False,
               lora_roots: Sequence[str | os.PathLike] | None = None,
               trust_foreign_adapters: bool = False) -> FastAPI:
  """The FastAPI app over a started :class:`AsyncEngine`.

  ``adapter_loader(path, name) -> Adapter`` reads adapters for ``/v1/load_lora_adapter``
  (default: :func:`icarus_jax.checkpoints.peft_io.load_adapter`). Runtime loading and unloading is off
  unless ``allow_runtime_lora`` (``launch.serve --allow_runtime_lora``, as vLLM's
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``); with ``lora_roots`` only paths inside those
  directories load (after resolving symlinks and ``..``). ``trust_foreign_adapters``: an
  adapter that records no base fingerprint (trained elsewhere, e.g. with HF PEFT) is taken as
  trained on the served base; one that records another base is still refused.
  """
  engine = aengine.engine
  chat_template = chat_template or ChatTemplate(tokenizer)
  tool_parser = parser_for(chat_template.template)
  metrics = ServerMetrics(aengine)
  created = int(time.time())
  app = FastAPI(title="icarus-jax", version="0.1.0")
  app.state.aengine = aengine
  app.state.metrics = metrics
  if adapter_loader is None:
    from icarus_jax.checkpoints.peft_io import load_adapter
    kind = "icarus_lora" if engine.mode == "icarus" else "lora"
    trusted = engine.fingerprint if trust_foreign_adapters else None
    adapter_loader = lambda path, name: load_adapter(  # noqa: E731
        path, kind=kind, name=name, base_fingerprint=trusted)

  def _err(status, message, type_="invalid_request_error", param=None, code=None):
    metrics.http_errors.labels(str(status)).inc()
    return error_response(status, message, type_, param, code)

  @app.exception_handler(APIError)
  async def _api_error(_, e: APIError):
    return _err(e.status, e.message, e.type, e.param, e.code)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(_, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "json_invalid":
      return _err(400, f"malformed JSON body: {first.get('msg', '')}")
    msgs = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body')}: "
                     f"{er.get('msg')}" for er in errs[:5])
    return _err(400, f"invalid request: {msgs}", param=loc or None)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(_, e: StarletteHTTPException):
    return _err(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500
                else "server_error")

  @app.middleware("http")
  async def _auth_and_guard(request: Request, call_next):
    if api_key and request.url.path.startswith("/v1"):
      got = request.headers.get("authorization", "").encode("utf-8", "replace")
      if not secrets.compare_digest(got, f"Bearer {api_key}".encode()):
        return _err(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                    "authentication_error")
    try:
      return await call_next(request)
    except Exception as e:  # noqa: BLE001 - a bug answers 500 in OpenAI form; the connection
      log.exception("unhandled error on %s", request.url.path)  # stays usable
      return _err(500, f"internal server error: {type(e).__name__}", "server_error")

  # -------------------------------------------------------------- helpers
  def resolve_model(name: str) -> str | None:
    """The base name -> None; any other name goes to the engine, which owns the adapter set
    (checked on its thread at submit, so a just-loaded adapter is never refused)."""
    return None if name == base_name else name

  async def adapter_names() -> list[str]:
    return await aengine.acall(lambda e: list(e.adapter_names))

  def max_tokens_of(req: SamplingRequest, prompt_len: int) -> int:
    """``max_completion_tokens`` or ``max_tokens``; neither: the rest of the context (as OpenAI
    and vLLM do), bounded by what the KV pool can hold for one request."""
    return (req.max_completion_tokens or req.max_tokens
            or max(1, engine.max_request_tokens - prompt_len))

  def sampling_for(req: SamplingRequest, index: int, max_tokens: int) -> SamplingParams:
    stop_ids = list(req.stop_token_ids or [])
    eos = getattr(tokenizer, "eos_id", None)
    if not req.ignore_eos and eos is not None:
      stop_ids.append(eos)
    # Any int64 seed is accepted (as vLLM does) and folded into the sampler's 32-bit range.
    seed = ((req.seed if req.seed is not None else secrets.randbits(31)) + index) % 2**32
    try:
      return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                            seed=seed, max_tokens=max_tokens, stop_token_ids=tuple(stop_ids))
    except IcarusError as e:
      raise APIError(400, str(e)) from None

  def stop_strings(req: SamplingRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stops):
      raise APIError(400, "stop strings must be non-empty", param="stop")
    return stops

  def check_unsupported(req: SamplingRequest) -> None:
    if req.logprobs is not None and req.logprobs is not False:
      raise APIError(400, "logprobs are not supported by this server yet; omit 'logprobs' (and "
                          "'top_logprobs')", param="logprobs")
    if req.top_logprobs not in (None, 0):
      raise APIError(400, "top_logprobs is not supported by this server yet; omit it",
                     param="top_logprobs")
    defaults = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                "min_p": 0.0, "logit_bias": None}
    for field, default in defaults.items():
      if getattr(req, field) not in (default, {}):
        raise APIError(400, f"{field} is not supported by this server yet; omit it (it would "
                            f"otherwise be ignored)", param=field)
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.get("type", "text") != "text":
      raise APIError(400, f"response_format type {rf.get('type')!r} is not supported by this "
                          f"server yet; accepted: 'text'", param="response_format")

  async def start(req: SamplingRequest, prompt_ids: list[int], adapter: str | None, request: Request,
                  stops: list[str]) -> list[_Gen]:
    tenant = req.cache_salt or request.headers.get("x-cache-salt")
    gens: list[_Gen] = []
    try:
      for i in range(req.n):
        rid, q = await aengine.submit(prompt_ids, adapter,
                                      sampling_for(req, i, max_tokens_of(req, len(prompt_ids))),
                                      tenant=tenant)
        gens.append(_Gen(i, rid, q, StopStringMatcher(tokenizer, stops)))
    except EngineDeadError as e:
      raise APIError(503, f"the engine is not running ({e}); the server must be restarted",
                     "server_error") from None
    except UnknownAdapterError:
      for g in gens:
        aengine.abort(g.rid)
      raise APIError(404, f"The model `{req.model}` does not exist. Available: "
                          f"{[base_name] + await adapter_names()}", "NotFoundError",
                     "model") from None
    except RequestTooLargeError as e:
      for g in gens:
        aengine.abort(g.rid)
      raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
    except IcarusError as e:
      for g in gens:
        aengine.abort(g.rid)
      raise APIError(400, str(e)) from None
    return gens

  def apply_event(g: _Gen, ev) -> tuple[str, bool]:
    """Folds one engine event into ``g``; returns (new text safe to send, finished)."""
    kind, val = ev
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
    new = g.matcher.add(val)
    if g.matcher.stopped:
      g.finish_reason = "stop"
      aengine.abort(g.rid)  # free its pages now
    return new, False

  async def next_event(g: _Gen, request: Request):
    while True:
      try:
        return await asyncio.wait_for(g.queue.get(), timeout=1.0)
      except asyncio.TimeoutError:
        if await request.is_disconnected():
          raise asyncio.CancelledError("client disconnected") from None

  def flush_text(g: _Gen) -> str:
    """Text held back for stop-string matching, released at the end ("" after a stop)."""
    return g.matcher.finish()

  def usage(gens: list[_Gen], prompt_len: int) -> dict:
    comp = sum(len(g.tokens) for g in gens)
    cached = gens[0].out.num_cached_tokens if gens and gens[0].out else 0
    return {"prompt_tokens": prompt_len, "completion_tokens": comp,
            "total_tokens": prompt_len + comp,
            "prompt_tokens_details": {"cached_tokens": cached}}

  async def run_request(req: SamplingRequest, prompt_ids: list[int], request: Request, *, chat: bool,
                        echo_text: str = "", tool_parser: str | None = None):
    adapter = resolve_model(req.model)
    check_unsupported(req)
    stops = stop_strings(req)
    max_tokens = max_tokens_of(req, len(prompt_ids))
    if prompt_ids and len(prompt_ids) + max_tokens > engine.max_seq_len:
      raise APIError(400, f"This model's maximum context length is {engine.max_seq_len} tokens. "
                          f"However, you requested {len(prompt_ids) + max_tokens} tokens "
                          f"({len(prompt_ids)} in the prompt, {max_tokens} in the completion). "
                          f"Please reduce the prompt or max_tokens.", param="max_tokens",
                     code="context_length_exceeded")
    gens = await start(req, prompt_ids, adapter, request, stops)
    rid_str = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    obj = "chat.completion" if chat else "text_completion"
    now = int(time.time())

    def abort_all():
      for g in gens:
        if g.out is None:
          aengine.abort(g.rid)

    if not req.stream:
      try:
        for g in gens:
          done = False
          while not done:
            _, done = apply_event(g, await next_event(g, request))
          flush_text(g)
      except BaseException:
        abort_all()
        raise
      choices = []
      for g in gens:
        c: dict[str, Any] = {"index": g.index, "finish_reason": g.finish_reason}
        if chat:
          c["message"] = {"role": "assistant", "content": g.text}
          if tool_parser is not None:
            content, calls = parse_tool_calls(g.text, tool_parser)
            if calls:
              c["message"] = {"role": "assistant", "content": content or None,
                              "tool_calls": calls}
              c["finish_reason"] = g.finish_reason = "tool_calls"
        else:
          c["text"] = echo_text + g.text
          c["logprobs"] = None
        if req.return_token_ids:
          c["token_ids"] = g.tokens
        choices.append(c)
      return JSONResponse({"id": rid_str, "object": obj, "created": now, "model": req.model,
                           "choices": choices, "usage": usage(gens, len(prompt_ids))})

    include_usage = bool((req.stream_options or {}).get("include_usage"))
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    streams = {g.index: ToolCallStream(tool_parser) for g in gens} if tool_parser else {}

    def chunk(g: _Gen, text: str, finish: str | None, first: bool = False, token_ids=None,
              calls=None):
      if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
            {"content": text} if text else {})
        if calls:
          delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
        c: dict[str, Any] = {"index": g.index, "delta": delta, "finish_reason": finish}
      else:
        c = {"index": g.index, "text": text, "logprobs": None, "finish_reason": finish}
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
            text, finished = apply_event(g, ev)
            ts = streams.get(g.index)
            if finished:
              text += flush_text(g)
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
            if text or (req.return_token_ids and new_ids):
              yield chunk(g, text, None, token_ids=new_ids)
            pending[asyncio.ensure_future(g.queue.get())] = g
        if include_usage:
          body = {"id": rid_str, "object": chunk_obj, "created": now, "model": req.model,
                  "choices": [], "usage": usage(gens, len(prompt_ids))}
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

  # -------------------------------------------------------------- routes
  @app.get("/health")
  async def health():
    if not aengine.alive:
      return _err(503, f"engine thread is not running: {aengine.dead_reason or 'not started'}",
                  "server_error")
    return {"status": "ok"}

  @app.get("/metrics")
  async def prom():
    return PlainTextResponse(generate_latest(metrics.registry).decode(),
                             media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models():
    root = f"{engine.cfg.name}@{engine.fingerprint}"
    data = [{"id": base_name, "object": "model", "created": created, "owned_by": "icarus-jax",
             "root": root, "parent": None, "max_model_len": engine.max_seq_len}]
    for name in await adapter_names():
      data.append({"id": name, "object": "model", "created": created, "owned_by": "icarus-jax",
                   "root": root, "parent": base_name, "max_model_len": engine.max_seq_len})
    return {"object": "list", "data": data}

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest, request: Request):
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (list, str)):
      if len(p) != 1:
        raise APIError(400, "batched prompts are not supported; send one prompt per request",
                       param="prompt")
      p = p[0]
    if isinstance(p, str):
      if not p:
        raise APIError(400, "prompt is empty", param="prompt")
      ids, echo = tokenizer.encode(p), (p if req.echo else "")
    else:
      ids, echo = list(p), (tokenizer.decode(p) if req.echo else "")
    return await run_request(req, ids, request, chat=False, echo_text=echo)

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatRequest, request: Request):
    choice = req.tool_choice
    if isinstance(choice, dict) or choice == "required":
      raise APIError(400, "tool_choice 'required' and named functions need constrained decoding, "
                          "which this server does not do yet; accepted: 'auto', 'none'",
                     param="tool_choice")
    if choice not in (None, "auto", "none"):
      raise APIError(400, f"tool_choice={choice!r}; accepted: 'auto', 'none'",
                     param="tool_choice")
    if choice is not None and not req.tools:
      raise APIError(400, "tool_choice needs tools", param="tool_choice")
    try:
      # the messages as sent (developer -> system, tool calls and results) through the same
      # renderer training uses (icarus_jax.model.chat_template)
      ids = chat_template.encode([m.model_dump(exclude_none=True) for m in req.messages],
                                 req.tools)
    except IcarusError as e:
      raise APIError(400, str(e), param="messages") from None
    parser = tool_parser if req.tools and choice != "none" else None
    return await run_request(req, ids, request, chat=True, tool_parser=parser)

  roots = [Path(r).resolve() for r in (lora_roots or [])]

  def check_runtime_lora() -> None:
    if not allow_runtime_lora:
      raise APIError(403, "runtime adapter loading is disabled on this server; start it with "
                          "--allow_runtime_lora (and --lora_roots=DIR,... to confine paths)",
                     "permission_error")

  def allowed_path(path: str) -> Path:
    p = Path(path).expanduser().resolve()
    if roots and not any(p == r or r in p.parents for r in roots):
      raise APIError(403, f"lora_path {path!r} is outside the allowed adapter roots "
                          f"{[str(r) for r in roots]}", "permission_error", "lora_path")
    return p

  @app.post("/v1/load_lora_adapter")
  async def load_lora(req: LoadLoraRequest):
    check_runtime_lora()
    if req.lora_name == base_name:
      raise APIError(400, f"{req.lora_name!r} is the base model's name", param="lora_name")
    path = allowed_path(req.lora_path)
    try:
      adapter = await asyncio.to_thread(adapter_loader, str(path), req.lora_name)
      await aengine.acall(lambda e: e.add_adapter(adapter, req.lora_name))
    except EngineDeadError as e:
      raise APIError(503, f"the engine is not running ({e})", "server_error") from None
    except OSError as e:  # the reason only (no file contents), e.g. "No such file or directory"
      raise APIError(400, f"cannot load adapter {req.lora_name!r} from {req.lora_path}: "
                          f"{e.strerror or type(e).__name__}", param="lora_path") from None
    except (IcarusError, ValueError, KeyError) as e:
      raise APIError(400, f"cannot load adapter {req.lora_name!r} from {req.lora_path}: "
                          f"{first_line(e)}", param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

  @app.post("/v1/unload_lora_adapter")
  async def unload_lora(req: UnloadLoraRequest):
    check_runtime_lora()
    try:
      await aengine.acall(lambda e: e.remove_adapter(req.lora_name))
    except UnknownAdapterError:
      raise APIError(404, f"The model `{req.lora_name}` does not exist.", "NotFoundError",
                     "lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

  return app
