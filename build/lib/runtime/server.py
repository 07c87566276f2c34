"""The OpenAI-compatible HTTP API behind `vault serve`.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}`` and ``POST /v1/chat/completions``
(non-streaming, and streaming as server-sent events). The request's ``model`` field picks
an adapter by its vault name, or the base model by its name for no adapter.

Design, in the order a request meets it:

- stdlib ``ThreadingHTTPServer``: one thread per connection, capped (``max_connections``);
  every socket has a timeout so a slow or silent client cannot hold a thread forever.
- A bearer token on every request, compared in constant time (``hmac.compare_digest``).
- The body is read with a hard size limit, parsed as JSON and checked against a strict
  schema (limits on message count, content length and ``max_tokens``).
- One llama.cpp context serves one request at a time, so a single worker thread owns the
  engine. Handlers put jobs on a bounded queue (503 + ``Retry-After`` when it is full) and
  read the worker's output back through a per-job queue: the worker never blocks on a slow
  client, and a client that goes away cancels its job between tokens.
- Every generation goes through :func:`runtime.chat.respond`, so the guard screens every
  prompt and output; a blocked prompt is an ordinary completion whose content is the
  runtime's refusal and whose ``finish_reason`` is ``"content_filter"``.
- :meth:`ChatServer.stop` is graceful: it stops accepting, lets in-flight and queued
  requests finish (up to a drain timeout), then stops the worker.

Nothing here prints: each finished request is reported through ``on_request`` with its
method, path, status and latency only; prompt text never leaves the worker.
"""

from __future__ import annotations

import contextlib
import hmac
import http.server
import itertools
import json
import queue
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from vault.errors import EngineError, LicenceError, UsageError, VaultError

__all__ = [
    "ServerLimits",
    "ChatServer",
    "RequestLog",
    "Respond",
    "TOKEN_KEY",
    "serve_token",
    "LOOPBACK_HOSTS",
    "check_bind_host",
]

TOKEN_KEY = "serve-token"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

# on_request(method, path, status, latency_seconds)
RequestLog = Callable[[str, str, int, float], None]
# respond(messages, *, adapter, max_tokens, temperature, top_p, seed) -> iterator of chat chunks
Respond = Callable[..., Iterator[Any]]

_ROLES = frozenset({"system", "user", "assistant"})
# Accepted and deliberately ignored: they do not change what a single local context does.
_IGNORED_FIELDS = frozenset({"user", "n", "stream_options", "max_completion_tokens"})
_KNOWN_FIELDS = frozenset({"model", "messages", "stream", "max_tokens", "temperature", "top_p", "seed"}) | _IGNORED_FIELDS


@dataclass(frozen=True)
class ServerLimits:
    """Hard limits on what one client may ask of the server."""

    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_content_chars: int = 32_000  # per message
    max_total_chars: int = 64_000  # whole conversation
    max_tokens_cap: int = 512
    default_max_tokens: int = 256
    queue_size: int = 16
    max_connections: int = 32
    socket_timeout: float = 30.0  # per recv/send on a client socket
    header_timeout: float = 30.0  # request line + headers in all (slowloris), and keep-alive idle time
    request_timeout: float = 600.0  # waiting for the worker, per request
    drain_timeout: float = 60.0  # graceful shutdown: in-flight requests get this long

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_messages", "max_content_chars", "max_total_chars",
                     "max_tokens_cap", "default_max_tokens", "queue_size", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.default_max_tokens > self.max_tokens_cap:
            object.__setattr__(self, "default_max_tokens", self.max_tokens_cap)


def serve_token(keys: Any, *, rotate: bool = False) -> str:
    """The API bearer token: read from the keyring, generated once (or anew with ``rotate``).

    Args:
        keys: the vault's KeyStore (``get(name) -> str | None``, ``set(name, value)``).
        rotate: replace any existing token with a fresh one.
    Returns:
        The token, 43 url-safe characters (256 bits).
    """
    token = None if rotate else keys.get(TOKEN_KEY)
    if not token:
        token = secrets.token_urlsafe(32)
        keys.set(TOKEN_KEY, token)
    return token


def check_bind_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback bind address unless the owner explicitly allowed it."""
    if host not in LOOPBACK_HOSTS and not allow_remote:
        raise UsageError(
            f"refusing to listen on {host}: only loopback (127.0.0.1) is allowed without --allow-remote"
        )


# --------------------------------------------------------------------------- errors


class _HTTPError(Exception):
    """An OpenAI-style error response: status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> _HTTPError:
    return _HTTPError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- request schema


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    stream: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    include_usage: bool


def _message_content(content: Any, index: int) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    param = f"messages.[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad("only text content parts are supported", param)
            texts.append(part["text"])
        return "".join(texts)
    raise _bad("content must be a string or a list of text parts", param, "invalid_type")


def _parse_messages(raw: Any, limits: ServerLimits) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise _bad("messages must be a non-empty array", "messages", "invalid_type")
    if len(raw) > limits.max_messages:
        raise _bad(f"too many messages: at most {limits.max_messages} are allowed", "messages", "too_many_messages")
    messages, total = [], 0
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _bad("each message must be an object", f"messages.[{i}]", "invalid_type")
        role = item.get("role")
        if role == "developer":  # the newer OpenAI name for a system message
            role = "system"
        if role not in _ROLES:
            raise _bad("role must be one of system, user, assistant", f"messages.[{i}].role")
        content = _message_content(item.get("content"), i)
        if len(content) > limits.max_content_chars:
            raise _bad(f"message too long: at most {limits.max_content_chars} characters",
                       f"messages.[{i}].content", "content_too_long")
        total += len(content)
        messages.append({"role": role, "content": content})
    if total > limits.max_total_chars:
        raise _bad(f"conversation too long: at most {limits.max_total_chars} characters in all",
                   "messages", "content_too_long")
    if messages[-1]["role"] != "user":
        raise _bad("the last message must be from the user", "messages")
    return messages


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_chat_request(body: Any, limits: ServerLimits) -> ChatRequest:
    """Validate a decoded JSON body against the subset of the OpenAI schema we implement."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    unknown = sorted(set(body) - _KNOWN_FIELDS)
    if unknown:
        raise _bad(f"unsupported parameter: {unknown[0]}", unknown[0], "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model must be a non-empty string", "model", "invalid_type")
    messages = _parse_messages(body.get("messages"), limits)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream", "invalid_type")
    max_tokens = _parse_max_tokens(body, limits)
    temperature = body.get("temperature", 0.7)
    if temperature is None:
        temperature = 0.7
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise _bad("temperature must be a number between 0 and 2", "temperature")
    top_p = body.get("top_p", 0.95)
    if top_p is None:
        top_p = 0.95
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise _bad("top_p must be a number in (0, 1]", "top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
        raise _bad("seed must be an integer in [0, 2**32)", "seed")
    n = body.get("n", 1)
    if n not in (None, 1) or isinstance(n, bool):
        raise _bad("only n=1 is supported", "n")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("user must be a string", "user", "invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not stream:
            raise _bad("stream_options is only {include_usage} and needs stream=true", "stream_options")
        include_usage = bool(options.get("include_usage", False))
    return ChatRequest(model, messages, stream, max_tokens, float(temperature), float(top_p), seed, include_usage)


def _parse_max_tokens(body: dict[str, Any], limits: ServerLimits) -> int:
    values = [(k, body[k]) for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    if not values:
        return limits.default_max_tokens
    if len(values) == 2 and values[0][1] != values[1][1]:
        raise _bad("max_tokens and max_completion_tokens disagree", "max_tokens")
    name, value = values[0]
    if not _is_int(value) or value < 1:
        raise _bad(f"{name} must be a positive integer", name)
    if value > limits.max_tokens_cap:
        raise _bad(f"{name} is too large: this server allows at most {limits.max_tokens_cap}", name,
                   "max_tokens_exceeded")
    return value


# --------------------------------------------------------------------------- the worker


_POLL = 0.25  # seconds between checks that a waiting client is still connected


@dataclass
class _Job:
    request: ChatRequest
    adapter: str | None
    events: "queue.SimpleQueue[tuple[str, Any]]" = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))


class _Worker(threading.Thread):
    """The one thread that owns the llama.cpp context; runs queued jobs in order.

    Events put on ``job.events``: ("delta", text), ("replace", text) when the guard withdrew this
    turn's text, then exactly one of ("done", (finish_reason, usage)) or ("error", _HTTPError).
    """

    def __init__(self, respond: Respond, queue_size: int) -> None:
        super().__init__(name="vault-serve-worker", daemon=True)
        self._respond = respond
        self.jobs: "queue.Queue[_Job]" = queue.Queue(maxsize=queue_size)
        self.stopping = threading.Event()  # set by stop(): exit once the queue is empty

    def run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=_POLL)
            except queue.Empty:
                if self.stopping.is_set():
                    return
                continue
            if not job.cancelled.is_set():
                self._run(job)

    def _run(self, job: _Job) -> None:
        req = job.request
        finish, usage = "stop", None
        stream = None
        try:
            stream = self._respond(req.messages, adapter=job.adapter, max_tokens=req.max_tokens,
                                   temperature=req.temperature, top_p=req.top_p, seed=req.seed)
            for chunk in stream:
                if job.cancelled.is_set():
                    break
                text = getattr(chunk, "text", "") or ""
                if getattr(chunk, "replace", False):
                    job.events.put(("replace", text))
                elif text:
                    job.events.put(("delta", text))
                finish = getattr(chunk, "finish_reason", None) or finish
                usage = _usage(getattr(chunk, "usage", None) or chunk) or usage
        except EngineError as exc:
            # e.g. the conversation does not fit the context window: the request's fault
            job.events.put(("error", _HTTPError(400, exc.message, code="engine_refused")))
            return
        except LicenceError as exc:  # the adapter's licence expired (or forbids serving) while we run
            job.events.put(("error", _HTTPError(403, exc.message, type_="permission_error", code="licence")))
            return
        except VaultError as exc:  # e.g. GuardError: fail closed, say why
            job.events.put(("error", _HTTPError(500, exc.message, type_="server_error", code="generation_failed")))
            return
        except Exception as exc:  # noqa: BLE001 - the worker must survive any one bad generation
            job.events.put(("error", _HTTPError(500, f"internal error: {type(exc).__name__}",
                                                type_="server_error", code="generation_failed")))
            return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        job.events.put(("done", (finish, usage)))


# --------------------------------------------------------------------------- HTTP


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: "ChatServer"

    def process_request(self, request: Any, client_address: Any) -> None:
        # Cap concurrent connections: past the cap, close at once instead of spawning a thread.
        if not self.app._connections.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.app._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app._connections.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a broken client connection is not ours to print; the request log records statuses


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "vault"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.app.limits.socket_timeout
        super().setup()

    def handle_one_request(self) -> None:
        # The per-recv timeout does not bound a client that drips header bytes; the watchdog does.
        self.server.app._watch(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.app._unwatch(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # no printing from library code; see ChatServer.on_request

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    # -- plumbing

    def _dispatch(self, method: str) -> None:
        app = self.server.app
        app._unwatch(self.connection)  # headers are in; the body and the response have their own limits
        start = time.monotonic()
        path = self.path.split("?", 1)[0]
        self._status = 0
        self._body_read = False
        with app._track():
            try:
                if app._draining.is_set():
                    self.close_connection = True
                    raise _HTTPError(503, "the server is shutting down", type_="server_error",
                                     code="shutting_down")
                self._authenticate()
                app._route(self, method, path)
            except _HTTPError as exc:
                if not self._body_read and (self.headers.get("Content-Length", "0").strip() != "0"
                                            or self.headers.get("Transfer-Encoding")):
                    self.close_connection = True  # unread body bytes must not parse as the next request
                self._send_error(exc)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                self.close_connection = True
                self._status = self._status or 499
        app._log(method, _printable(path), self._status, time.monotonic() - start)

    def _authenticate(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        expected = self.server.app._token
        # compare_digest on equal-type bytes: time does not depend on where they differ
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            self.close_connection = True  # no keep-alive for strangers: they cannot sit on connection slots
            raise _HTTPError(401, "missing or invalid bearer token; see `vault serve --show-token`",
                             type_="authentication_error", code="invalid_api_key",
                             headers={"WWW-Authenticate": 'Bearer realm="vault"'})

    def read_json(self) -> Any:
        limits = self.server.app.limits
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _HTTPError(411, "chunked request bodies are not supported; send Content-Length",
                             code="length_required")
        raw_length = self.headers.get("Content-Length")
        raw_length = (raw_length or "").strip()
        if not (raw_length.isascii() and raw_length.isdigit()):
            self.close_connection = True
            raise _HTTPError(411, "a Content-Length header is required", code="length_required")
        length = int(raw_length) if len(raw_length) <= 20 else limits.max_body_bytes + 1
        if length > limits.max_body_bytes:
            self.close_connection = True
            raise _HTTPError(413, f"request body too large: at most {limits.max_body_bytes} bytes",
                             code="request_too_large")
        body = self._read_exactly(length)
        self._body_read = True
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise _HTTPError(400, "the request body is not valid JSON", code="invalid_json") from None

    def _read_exactly(self, length: int) -> bytes:
        # Each recv has the socket timeout; the whole body also has a deadline, so a client
        # dripping one byte per timeout period cannot hold the thread indefinitely.
        deadline = time.monotonic() + self.server.app.limits.socket_timeout * 2
        parts, remaining = [], length
        while remaining:
            if time.monotonic() > deadline:
                raise socket.timeout("request body too slow")
            data = self.rfile.read1(min(remaining, 65536))
            if not data:
                self.close_connection = True
                raise _HTTPError(400, "the request body ended early", code="incomplete_body")
            parts.append(data)
            remaining -= len(data)
        return b"".join(parts)

    def client_gone(self) -> bool:
        """True if the peer closed or reset the connection (readable with EOF, or an error)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def send_json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, exc: _HTTPError) -> None:
        try:
            self.send_json(exc.status, exc.body(), exc.headers)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True

    # -- server-sent events over chunked transfer encoding, so keep-alive still works

    def start_events(self) -> None:
        self._status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_event(self, payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        self._write_chunk(f"data: {data}\n\n".encode())

    def end_events(self) -> None:
        self.send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


# --------------------------------------------------------------------------- the application


class ChatServer:
    """An OpenAI-compatible chat API over one engine.

    Args:
        respond: ``respond(messages, *, adapter, max_tokens, temperature)`` returning an iterator of
            chunks with ``text`` and ``finish_reason`` (``"stop"``, ``"length"`` or
            ``"content_filter"``), and optionally token counts (``prompt_tokens`` and
            ``completion_tokens``, or a ``usage`` holding them); in production
            ``functools.partial(runtime.chat.respond, engine, guard)``. It is only ever called
            from the one worker thread.
        base_name: the model id that means "no adapter".
        adapters: adapter names that requests may select.
        token: the bearer token clients must present.
        host, port: where to listen; port 0 picks a free port (see :attr:`port`).
        limits: request limits.
        on_request: called once per finished request with (method, path, status, seconds).
    """

    def __init__(self, respond: Respond, *, base_name: str, adapters: Sequence[str], token: str,
                 host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None,
                 on_request: RequestLog | None = None) -> None:
        if not token:
            raise ValueError("a bearer token is required")
        if base_name in adapters:
            raise ValueError(f"adapter name {base_name!r} collides with the base model name")
        self.limits = limits or ServerLimits()
        self.base_name = base_name
        self.adapters = tuple(adapters)
        self._token = token.encode()
        self._on_request = on_request
        self._created = int(time.time())
        self._worker = _Worker(respond, self.limits.queue_size)
        self._connections = threading.BoundedSemaphore(self.limits.max_connections)
        self._draining = threading.Event()
        self._inflight = 0
        self._idle = threading.Condition()
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        self._httpd = server_class((host, port), _Handler)
        self._httpd.app = self
        self._serve_thread: threading.Thread | None = None
        self._header_deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        self._watchdog = threading.Thread(target=self._watchdog_loop, name="vault-serve-watchdog", daemon=True)

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> None:
        """Start the worker and the accept loop in background threads; returns at once."""
        self._worker.start()
        self._serve_thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                              name="vault-serve-accept", daemon=True)
        self._serve_thread.start()
        self._watchdog.start()

    def stop(self, drain_timeout: float | None = None) -> bool:
        """Stop gracefully: refuse new requests, finish in-flight ones, stop the worker.

        Returns:
            True if every in-flight request finished within the drain timeout.
        """
        timeout = self.limits.drain_timeout if drain_timeout is None else drain_timeout
        self._draining.set()
        if self._serve_thread is not None:
            self._httpd.shutdown()  # the accept loop ends; no new connections are taken
        self._httpd.server_close()
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
            drained = self._inflight == 0
        if not drained:
            self._cancel_queued()
        self._worker.stopping.set()
        if self._worker.is_alive():
            self._worker.join(timeout=max(1.0, deadline - time.monotonic()))
        return drained

    def _cancel_queued(self) -> None:
        while True:
            try:
                job = self._worker.jobs.get_nowait()
            except queue.Empty:
                return
            job.cancelled.set()
            job.events.put(("error", _HTTPError(503, "the server is shutting down", type_="server_error",
                                                code="shutting_down")))

    # -- bookkeeping

    def _watch(self, conn: socket.socket) -> None:
        with self._deadlines_lock:
            self._header_deadlines[conn] = time.monotonic() + self.limits.header_timeout

    def _unwatch(self, conn: socket.socket) -> None:
        with self._deadlines_lock:
            self._header_deadlines.pop(conn, None)

    def _watchdog_loop(self) -> None:
        """Cut connections whose request line and headers did not arrive within header_timeout."""
        while not self._worker.stopping.wait(_POLL):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [conn for conn, deadline in self._header_deadlines.items() if deadline < now]
                for conn in late:
                    del self._header_deadlines[conn]
            for conn in late:
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # the blocked recv returns; the handler thread ends
                except OSError:
                    pass

    @contextlib.contextmanager
    def _track(self) -> Iterator[None]:
        """Count a request as in flight, so stop() can wait for it to finish."""
        with self._idle:
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _log(self, method: str, path: str, status: int, seconds: float) -> None:
        if self._on_request is not None:
            self._on_request(method, path, status, seconds)

    # -- routes

    def _route(self, h: _Handler, method: str, path: str) -> None:
        if path == "/v1/chat/completions":
            self._allow(method, ("POST",))
            self._chat(h)
        elif path == "/v1/models":
            self._allow(method, ("GET", "HEAD"))
            h.send_json(200, {"object": "list", "data": [self._model_card(m) for m in self._model_ids()]})
        elif path.startswith("/v1/models/"):
            self._allow(method, ("GET", "HEAD"))
            model = path[len("/v1/models/"):]
            if model not in self._model_ids():
                raise self._unknown_model(model)
            h.send_json(200, self._model_card(model))
        else:
            raise _HTTPError(404, f"no such endpoint: {path[:100]}", code="not_found")

    @staticmethod
    def _allow(method: str, allowed: tuple[str, ...]) -> None:
        if method not in allowed:
            raise _HTTPError(405, f"method {method} not allowed here", code="method_not_allowed",
                             headers={"Allow": ", ".join(allowed)})

    def _model_ids(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def _model_card(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": self._created, "owned_by": "vault"}

    @staticmethod
    def _unknown_model(model: str) -> _HTTPError:
        return _HTTPError(404, f"the model {model[:100]!r} does not exist; GET /v1/models lists them",
                          param="model", code="model_not_found")

    def _chat(self, h: _Handler) -> None:
        req = parse_chat_request(h.read_json(), self.limits)
        if req.model not in self._model_ids():
            raise self._unknown_model(req.model)
        job = _Job(req, None if req.model == self.base_name else req.model)
        try:
            self._worker.jobs.put_nowait(job)
        except queue.Full:
            raise _HTTPError(503, "the server is busy; retry shortly", type_="server_error",
                             code="queue_full", headers={"Retry-After": "1"}) from None
        try:
            if req.stream:
                self._stream(h, job)
            else:
                self._complete(h, job)
        finally:
            job.cancelled.set()  # no-op when finished; stops generation if the client went away

    def _events(self, h: _Handler, job: _Job) -> Iterator[tuple[str, Any]]:
        deadline = time.monotonic() + self.limits.request_timeout
        while True:
            try:
                kind, value = job.events.get(timeout=_POLL)
            except queue.Empty:
                if h.client_gone():
                    # stop generating for nobody; the worker checks this between chunks
                    job.cancelled.set()
                    raise ConnectionResetError("client went away") from None
                if time.monotonic() > deadline:
                    yield "error", _HTTPError(504, "timed out waiting for the model", type_="server_error",
                                              code="timeout")
                    return
                continue
            yield kind, value
            if kind in ("done", "error"):
                return

    def _complete(self, h: _Handler, job: _Job) -> None:
        parts: list[str] = []
        for kind, value in self._events(h, job):
            if kind == "delta":
                parts.append(value)
            elif kind == "replace":
                parts = [value]
            elif kind == "error":
                raise value
            else:
                finish, usage = value
                body = self._envelope("chat.completion", job)
                body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                    "logprobs": None, "finish_reason": finish}]
                body["usage"] = usage
                h.send_json(200, body)

    def _stream(self, h: _Handler, job: _Job) -> None:
        envelope = self._envelope("chat.completion.chunk", job)

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {**envelope, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        events = self._events(h, job)
        kind, value = next(events)
        if kind == "error":
            raise value  # nothing sent yet: a proper HTTP error status
        h.start_events()
        h.send_event(chunk({"role": "assistant", "content": ""}, None))
        for kind, value in itertools.chain([(kind, value)], events):
            if kind in ("delta", "replace"):
                # Text already streamed cannot be recalled; runtime.chat only releases text the guard
                # passed, so a late "replace" appends the refusal and the turn ends as content_filter.
                h.send_event(chunk({"content": value}, None))
            elif kind == "error":
                # Headers are gone already: report in-band the way OpenAI does, then end the stream.
                h.send_event(value.body())
            else:
                finish, usage = value
                h.send_event(chunk({}, finish))
                if job.request.include_usage:
                    h.send_event({**envelope, "choices": [], "usage": usage})
        h.end_events()

    def _envelope(self, obj: str, job: _Job) -> dict[str, Any]:
        return {"id": job.id, "object": obj, "created": job.created, "model": job.request.model,
                "system_fingerprint": None}


def _usage(usage: Any) -> dict[str, int] | None:
    """Token counts from a usage mapping or an object with ``prompt_tokens``/``completion_tokens``."""
    if usage is None:
        return None
    if isinstance(usage, Mapping):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    else:
        prompt, completion = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
    if prompt is None or completion is None:
        return None
    return {"prompt_tokens": int(prompt), "completion_tokens": int(completion),
            "total_tokens": int(prompt) + int(completion)}


def _printable(text: str, limit: int = 200) -> str:
    """A client-chosen path made safe for a terminal log line (no escape sequences, bounded)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])
