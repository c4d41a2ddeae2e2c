"""``moestream serve``: an OpenAI-compatible HTTP API (FastAPI + uvicorn) for one engine.

Owns :func:`create_app` (routes ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` with SSE streaming in OpenAI chunk format ending
with ``data: [DONE]``, ``/health``), the request queue (ONE worker thread
runs every generation in arrival order, so concurrent clients each get the
answer they would get alone), OpenAI-style error bodies for every 4xx/5xx,
the body-size limit (:class:`BodyLimitMiddleware`, which also bounds chunked
bodies while they stream in) and the ``max_tokens`` limit, and :func:`serve` /
:class:`ServerThread` (bind first so "port in use" is a clear error; loopback
by default, a warning when bound elsewhere).

Knows nothing about model internals: it drives :class:`Engine`.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from moestream.convert.errors import MoestreamError
from moestream.engine.generate import ContextOverflowError, GenerationChunk
from moestream.engine.sampling import InvalidRequestError
from moestream.engine.tokenizer import ChatTemplateError

log = logging.getLogger("moestream.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS_LIMIT = 4096
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# ------------------------------------------------------------------------------------------- request models
class _Request(BaseModel):
    """Fields shared by both generation endpoints; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)


class CompletionRequest(_Request):
    """``POST /v1/completions`` body (``prompt`` is a string or a one-element list)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)


class ChatMessage(BaseModel):
    """One chat message (string content, or OpenAI text parts)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


# ------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error returned to the client as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


def _from_engine_error(exc: Exception) -> APIError:
    """Map engine errors to HTTP errors."""
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, (InvalidRequestError, ChatTemplateError)):
        return APIError(400, str(exc))
    from moestream.scheduler.loader import ExpertReadError

    if isinstance(exc, (MoestreamError, ExpertReadError)):  # model file unreadable: say so, no traceback text
        return APIError(500, str(exc), type_="server_error")
    log.exception("generation failed")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    """OpenAI message content (string or text parts) -> text.

    Raises:
        APIError: for non-text parts.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


# ------------------------------------------------------------------------------------------- the queue
_DONE = object()


class RequestQueue:
    """Runs every engine call on ONE worker thread, in arrival order.

    Streaming generations push chunks back to the event loop; if the client
    goes away, the worker stops at the next token and closes the stream, which
    frees the engine for the next request.
    """

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moestream-engine")
        self.waiting = 0

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker; return its result."""
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        finally:
            self.waiting -= 1

    async def stream(self, start: Callable[[], Iterator[GenerationChunk]]) -> AsyncIterator[GenerationChunk]:
        """Run ``start()`` on the worker and yield its chunks as they come.

        Raises:
            Exception: whatever ``start`` or the iteration raised.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                if cancel.is_set():  # the client left while this request was queued
                    return
                it = start()
                try:
                    for chunk in it:
                        put(chunk)
                        if cancel.is_set():
                            break
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()
            except BaseException as exc:  # handed to the event loop, re-raised there
                put(exc)
            finally:
                put(_DONE)

        self.waiting += 1
        future = loop.run_in_executor(self._pool, work)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.waiting -= 1
            cancel.set()
            if not future.done():
                # The worker notices `cancel` at its next token; no need to wait here.
                future.add_done_callback(lambda f: f.exception())

    def shutdown(self) -> None:
        """Stop accepting work (running work finishes)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------- body limit
@dataclass
class BodyLimitStats:
    """What :class:`BodyLimitMiddleware` refused (``app.state.body_limit``; for tests and ``/health``).

    Attributes:
        max_body_bytes: the limit.
        rejected: requests answered 413.
        last_rejected_read_bytes: body bytes read from the last refused request before answering
            (0 when its Content-Length alone was enough).
        last_rejected_message_bytes: size of the last ASGI body message read from it (the one that
            crossed the limit), so ``read - message <= max_body_bytes`` shows the read stopped at once.
    """

    max_body_bytes: int
    rejected: int = 0
    last_rejected_read_bytes: int = 0
    last_rejected_message_bytes: int = 0


class BodyLimitMiddleware:
    """ASGI middleware: request bodies larger than the limit get 413 without being read to the end.

    A ``Content-Length`` above the limit is refused before any body byte reaches the app (the
    connection stays open, so uvicorn discards the announced bytes and a client that writes its whole
    body before reading still gets the 413). Any other body (``Transfer-Encoding: chunked``, which
    has no announced end) is read message by message; the first message that crosses the limit ends
    the request with 413 and ``Connection: close``, so the server never holds more than the limit
    plus one message (bounded by uvicorn's read-buffer high-water mark) of it and stops reading.
    Bodies within the limit are handed to the app unchanged (buffered, as FastAPI reads them whole
    anyway).
    """

    def __init__(self, app: Any, stats: BodyLimitStats) -> None:
        """Args:
        app: the wrapped ASGI app.
        stats: the limit and the counters to update.
        """
        self.app = app
        self.stats = stats

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        limit = self.stats.max_body_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._refuse(send, read=0, message=0, close=False)
            return
        if length is None and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # HTTP/1.1: no body
            return
        messages: list[dict] = []
        read = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                messages.append(message)
                break
            size = len(message.get("body", b""))
            read += size
            if read > limit:
                await self._refuse(send, read=read, message=size, close=True)
                return
            messages.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Callable, *, read: int, message: int, close: bool) -> None:
        """Answer 413 (OpenAI-style body); ``close`` adds ``Connection: close`` so the rest is never read."""
        self.stats.rejected += 1
        self.stats.last_rejected_read_bytes = read
        self.stats.last_rejected_message_bytes = message
        body = APIError(413, f"request body larger than {self.stats.max_body_bytes} bytes").response().body
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


# ------------------------------------------------------------------------------------------- app
def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Any, *, model_name: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT) -> FastAPI:
    """Build the FastAPI app serving ``engine``.

    Args:
        engine: a loaded :class:`~moestream.engine.api.Engine`.
        model_name: the model id clients must send (default: ``engine.name``).
        max_body_bytes: larger request bodies get HTTP 413.
        max_tokens_limit: larger ``max_tokens`` get HTTP 400.

    Returns:
        The app (run it with uvicorn, or :func:`serve` / :class:`ServerThread`); ``app.state.body_limit``
        is its :class:`BodyLimitStats`.
    """
    name = model_name or engine.name
    created = int(time.time())
    queue = RequestQueue()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        queue.shutdown()

    app = FastAPI(title="moestream", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.queue = engine, queue

    app.state.body_limit = BodyLimitStats(max_body_bytes)
    app.add_middleware(BodyLimitMiddleware, stats=app.state.body_limit)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return APIError(400, f"invalid request: {loc or 'body'}: {first.get('msg', 'invalid value')}",
                        param=loc or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail),
                        type_="not_found_error" if exc.status_code == 404 else "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        return _from_engine_error(exc).response()

    def check(req: _Request, max_tokens: int | None) -> None:
        if req.model != name:
            raise APIError(404, f"model '{req.model}' is not served here; this server serves '{name}' "
                                f"(GET /v1/models)", param="model", code="model_not_found")
        if max_tokens is not None and max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}",
                           param="max_tokens")

    def kwargs(req: _Request, max_tokens: int | None) -> dict[str, Any]:
        return {"max_tokens": max_tokens if max_tokens is not None else max_tokens_limit,
                "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed,
                "stop": req.stop, "repetition_penalty": req.repetition_penalty}

    def usage(stats: Any) -> dict[str, int]:
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
                "total_tokens": stats.prompt_tokens + stats.generated_tokens}

    async def first_and_rest(start: Callable[[], Iterator[GenerationChunk]]) -> AsyncIterator[GenerationChunk]:
        """Start a stream and surface errors before the HTTP response begins."""
        agen = queue.stream(start)
        try:
            first = await agen.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            await agen.aclose()
            raise _from_engine_error(exc) if not isinstance(exc, APIError) else exc

        async def rest() -> AsyncIterator[GenerationChunk]:
            try:
                if first is not None:
                    yield first
                async for chunk in agen:
                    yield chunk
            finally:
                await agen.aclose()
        return rest()

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "moestream"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = engine.stats()
        experts = stats.get("experts") or {}
        return {"status": "ok", "model": name, "queued_requests": queue.waiting,
                "memory": {"rss_bytes": stats.get("rss_bytes"), "peak_rss_bytes": stats.get("peak_rss_bytes"),
                           "budget_bytes": stats.get("memory_budget_bytes"),
                           "kv_cache_bytes": stats.get("kv_cache_bytes")},
                "cache": {"hit_rate": experts.get("hit_rate"), **experts},
                "engine": stats}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        check(req, req.max_tokens)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "exactly one prompt per request is supported", param="prompt")
        prompt, kw = prompts[0], kwargs(req, req.max_tokens)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": name}
        if not req.stream:
            try:
                result = await queue.call(lambda: engine.generate(prompt, **kw))
            except Exception as exc:
                raise _from_engine_error(exc) from exc
            return {**base, "choices": [{"text": result.text, "index": 0, "logprobs": None,
                                         "finish_reason": result.finish_reason}], "usage": usage(result.stats)}
        chunks = await first_and_rest(lambda: engine.generate(prompt, stream=True, **kw))
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            async for c in chunks:
                if c.text or c.finish_reason:
                    yield _sse({**base, "choices": [{"text": c.text, "index": 0, "logprobs": None,
                                                     "finish_reason": c.finish_reason}]})
                if c.finish_reason and include_usage and c.stats is not None:
                    yield _sse({**base, "choices": [], "usage": usage(c.stats)})
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        max_tokens = req.max_completion_tokens or req.max_tokens
        check(req, max_tokens)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _content_text(m.content)}
                    for m in req.messages]
        kw = kwargs(req, max_tokens)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": now, "model": name}
        if not req.stream:
            try:
                result = await queue.call(lambda: engine.chat(messages, **kw))
            except Exception as exc:
                raise _from_engine_error(exc) from exc
            return {**base, "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                         "logprobs": None, "finish_reason": result.finish_reason}],
                    "usage": usage(result.stats)}
        chunks = await first_and_rest(lambda: engine.chat(messages, stream=True, **kw))
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        cbase = {**base, "object": "chat.completion.chunk"}

        async def events() -> AsyncIterator[str]:
            yield _sse({**cbase, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]})
            async for c in chunks:
                if c.text:
                    yield _sse({**cbase, "choices": [{"index": 0, "delta": {"content": c.text},
                                                      "logprobs": None, "finish_reason": None}]})
                if c.finish_reason:
                    yield _sse({**cbase, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                      "finish_reason": c.finish_reason}]})
                    if include_usage and c.stats is not None:
                        yield _sse({**cbase, "choices": [], "usage": usage(c.stats)})
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# ------------------------------------------------------------------------------------------- running
def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket (port 0 picks a free one).

    Raises:
        MoestreamError: when the port is in use or the address is not local.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MoestreamError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                             "pick another port with --port (or stop the program using it)") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: FastAPI, quiet: bool) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(engine: Any, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, quiet: bool = False,
          **app_kwargs: Any) -> None:
    """Serve ``engine`` until interrupted (Ctrl-C).

    Args:
        engine: a loaded engine.
        host: bind address (loopback by default; anything else prints a warning).
        port: TCP port.
        quiet: less logging.
        **app_kwargs: passed to :func:`create_app`.

    Raises:
        MoestreamError: the port is in use.
    """
    if host not in LOOPBACK:
        print(f"warning: serving on {host}:{port} makes the model reachable from other machines; "
              "there is no authentication", file=sys.stderr)
    sock = bind_socket(host, port)
    server = _uvicorn_server(create_app(engine, **app_kwargs), quiet)
    shown = f"[{host}]" if ":" in host else host
    print(f"moestream: serving '{app_kwargs.get('model_name') or engine.name}' on http://{shown}:{port}/v1 "
          "(Ctrl-C stops)", file=sys.stderr)
    server.run(sockets=[sock])


class ServerThread:
    """Run the server in a background thread (for apps and tests); always call :meth:`stop`.

    Example::

        with ServerThread(engine) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="none")
    """

    def __init__(self, engine: Any, *, host: str = DEFAULT_HOST, port: int = 0, **app_kwargs: Any) -> None:
        """Bind now (``port=0`` picks a free port) and start serving.

        Raises:
            MoestreamError: the port is in use.
            RuntimeError: the server did not start within 30 s.
        """
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.app = create_app(engine, **app_kwargs)
        self.server = _uvicorn_server(self.app, quiet=True)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="moestream-server")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the moestream server thread did not start")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        """Shut down and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` verb to the ``moestream`` parser."""
    from moestream.engine.cli import add_model_options

    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /health)",
        description="Serve MODEL over an OpenAI-compatible API. Requests are queued and run one at a time. "
                    f"Binds {DEFAULT_HOST} unless --host says otherwise (there is no authentication).")
    add_model_options(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST}; others warn)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--model-name", help="model id clients send (default: the model folder's name)")
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help=f"largest max_tokens a request may ask for (default {DEFAULT_MAX_TOKENS_LIMIT})")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body in bytes (default {DEFAULT_MAX_BODY_BYTES})")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """``moestream serve``: load, bind, serve until Ctrl-C.

    Returns:
        0 after a clean shutdown.
    """
    from moestream.engine.cli import load_engine

    if not 0 <= args.port <= 65535:
        raise MoestreamError(f"--port must be 0..65535, got {args.port}")
    # Fail on a busy port before spending time loading the model.
    bind_socket(args.host, args.port).close()
    engine = load_engine(args)
    try:
        serve(engine, host=args.host, port=args.port, quiet=args.quiet, model_name=args.model_name,
              max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit)
    finally:
        engine.close()
    return 0
