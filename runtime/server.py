"""`flashlm serve`: an OpenAI-compatible HTTP API over one model.

Routes: POST /v1/chat/completions and /v1/completions (JSON or server-sent events), GET /v1/models,
GET /health (503 while the model loads). One generation runs at a time; the engine
(runtime/engine.py) keeps a bounded queue and answers 503 with Retry-After when it is full. A client
that disconnects cancels its generation; bodies and prompts are bounded; every error has OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with the status code OpenAI uses.

HTTP library: Starlette on uvicorn. Both are widely used, actively maintained and small (Starlette
needs only anyio; uvicorn, h11 and click). uvicorn parses HTTP/1.1 (keep-alive, chunked bodies,
header limits) and caps open connections; Starlette gives routing, streaming responses and, under
uvicorn's ASGI 2.3, a disconnect listener that cancels a stream whose client left. FastAPI would add
pydantic models whose validation errors do not have OpenAI's shape; aiohttp is a larger framework;
the standard library's http.server is one thread per connection with no disconnect signal.

Request validation lives here, on the raw JSON: each field is checked for type and range with a
message naming it, unknown fields are refused as OpenAI does (a misspelt `temprature` must not be
silently ignored), and OpenAI features this server does not implement (tools, logprobs, n > 1,
penalties) are refused unless given their neutral value.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import socket
import time
import uuid
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Failed, Finished, GenerationRequest, NotReady, Piece, QueueFull
from .sampling import SamplingParams
from .chat_template import ChatTemplateError

log = logging.getLogger("flashlm.server")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None       # if set, /v1/* needs "Authorization: Bearer KEY"
    max_body_bytes: int = 2 * 2**20  # a 32k-token prompt is ~130 kB of text; this leaves room for JSON escapes
    max_connections: int = 64        # uvicorn answers 503 beyond this many open connections
    allowed_hosts: tuple[str, ...] | None = None   # Host header names accepted (None: any); see HttpServer
    max_stops: int = 16
    max_stop_chars: int = 256        # stop strings are matched every token: bound their cost


# --- errors --------------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _busy(e: QueueFull) -> ApiError:
    return ApiError(503, str(e), type="server_error", code="server_busy",
                    headers={"Retry-After": str(e.retry_after)})


def _not_ready(engine: Engine) -> ApiError:
    if engine.state == "loading":
        return ApiError(503, "the model is still loading; retry shortly", type="server_error",
                        code="model_loading", headers={"Retry-After": "1"})
    return ApiError(503, f"the model is not available ({engine.state})", type="server_error", code="model_unavailable")


# --- reading a JSON body -------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list) -> dict:
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


async def _read_json(request: Request, limit: int) -> dict:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        # A web page can make a browser POST text/plain or form data to any address without asking;
        # application/json needs a CORS preflight this server never grants.
        raise ApiError(415, f"Content-Type must be application/json, got {media or 'none'!r}",
                       code="unsupported_media_type")
    too_big = ApiError(413, f"request body exceeds the server's limit of {limit} bytes",
                       code="request_too_large", headers={"Connection": "close"})
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big                # refused before reading a byte
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        obj = json.loads(bytes(body), parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ApiError(400, "invalid JSON body: nested too deeply") from None
    except ValueError as e:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"invalid JSON body: {e}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(obj)}")
    return obj


# --- field checks --------------------------------------------------------------------------------------
def _json_type(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def _bad(name: str, message: str) -> ApiError:
    return ApiError(400, f"'{name}' {message}", param=name)


def _number(v, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"must be a number, got {_json_type(v)}")
    if not (lo < v if lo_open else lo <= v) or not v <= hi or not math.isfinite(v):
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _integer(v, name: str, lo: int, hi: int) -> int | None:
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)                   # 16.0 is an integer in JSON's eyes
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"must be an integer, got {_json_type(v)}")
    if not lo <= v <= hi:
        raise _bad(name, f"must be in [{lo}, {hi}], got {v}")
    return v


def _boolean(v, name: str) -> bool | None:
    if v is not None and not isinstance(v, bool):
        raise _bad(name, f"must be a boolean, got {_json_type(v)}")
    return v


# Fields of OpenAI's API this server accepts only with the value that means "feature not used".
_NEUTRAL = {
    "n": lambda v: v == 1 and not isinstance(v, bool),
    "presence_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "frequency_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "logit_bias": lambda v: v == {},
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0 and not isinstance(v, bool),
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v in ("none", "auto"),
    "parallel_tool_calls": lambda v: isinstance(v, bool),
    "response_format": lambda v: v == {"type": "text"},
    "echo": lambda v: v is False,
    "best_of": lambda v: v == 1 and not isinstance(v, bool),
    "suffix": lambda v: v == "",
    # metadata-only fields: accepted, they change nothing
    "user": lambda v: isinstance(v, str),
    "metadata": lambda v: isinstance(v, dict),
    "store": lambda v: isinstance(v, bool),
    "service_tier": lambda v: isinstance(v, str),
}
_COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                  "repeat_penalty", "repetition_penalty", "seed", "stop",
                  "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                 "parallel_tool_calls", "response_format", "metadata", "store", "service_tier"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Options:
    """What a request asks of the generation, checked; sampling overrides of None keep the model's defaults."""
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)


def _options(body: dict, allowed: set[str], settings: ServerSettings) -> Options:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    model = body.get("model")
    if model is None:
        raise ApiError(400, "you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise _bad("model", f"must be a string, got {_json_type(model)}")
    for name, neutral in _NEUTRAL.items():
        if body.get(name) is not None and not neutral(body[name]):
            raise _bad(name, f"= {json.dumps(body[name])[:80]} is not supported by this server")
    o = Options()
    o.stream = bool(_boolean(body.get("stream"), "stream"))
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"include_usage"}:
            raise _bad("stream_options", "must be an object with only 'include_usage'")
        if not o.stream:
            raise _bad("stream_options", "is only allowed when 'stream' is true")
        o.include_usage = bool(_boolean(so.get("include_usage"), "stream_options.include_usage"))
    limits = [_integer(body.get(k), k, 1, 2**31 - 1) for k in ("max_tokens", "max_completion_tokens")]
    limits = [x for x in limits if x is not None]
    o.max_tokens = min(limits) if limits else None
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or an array of strings")
    if len(stops) > settings.max_stops or any(len(s) > settings.max_stop_chars for s in stops):
        raise _bad("stop", f"allows at most {settings.max_stops} strings of at most {settings.max_stop_chars} characters")
    o.stop = stops
    penalties = [body.get(k) for k in ("repeat_penalty", "repetition_penalty") if body.get(k) is not None]
    o.sampling = dict(
        temperature=_number(body.get("temperature"), "temperature", 0.0, 2.0),
        top_p=_number(body.get("top_p"), "top_p", 0.0, 1.0, lo_open=True),
        top_k=_integer(body.get("top_k"), "top_k", 0, 2**31 - 1),
        min_p=_number(body.get("min_p"), "min_p", 0.0, 1.0),
        repetition_penalty=_number(penalties[0] if penalties else None, "repetition_penalty", 0.0, 10.0, lo_open=True),
        seed=_integer(body.get("seed"), "seed", 0, 2**63 - 1),
    )
    return o


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"must be an object, got {_json_type(m)}")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise _bad(f"{where}.{extra[0]}", "is not supported by this server")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role", f"must be one of {sorted(_ROLES)}, got {json.dumps(role)[:40]}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"{where}.content[{j}]", "must be a text part {\"type\": \"text\", \"text\": ...}")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise _bad(f"{where}.content", f"must be a string or an array of text parts, got {_json_type(content)}")
        msg = {"role": _ROLES[role], "content": content}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise _bad(f"{where}.name", "must be a string")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _prompt(v, vocab_size: int):
    """A completion prompt: text, or token ids (a single prompt only: n prompts would need n generations)."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        bad = next((t for t in v if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise _bad("prompt", f"holds token id {bad}, outside this model's vocabulary [0, {vocab_size})")
        return list(v)
    raise _bad("prompt", "must be a string, an array of one string, or a non-empty array of token ids")


# --- responses -----------------------------------------------------------------------------------------
def _usage(prompt_len: int, f: Finished) -> dict:
    s = f.stats
    return {"prompt_tokens": prompt_len, "completion_tokens": s.gen_tokens, "total_tokens": prompt_len + s.gen_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


def _timings(f: Finished) -> dict:
    """Measured in this request, named as llama.cpp's server names them (cache_n = reused prefix)."""
    s = f.stats
    decode_s = max(0.0, s.ttft_s - s.prompt_s) + s.gen_s
    return {"cache_n": s.cached_tokens, "prompt_n": s.prompt_tokens, "prompt_ms": 1e3 * s.prompt_s,
            "prompt_per_second": s.prompt_tps, "predicted_n": s.gen_tokens, "predicted_ms": 1e3 * decode_s,
            "predicted_per_second": s.gen_tokens / decode_s if decode_s else 0.0,
            "ttft_ms": 1e3 * s.ttft_s, "queued_ms": 1e3 * f.queued_s}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _JobStream(StreamingResponse):
    """A streaming response that cancels its job however it ends: finished, client gone, or never started."""

    def __init__(self, content, engine: Engine, job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._engine, self._job = engine, job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._engine.cancel(self._job)


@dataclass
class _Call:
    """One accepted request on its way through the engine."""
    kind: str                        # "chat" | "completion"
    options: Options
    prompt_len: int
    job: object
    events: asyncio.Queue
    id: str
    created: int


class _Api:
    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings

    # --- plumbing --------------------------------------------------------------------------------------
    def route(self, handler, *, auth: bool = True):
        async def endpoint(request: Request):
            try:
                self._check_host(request)
                if auth:
                    self._authorize(request)
                return await handler(request)
            except ApiError as e:
                return e.response()
            except Exception:
                log.exception("request failed: %s %s", request.method, request.url.path)
                return ApiError(500, "internal server error", type="server_error").response()
        return endpoint

    def _check_host(self, request: Request) -> None:
        allowed = self.settings.allowed_hosts
        if allowed is None:
            return
        host = request.headers.get("host", "")
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if name.lower() not in allowed:
            raise ApiError(403, f"Host {host!r} is not allowed: a loopback server answers only to "
                           f"{', '.join(allowed)} (so a web page cannot reach it by DNS rebinding)",
                           code="host_not_allowed")

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "incorrect or missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _ready(self) -> Engine:
        if self.engine.state != "ready":
            raise _not_ready(self.engine)
        return self.engine

    # --- routes ----------------------------------------------------------------------------------------
    async def health(self, request: Request):
        s = self.engine.status()
        status = {"ready": "ok"}.get(s["state"], s["state"])
        return JSONResponse({"status": status, **{k: v for k, v in s.items() if k != "state"}},
                            status_code=200 if status == "ok" else 503)

    async def models(self, request: Request):
        engine = self._ready()
        return JSONResponse({"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": int(engine.model.folder.path.stat().st_mtime),
             "owned_by": "flashlm", "context_length": engine.ctx_len}]})

    async def chat(self, request: Request):
        body = await _read_json(request, self.settings.max_body_bytes)
        options = _options(body, _CHAT_FIELDS, self.settings)
        messages = _messages(body.get("messages"))
        engine = self._ready()

        def encode():
            try:
                return engine.tokenizer.encode_chat(messages)
            except (ChatTemplateError, TypeError) as e:
                raise ApiError(400, f"the chat template refused the messages: {e}", param="messages") from None
        ids = await run_in_threadpool(encode)
        return await self._generate(request, "chat", options, ids, "messages")

    async def completions(self, request: Request):
        body = await _read_json(request, self.settings.max_body_bytes)
        options = _options(body, _COMPLETION_FIELDS, self.settings)
        if "prompt" not in body:
            raise ApiError(400, "you must provide a prompt parameter", param="prompt")
        engine = self._ready()
        prompt = _prompt(body["prompt"], engine.model.config.vocab_size)
        ids = prompt if isinstance(prompt, list) else await run_in_threadpool(engine.tokenizer.encode, prompt)
        return await self._generate(request, "completion", options, ids, "prompt")

    # --- generation ------------------------------------------------------------------------------------
    async def _generate(self, request: Request, kind: str, options: Options, ids: list[int], param: str):
        engine = self.engine
        ctx = engine.ctx_len
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        room = ctx - len(ids)
        if room < 1:
            raise ApiError(400, f"this model's context length is {ctx} tokens and the prompt has {len(ids)}, "
                           f"leaving no room for a reply (serve --ctx sets the context length)",
                           param=param, code="context_length_exceeded")
        try:                         # the checks of runtime/sampling.py, where it has them, apply on top of ours
            params = SamplingParams.from_generation_config(engine.generation_config, **options.sampling)
        except ValueError as e:
            raise ApiError(400, f"sampling parameters: {e}") from None
        gen = GenerationRequest(list(ids), params, min(options.max_tokens or room, room), options.stop)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            job = engine.submit(gen, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            raise _busy(e) from None
        except NotReady:
            raise _not_ready(engine) from None
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        call = _Call(kind, options, len(ids), job, events, prefix + uuid.uuid4().hex[:24], int(time.time()))
        if options.stream:
            return _JobStream(self._stream(call), engine, job)
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, job))
        try:
            return await self._collect(call)
        finally:
            watcher.cancel()
            engine.cancel(job)

    async def _cancel_on_disconnect(self, request: Request, job) -> None:
        # The body is read: the next ASGI message is the client going away (or the response completing).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(job)

    def _failure(self, ev: Failed) -> ApiError:
        if isinstance(ev.error, NotReady):
            return ApiError(503, str(ev.error), type="server_error", code="model_unavailable")
        return ApiError(500, f"generation failed: {ev.error}", type="server_error")

    async def _collect(self, call: _Call) -> JSONResponse:
        pieces = []
        while True:
            ev = await call.events.get()
            if isinstance(ev, Piece):
                pieces.append(ev.text)
            elif isinstance(ev, Failed):
                raise self._failure(ev)
            else:
                break
        text = "".join(pieces)
        if call.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": ev.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": ev.finish_reason}
        return JSONResponse({"id": call.id, "object": "chat.completion" if call.kind == "chat" else "text_completion",
                             "created": call.created, "model": self.engine.name, "choices": [choice],
                             "usage": _usage(call.prompt_len, ev), "timings": _timings(ev)})

    async def _stream(self, call: _Call):
        chat = call.kind == "chat"
        head = {"id": call.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": call.created, "model": self.engine.name}
        usage_null = {"usage": None} if call.options.include_usage else {}

        def chunk(content: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": content} if content is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
            return _sse({**head, "choices": [choice], **usage_null})

        if chat:
            yield chunk("", None, role=True)
        while True:
            ev = await call.events.get()
            if isinstance(ev, Piece):
                yield chunk(ev.text, None)
            elif isinstance(ev, Failed):
                yield _sse(self._failure(ev).body())
                break
            else:
                yield chunk(None, ev.finish_reason)
                if call.options.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(call.prompt_len, ev), "timings": _timings(ev)})
                break
        yield "data: [DONE]\n\n"


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own 404 / 405 in OpenAI's error shape."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind,
                    headers=dict(exc.headers or {})).response()


def build_app(engine: Engine, settings: ServerSettings) -> Starlette:
    api = _Api(engine, settings)
    routes = [
        Route("/health", api.route(api.health, auth=False), methods=["GET"]),
        Route("/v1/models", api.route(api.models), methods=["GET"]),
        Route("/v1/chat/completions", api.route(api.chat), methods=["POST"]),
        Route("/v1/completions", api.route(api.completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one); OSError says why not (port taken, bad host)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=128)


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_shutdown):
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets=None):
        self._on_shutdown()          # cancel generations first, so open streams end instead of being waited for
        await super().shutdown(sockets=sockets)


class HttpServer:
    """The engine behind an HTTP listener. run() blocks until stop() or Ctrl-C, then releases the model."""

    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.sock = bind(settings.host, settings.port)
        self.host, self.port = self.sock.getsockname()[:2]
        if settings.allowed_hosts is None and ipaddress.ip_address(self.host).is_loopback:
            settings = dataclasses.replace(settings, allowed_hosts=("localhost", "127.0.0.1", "::1"))
            self.settings = settings
        config = uvicorn.Config(build_app(engine, settings), log_config=None, access_log=False, lifespan="off",
                                limit_concurrency=settings.max_connections, timeout_keep_alive=5,
                                timeout_graceful_shutdown=3)
        self._server = _Uvicorn(config, on_shutdown=lambda: engine.stop(timeout=0))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self, on_ready=None) -> None:
        """Serve while the engine loads the model in the background; a failed load stops the server and
        is raised here."""
        self.engine.start(on_ready=on_ready, on_failure=lambda e: self.stop())
        try:
            self._server.run(sockets=[self.sock])
        finally:
            self.engine.stop()
            self.sock.close()
        if self.engine.error is not None:
            raise self.engine.error

    def stop(self) -> None:
        """Ask run() to return (safe from any thread)."""
        self._server.should_exit = True
