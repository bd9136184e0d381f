"""OpenAI-compatible HTTP server: every adapter is a model, one KV cache behind them all.

Routes (FastAPI on uvicorn; the engine runs on its own thread, see :mod:`async_engine`; what a
generation request does is :mod:`openai_requests`):

  GET  /health                      200 while the engine thread is alive
  GET  /metrics                     Prometheus text
  GET  /v1/models                   the base and every adapter (``parent`` = the base)
  POST /v1/completions              prompt (text or token ids), stream, n, usage...
  POST /v1/chat/completions         messages through the chat template, stream, n, usage...
  POST /v1/load_lora_adapter        {"lora_name", "lora_path"}: ICaRus gate + base fingerprint
                                    (403 unless started with allow_runtime_lora; lora_roots)
  POST /v1/unload_lora_adapter      {"lora_name"}: running requests finish, new ones get 404

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 malformed JSON,
bad fields (ranges, lone surrogates, unsupported options named) or prompt too long; 401 bad API
key; 403 runtime adapter loading disabled or path outside the allowed roots; 404 unknown model;
500 a request failed in the engine (only that request: the engine isolates faults); 503 the
engine thread is dead (``/health`` says why).
``cache_salt`` (body) or the ``X-Cache-Salt`` header partitions the prefix cache per tenant.
Non-standard extras, as in vLLM: ``return_token_ids`` (token ids in each choice),
``top_k``, ``stop_token_ids``, ``ignore_eos``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from icarus_jax.errors import IcarusError, UnknownAdapterError
from icarus_jax.model.chat_template import ChatTemplate
from icarus_jax.serving.async_engine import AsyncEngine, EngineDeadError
from icarus_jax.serving.openai_requests import RequestHandler
from icarus_jax.serving.protocol import (MAX_CHOICES, APIError, ChatRequest, CompletionRequest,
                                         LoadLoraRequest, UnloadLoraRequest, error_response,
                                         first_line)
from icarus_jax.serving.server_metrics import ServerMetrics
from icarus_jax.serving.tool_calls import parser_for

log = logging.getLogger("icarus_jax.serving.server")


# ----------------------------------------------------------------------------- the app

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
  metrics = ServerMetrics(aengine, base_name)
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
  handler = RequestHandler(aengine, tokenizer, base_name)

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
    for name in await handler.adapter_names():
      data.append({"id": name, "object": "model", "created": created, "owned_by": "icarus-jax",
                   "root": root, "parent": base_name, "max_model_len": engine.max_seq_len})
    return {"object": "list", "data": data}

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest, request: Request):
    p = req.prompt
    batch = p if isinstance(p, list) and p and isinstance(p[0], (list, str)) else [p]
    if len(batch) * req.n > MAX_CHOICES:
      raise APIError(400, f"{len(batch)} prompts x n={req.n} choices is more than {MAX_CHOICES} "
                          f"choices per request", param="prompt")
    prompts = []
    for i, q in enumerate(batch):
      if isinstance(q, str):
        if not q:
          raise APIError(400, f"prompt {i} is empty" if len(batch) > 1 else "prompt is empty",
                         param="prompt")
        prompts.append((tokenizer.encode(q), q if req.echo else ""))
      elif isinstance(q, list) and all(isinstance(t, int) for t in q):
        prompts.append((list(q), tokenizer.decode(q) if req.echo else ""))
      else:
        raise APIError(400, "a batch of prompts must be all strings or all token-id lists",
                       param="prompt")
    return await handler.run_request(req, prompts, request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatRequest, request: Request):
    choice = req.tool_choice
    if not isinstance(choice, dict) and choice not in (None, "auto", "none", "required"):
      raise APIError(400, f"tool_choice={choice!r}; accepted: 'auto', 'none', 'required', or "
                          f"a named function", param="tool_choice")
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
    return await handler.run_request(req, [(ids, "")], request, chat=True, tool_parser=parser)

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
