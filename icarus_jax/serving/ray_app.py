"""ICaRus replicas on Ray Serve, routed by shared context instead of by model.

Ray is an optional extra (``pip install 'ray[serve]'``), imported only here. The application is
two deployments:

* ``EngineReplica`` (N replicas, one per device set): one engine + the OpenAI app of
  ``server.py``, built by ``server_builder.build_server`` from the same ``ServerSpec`` as
  ``launch.serve``; every replica registers every adapter (the host/disk tiers make that cheap).
  Requests reach the app in-process (ASGI), so validation, errors, tool calls and usage are the
  single-process server's. Each response names the replica that served it
  (``x-icarus-replica``). Streamed requests (``stream: true``) run through a streaming handle:
  the replica yields the app's SSE chunks as the app sends them (:func:`asgi_stream`), and a
  client that goes away cancels the generator, which the app sees as a disconnect (its request
  is aborted and its pages freed).
* ``Ingress`` (one replica): the ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and
  ``/health`` routes, forwarding to ``EngineReplica`` through a deployment handle whose Ray
  ``RequestRouter`` is the routing policy.

Routing policies (``ROUTERS``):

* ``context``: :class:`ContextAffinityRouter`. The requests of one workflow go to the replica that
  holds their context, whatever their ``model``: the key is the ``user`` field (an OpenAI
  session id) when given, else the longest previously routed prefix of the rendered prompt (a
  chain of hashes over fixed-size blocks of its text). ICaRus's cache does not depend on the
  model, so that replica has every turn's prefix cached for every adapter. A replica whose queue
  is more than ``imbalance`` requests longer than the least loaded one is skipped (bounded
  imbalance, as Ray's ``PrefixCacheAffinityRouter``). For the conventional (isolated) engine the
  model is part of the key (its cache is per model).
* ``model``: Ray's default router with ``multiplexed_model_id = model`` (``MultiplexMixin``): the
  conventional multi-LoRA choice, a replica that has the adapter loaded.
* ``pow2``: Ray's default power-of-two-choices router, no affinity.

Faults: a replica that dies mid-request fails that request with a 503 naming the replica and
the cause; it is **not** retried (a retry would run the turn twice where the first attempt may
have produced tokens). Ray's controller restarts the replica; routers drop it at once
(``on_replica_actor_died``) and the context keys it owned are forgotten, so those workflows
re-route (and recompute their context) on a live replica.
"""

# No ``from __future__ import annotations``: Ray pickles the ingress class by value, and FastAPI
# needs its ``Request`` annotations as objects in the replica process, not as strings.
import asyncio
import dataclasses
import json
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.request_router import (FIFOMixin, LocalityMixin, MultiplexMixin, PendingRequest,
                                      ReplicaID, RequestRouter, RunningReplica)

from icarus_jax.serving.routing import ContextAffinity, chain_keys
from icarus_jax.serving.server_builder import ServerSpec

ROUTERS = ("context", "model", "pow2")
#: characters of rendered prompt per hashed block (a page of text, roughly)
BLOCK_CHARS = 64
REPLICA_HEADER = "x-icarus-replica"


def prompt_text(body: dict) -> str:
  """The text a request's prompt renders from, in order (chat: each message's role, content and
  tool calls; completions: the prompt), for prefix matching. Model-independent."""
  if "messages" in body:
    parts = []
    for m in body.get("messages") or []:
      if not isinstance(m, dict):
        continue
      content = m.get("content")
      if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
      parts.append(f"<{m.get('role')}>{content or ''}")
      if m.get("tool_calls"):
        parts.append(json.dumps(m["tool_calls"], sort_keys=True))
    return "".join(parts)
  prompt = body.get("prompt", "")
  return prompt if isinstance(prompt, str) else json.dumps(prompt)


def context_keys(body: dict, *, include_model: bool = False,
                 block_chars: int = BLOCK_CHARS) -> list[str]:
  """Affinity keys of a request, most specific last: the session (``user``) alone when given;
  else ``routing.chain_keys`` over the complete ``block_chars`` blocks of the prompt text."""
  salt = f"model={body.get('model')}|" if include_model else ""
  if body.get("user"):
    return chain_keys([f"user={body['user']}".encode()], salt)
  text = prompt_text(body)
  return chain_keys([text[i * block_chars:(i + 1) * block_chars].encode()
                     for i in range(len(text) // block_chars)], salt)


class ContextAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
  """Ray's side of ``routing.ContextAffinity``: keys from the request body, loads from Ray's
  replica queue-length cache. Returns ranks (the preferred replica, then the others): Ray sends
  to the first rank's replica if it accepts, else tries the next rank."""

  def initialize_state(self, imbalance: int = 4, include_model: bool = False,
                       block_chars: int = BLOCK_CHARS, max_keys: int = 200_000):
    self._policy = ContextAffinity(imbalance=imbalance, max_keys=max_keys)
    self._include_model = include_model
    self._block_chars = block_chars

  def _keys(self, pending_request: PendingRequest | None) -> list[str] | None:
    if pending_request is None or len(pending_request.args) < 2:
      return None
    body = pending_request.args[1]
    if not isinstance(body, dict):
      return None
    return context_keys(body, include_model=self._include_model, block_chars=self._block_chars)

  async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                            pending_request: PendingRequest | None = None
                            ) -> list[list[RunningReplica]]:
    keys = self._keys(pending_request)
    if keys is None or not candidate_replicas:
      return [candidate_replicas]
    by_id = {r.replica_id: r for r in candidate_replicas}
    loads = {rid: self._replica_queue_len_cache.get(rid) or 0 for rid in by_id}
    ranked = self._policy.rank(keys, loads)
    return [[by_id[ranked[0]]], [by_id[r] for r in ranked[1:]]]

  def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                        result: Any) -> None:
    keys = self._keys(pending_request)
    if keys is not None:
      self._policy.record(keys, replica_id)

  def on_replica_actor_died(self, replica_id: ReplicaID):
    super().on_replica_actor_died(replica_id)
    self._policy.forget(replica_id)


async def asgi_stream(app, path: str, body: dict, headers: dict) -> AsyncIterator:
  """POSTs ``body`` to ``app`` (ASGI, in-process) and yields ``(status, None)`` when the response
  starts, then each body chunk (bytes) as the app sends it. Closing the generator early (the
  client went away) tells the app ``http.disconnect`` and waits for it to finish."""
  sent, disconnected = False, asyncio.Event()
  queue: asyncio.Queue = asyncio.Queue()
  raw = json.dumps(body).encode()

  async def receive():
    nonlocal sent
    if not sent:
      sent = True
      return {"type": "http.request", "body": raw, "more_body": False}
    await disconnected.wait()
    return {"type": "http.disconnect"}

  async def send(message):
    await queue.put(message)

  scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
           "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
           "raw_path": path.encode(), "query_string": b"", "root_path": "",
           "headers": [(b"content-type", b"application/json")] + [
               (k.lower().encode(), v.encode()) for k, v in headers.items()],
           "client": ("ray-ingress", 0), "server": ("replica", 80)}
  task = asyncio.ensure_future(app(scope, receive, send))
  task.add_done_callback(lambda t: queue.put_nowait(None))  # the app ended (or raised)
  try:
    while True:
      message = await queue.get()
      if message is None:
        if task.exception() is not None:
          raise task.exception()
        return
      if message["type"] == "http.response.start":
        yield message["status"], None
      elif message["type"] == "http.response.body":
        if message.get("body"):
          yield message["body"]
        if not message.get("more_body", False):
          return
  finally:
    disconnected.set()
    try:
      await asyncio.wait_for(asyncio.shield(task), 30)
    except Exception:  # noqa: BLE001 - the app's own error handling answered; do not mask
      pass


@serve.deployment(max_ongoing_requests=64, health_check_period_s=2.0)
class EngineReplica:
  """One engine + OpenAI app (``ServerSpec`` as a dict of its fields)."""

  def __init__(self, spec: dict):
    import httpx

    from icarus_jax.serving.engine_config import EngineConfig
    from icarus_jax.serving.server_builder import build_server
    spec = dict(spec)
    spec["engine"] = EngineConfig(**spec.get("engine", {}))
    self.aengine, self.app = build_server(ServerSpec(**spec))
    self.replica_id = serve.get_replica_context().replica_id.unique_id
    self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                    base_url="http://replica", timeout=None)

  @serve.multiplexed(max_num_models_per_replica=64)
  async def _warm_model(self, model_id: str) -> str:
    """The ``model`` router's notion of a loaded model (Ray's ``MultiplexMixin`` prefers
    replicas that report it): every replica has every adapter registered; this records which
    ones it has served."""
    return model_id

  async def __call__(self, path: str, body: dict, headers: dict) -> tuple[int, Any, str]:
    model_id = serve.get_multiplexed_model_id()
    if model_id:
      await self._warm_model(model_id)
    r = await self.client.post(path, json=body, headers=headers)
    try:
      payload = r.json()
    except ValueError:
      payload = {"error": {"message": r.text, "type": "server_error"}}
    return r.status_code, payload, self.replica_id

  async def stream(self, path: str, body: dict, headers: dict) -> AsyncIterator:
    """A streamed request: yields ``(status, replica id)``, then the app's SSE chunks (bytes) as
    they come; a non-200 answer yields its JSON error body (a dict) instead."""
    model_id = serve.get_multiplexed_model_id()
    if model_id:
      await self._warm_model(model_id)
    status = 500
    chunks = asgi_stream(self.app, path, body, headers)
    try:
      async for item in chunks:
        if isinstance(item, tuple):
          status = item[0]
          yield status, self.replica_id
        elif status == 200:
          yield item
        else:  # an error answer: one JSON body
          try:
            yield json.loads(item)
          except ValueError:
            yield {"error": {"message": item.decode(errors="replace"), "type": "server_error"}}
    finally:
      await chunks.aclose()

  async def get(self, path: str, headers: dict) -> tuple[int, Any, str]:
    r = await self.client.get(path, headers=headers)
    return r.status_code, r.json(), self.replica_id

  def check_health(self):
    """Ray's health check: a dead engine (fault after donation) fails it, so Ray replaces the
    replica."""
    if not self.aengine.alive:
      raise RuntimeError(f"engine dead: {self.aengine.dead_reason}")

  def __del__(self):
    aengine = getattr(self, "aengine", None)
    if aengine is not None:
      aengine.shutdown()


def _auth(request: Request) -> dict:
  """The caller's Authorization header, passed on to the replica's app (which checks it)."""
  return {k: v for k, v in request.headers.items() if k.lower() == "authorization"}


def _ingress_app():
  api = FastAPI(title="icarus-jax on Ray Serve")

  def error(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None,
                                   "code": None}}, status_code=status)

  @serve.deployment(max_ongoing_requests=1024)
  @serve.ingress(api)
  class Ingress:
    """The OpenAI routes in front of the replicas; ``router`` picks the routing policy."""

    def __init__(self, replicas, router: str):
      self.replicas = replicas
      self.router = router

    async def _forward(self, path: str, request: Request):
      try:
        body = await request.json()
      except ValueError:
        return error(400, "request body is not valid JSON")
      if not isinstance(body, dict):
        return error(400, "request body must be a JSON object")
      handle = self.replicas
      if self.router == "model":
        handle = handle.options(multiplexed_model_id=str(body.get("model") or ""))
      if body.get("stream"):
        return await self._stream(handle, path, body, request)
      try:
        status, payload, replica = await handle.remote(path, body, _auth(request))
      except Exception as e:  # noqa: BLE001 - a replica died or was unreachable: say so
        return error(503, f"the replica serving this request failed ({type(e).__name__}: "
                          f"{str(e)[:300]}); it was not retried, since it may have produced "
                          f"tokens; send it again", "server_error")
      return JSONResponse(payload, status_code=status, headers={REPLICA_HEADER: replica})

    async def _stream(self, handle, path: str, body: dict, request: Request):
      gen = handle.options(stream=True).stream.remote(path, body, _auth(request))
      try:
        status, replica = await gen.__anext__()
        if status != 200:
          payload = await gen.__anext__()
          return JSONResponse(payload, status_code=status, headers={REPLICA_HEADER: replica})
      except Exception as e:  # noqa: BLE001 - as _forward: the replica failed before answering
        gen.cancel()
        return error(503, f"the replica serving this request failed ({type(e).__name__}: "
                          f"{str(e)[:300]}); it was not retried; send it again", "server_error")

      async def chunks():
        finished = False
        try:
          async for chunk in gen:
            yield chunk
          finished = True
        except Exception as e:  # noqa: BLE001 - the replica died mid-stream: an SSE error
          finished = True
          err = {"error": {"message": f"the replica serving this request failed "
                                      f"({type(e).__name__}); the stream is incomplete",
                           "type": "server_error", "param": None, "code": "503"}}
          yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
          if not finished:
            gen.cancel()  # the client went away: the replica's app sees a disconnect
      return StreamingResponse(chunks(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", REPLICA_HEADER: replica})

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
      return await self._forward("/v1/chat/completions", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
      return await self._forward("/v1/completions", request)

    @api.get("/v1/models")
    async def models(self, request: Request):
      status, payload, replica = await self.replicas.get.remote("/v1/models", _auth(request))
      return JSONResponse(payload, status_code=status, headers={REPLICA_HEADER: replica})

    @api.get("/health")
    async def health(self):
      return {"status": "ok"}

  return Ingress


def build_app(spec: ServerSpec, *, num_replicas: int = 2, router: str = "context",
              imbalance: int = 4, replica_options: dict | None = None):
  """The Ray Serve application: ``num_replicas`` engine replicas of ``spec`` behind the ingress,
  routed by ``router`` (``ROUTERS``). ``replica_options``: extra ``.options`` of the replica
  deployment (e.g. ``ray_actor_options={"num_gpus": 1}`` for one device per replica)."""
  from ray.serve.config import RequestRouterConfig
  if router not in ROUTERS:
    raise ValueError(f"router={router!r} is unknown; accepted: {ROUTERS}")
  if num_replicas < 1:
    raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
  fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
  fields["engine"] = dataclasses.asdict(spec.engine)
  for k in ("adapters", "lora_roots"):
    if fields[k] is not None:
      fields[k] = list(fields[k])
  opts = dict(num_replicas=num_replicas, **(replica_options or {}))
  if router == "context":
    opts["request_router_config"] = RequestRouterConfig(
        request_router_class=ContextAffinityRouter,
        request_router_kwargs={"imbalance": imbalance,
                               "include_model": spec.engine.mode == "isolated"})
  replicas = EngineReplica.options(**opts).bind(fields)
  return _ingress_app().bind(replicas, router)
