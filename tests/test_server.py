"""runtime/server.py: the OpenAI-compatible API, in-process, over the real llama.cpp engine.

The server runs in this process on an ephemeral loopback port with the embedded SmolLM2 model,
the real chat path (runtime.chat.respond) and the real ``openai`` client or raw ``http.client``.
The end-to-end `vault serve` subprocess (keyring, sealed adapter) is tests/test_serve_cli.py.
"""

from __future__ import annotations

import functools
import http.client
import json
import socket
import threading
import time
from typing import Any, Iterator, Sequence

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.guard.base import AuditReport, PassThroughGuard, Verdict
from runtime.server import ChatServer, ServerLimits, _HTTPError, check_bind_host, parse_chat_request, serve_token
from vault.errors import UsageError

TOKEN = "test-token-0123456789"
MARKER = "zebra-canary-prompt"


class MarkerGuard(PassThroughGuard):
    """A guard that blocks any conversation containing MARKER (the real guard is issue 4's)."""

    name = "marker"

    def screen_prompt(self, messages: Sequence[Any]) -> Verdict:
        if any(MARKER in str(m.get("content", "")) for m in messages):
            return Verdict(allowed=False, category="S1", score=1.0, reason="test marker")
        return Verdict(allowed=True)


@pytest.fixture(scope="module")
def engine():
    from runtime.engine import Engine
    from runtime.models import default_model

    eng = Engine(default_model(), n_ctx=1024, n_threads=1)  # 1 thread: the test machine is shared
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def respond(engine):
    from runtime.chat import respond as chat_respond

    return functools.partial(chat_respond, engine, MarkerGuard())


class Gate:
    """Wraps the real respond so a test decides when the worker may start generating."""

    def __init__(self, respond: Any) -> None:
        self._respond = respond
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, messages: Any, **kwargs: Any) -> Iterator[Any]:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(60), "test never released the gate"
        yield from self._respond(messages, **kwargs)


@pytest.fixture
def make_server():
    servers: list[ChatServer] = []

    def _make(respond: Any, **limits: Any) -> ChatServer:
        log: list[tuple[str, str, int, float]] = []
        server = ChatServer(respond, base_name="base", adapters=["alice"], token=TOKEN,
                            limits=ServerLimits(**limits), on_request=lambda *a: log.append(a))
        server.request_log = log  # type: ignore[attr-defined]
        server.start()
        servers.append(server)
        return server

    yield _make
    for server in servers:
        server.stop(drain_timeout=5)


def client(server: ChatServer, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=token, max_retries=0, timeout=60)


def raw(server: ChatServer, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    hdrs = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    hdrs.update(headers or {})
    hdrs = {k: v for k, v in hdrs.items() if v is not None}
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        payload = json.loads(data) if data else None
    except ValueError:
        payload = data
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload


def chat_body(**overrides: Any) -> bytes:
    body = {"model": "base", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    body.update(overrides)
    return json.dumps(body).encode()


# --------------------------------------------------------------------------- schema (pure)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values | st.just("base"),
        "messages": json_values | st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", 3]), "content": json_values}), max_size=3),
        "max_tokens": json_values | st.integers(-5, 600),
        "temperature": json_values | st.floats(-1, 3),
        "stream": json_values,
        "n": json_values,
        "stream_options": json_values,
        "bogus": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(body=json_values | request_like)
def test_any_json_is_a_valid_request_or_a_400(body: Any) -> None:
    limits = ServerLimits()
    try:
        req = parse_chat_request(body, limits)
    except _HTTPError as exc:
        assert exc.status == 400 and exc.body()["error"]["message"]
        return
    assert 1 <= req.max_tokens <= limits.max_tokens_cap
    assert req.messages and req.messages[-1]["role"] == "user"
    assert all(isinstance(m["content"], str) for m in req.messages)


def test_schema_limits_and_defaults() -> None:
    limits = ServerLimits(max_messages=3, max_content_chars=10, max_tokens_cap=8, default_max_tokens=100)
    ok = parse_chat_request({"model": "m", "messages": [
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}]}]}, limits)
    assert ok.max_tokens == 8  # the default never exceeds the cap
    assert ok.messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi!"}]
    cases = {
        "too_many_messages": {"messages": [{"role": "user", "content": "x"}] * 4},
        "content_too_long": {"messages": [{"role": "user", "content": "x" * 11}]},
        "max_tokens_exceeded": {"max_tokens": 9},
        "unsupported_parameter": {"tools": []},
    }
    for code, override in cases.items():
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **override}
        with pytest.raises(_HTTPError) as err:
            parse_chat_request(body, limits)
        assert (err.value.status, err.value.code) == (400, code)


def test_bind_host_and_token(keyring_env: dict[str, str]) -> None:
    check_bind_host("127.0.0.1", False)
    check_bind_host("::1", False)
    with pytest.raises(UsageError):
        check_bind_host("0.0.0.0", False)
    check_bind_host("0.0.0.0", True)

    from vault.keys import KeyStore

    keys = KeyStore("serve-test-0001")
    first = serve_token(keys)
    assert len(first) >= 43 and serve_token(keys) == first  # generated once, then read back
    assert keys.get("serve-token") == first
    rotated = serve_token(keys, rotate=True)
    assert rotated != first and serve_token(keys) == rotated
    keys.delete("serve-token")


# --------------------------------------------------------------------------- HTTP, real engine


@pytest.mark.slow
def test_openai_client_models_chat_and_stream(make_server, respond) -> None:
    server = make_server(respond)
    c = client(server)
    assert [m.id for m in c.models.list()] == ["base", "alice"]
    assert c.models.retrieve("alice").id == "alice"

    done = c.chat.completions.create(model="base", messages=[{"role": "user", "content": "Name a colour."}],
                                     max_tokens=6, temperature=0)
    assert done.object == "chat.completion" and done.model == "base"
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content.strip()
    assert done.choices[0].finish_reason in ("stop", "length")
    assert 0 < done.usage.completion_tokens <= 6 and done.usage.prompt_tokens > 0

    chunks = list(c.chat.completions.create(model="base", messages=[{"role": "user", "content": "Name a colour."}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == done.choices[0].message.content  # same seed, temperature 0: same answer either way
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == done.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == done.usage.completion_tokens


@pytest.mark.slow
def test_blocked_prompt_is_a_content_filter_completion(make_server, respond) -> None:
    c = client(make_server(respond))
    messages = [{"role": "user", "content": f"please {MARKER}"}]
    done = c.chat.completions.create(model="alice", messages=messages, max_tokens=8)
    assert done.choices[0].finish_reason == "content_filter"
    assert done.choices[0].message.content  # the runtime's refusal, not an HTTP error
    chunks = list(c.chat.completions.create(model="base", messages=messages, max_tokens=8, stream=True))
    assert chunks[-1].choices[0].finish_reason == "content_filter"


@pytest.mark.slow
def test_http_errors_are_openai_shaped(make_server, respond) -> None:
    server = make_server(respond, max_body_bytes=4096, max_messages=4, max_tokens_cap=16)
    cases = [
        # (method, path, body, headers, status, code)
        ("GET", "/v1/models", None, {"Authorization": None}, 401, "invalid_api_key"),
        ("GET", "/v1/models", None, {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
        ("GET", "/v1/models", None, {"Authorization": f"Basic {TOKEN}"}, 401, "invalid_api_key"),
        ("POST", "/v1/chat/completions", b"{not json", {}, 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b"\xff\xfe", {}, 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b"[1, 2]", {}, 400, "invalid_type"),
        ("POST", "/v1/chat/completions", chat_body(model="nobody"), {}, 404, "model_not_found"),
        ("POST", "/v1/chat/completions", chat_body(max_tokens=17), {}, 400, "max_tokens_exceeded"),
        ("POST", "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "x"}] * 5), {}, 400,
         "too_many_messages"),
        ("POST", "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "x" * 5000}]), {}, 413,
         "request_too_large"),
        ("POST", "/v1/chat/completions", chat_body(messages=[]), {}, 400, "invalid_type"),
        ("POST", "/v1/chat/completions", chat_body(tools=[]), {}, 400, "unsupported_parameter"),
        ("GET", "/v1/chat/completions", None, {}, 405, "method_not_allowed"),
        ("DELETE", "/v1/models", None, {}, 405, "method_not_allowed"),
        ("GET", "/v1/models/nobody", None, {}, 404, "model_not_found"),
        ("GET", "/admin", None, {}, 404, "not_found"),
    ]
    for method, path, body, headers, status, code in cases:
        got, hdrs, payload = raw(server, method, path, body, headers)
        assert (got, payload["error"]["code"]) == (status, code), (method, path, payload)
        assert set(payload["error"]) == {"message", "type", "param", "code"}
        if status == 401:
            assert hdrs["www-authenticate"].startswith("Bearer") and hdrs["connection"] == "close"
        if status == 405:
            assert "allow" in hdrs
    # the openai client maps them onto its exception classes
    with pytest.raises(openai.AuthenticationError):
        client(server, token="nope").models.list()
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nobody", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=100)
    # no prompt text reaches the request log; every request is in it with its status
    assert [entry[2] for entry in server.request_log][:len(cases)] == [case[4] for case in cases]
    assert not any("Say hello" in str(entry) for entry in server.request_log)


def test_missing_content_length_is_411(make_server, respond) -> None:
    server = make_server(respond)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        head = sock.recv(65536).decode()
    assert head.startswith("HTTP/1.1 411")


@pytest.mark.slow
def test_queue_full_is_503_with_retry_after(make_server, respond) -> None:
    gate = Gate(respond)
    server = make_server(gate, queue_size=1)
    results: list[Any] = []

    def ask() -> None:
        status, _, payload = raw(server, "POST", "/v1/chat/completions", chat_body())
        results.append((status, payload))

    first = threading.Thread(target=ask)
    first.start()
    assert gate.entered.wait(30)  # the worker holds job 1
    second = threading.Thread(target=ask)
    second.start()
    deadline = time.monotonic() + 10
    while server._worker.jobs.qsize() < 1 and time.monotonic() < deadline:  # job 2 waits in the queue
        time.sleep(0.01)
    status, headers, payload = raw(server, "POST", "/v1/chat/completions", chat_body())
    assert status == 503 and headers["retry-after"] == "1" and payload["error"]["code"] == "queue_full"
    gate.release.set()
    first.join(60)
    second.join(60)
    assert [r[0] for r in results] == [200, 200]


@pytest.mark.slow
def test_graceful_stop_finishes_inflight_and_refuses_new(respond) -> None:
    gate = Gate(respond)
    server = ChatServer(gate, base_name="base", adapters=[], token=TOKEN, limits=ServerLimits())
    server.start()
    chunks: list[Any] = []

    def stream() -> None:
        chunks.extend(client(server).chat.completions.create(
            model="base", messages=[{"role": "user", "content": "Count to three."}], max_tokens=8, stream=True))

    reader = threading.Thread(target=stream)
    reader.start()
    assert gate.entered.wait(30)
    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(server.stop(drain_timeout=60)))
    stopper.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # wait until the listening socket is closed
        try:
            socket.create_connection((server.host, server.port), timeout=1).close()
            time.sleep(0.05)
        except OSError:
            break
    else:
        pytest.fail("the server kept accepting connections while stopping")
    assert stopper.is_alive()  # still draining the in-flight request
    gate.release.set()
    reader.join(60)
    stopper.join(60)
    assert stopped == [True]
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert not server._worker.is_alive()


def test_silent_client_is_dropped_after_the_socket_timeout(make_server, respond) -> None:
    server = make_server(respond, socket_timeout=0.5)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")  # and then nothing
        start = time.monotonic()
        assert sock.recv(1024) == b""  # the server closed the connection
        assert time.monotonic() - start < 5
    assert raw(server, "GET", "/v1/models")[0] == 200


def test_slow_body_is_dropped(make_server, respond) -> None:
    server = make_server(respond, socket_timeout=0.5)
    body = chat_body()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
        start = time.monotonic()
        closed = False
        for byte in body:  # drip one byte every 0.3 s: each recv is in time, the whole body is not
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.3)
            if time.monotonic() - start > 5:
                break
        if not closed:
            sock.settimeout(5)
            try:
                closed = sock.recv(1024) in (b"",)
            except ConnectionResetError:
                closed = True
    assert closed and time.monotonic() - start < 5


def test_connection_cap(make_server, respond) -> None:
    server = make_server(respond, max_connections=2, socket_timeout=2)
    idle = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(2)]
    time.sleep(0.2)
    with socket.create_connection((server.host, server.port), timeout=10) as third:
        third.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert third.recv(1024) == b""  # closed without being served
        except ConnectionResetError:
            pass
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if raw(server, "GET", "/v1/models")[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            time.sleep(0.1)
    else:
        pytest.fail("the server did not recover after the idle connections closed")


@pytest.mark.slow
def test_client_that_goes_away_cancels_its_generation(make_server, respond) -> None:
    seen: list[int] = []
    finished, closed = threading.Event(), threading.Event()

    def watched(messages: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            for piece in respond(messages, **kwargs):
                seen.append(piece.completion_tokens)
                yield piece
            finished.set()  # ran to its natural end: the cancel did not work
        finally:
            closed.set()

    server = make_server(watched, max_tokens_cap=500)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    # at temperature 0 the embedded model writes this essay past 400 tokens (measured)
    prompt = "Write a very long essay about the history of Rome, with many sections."
    conn.request("POST", "/v1/chat/completions",
                 body=chat_body(stream=True, max_tokens=500, temperature=0,
                                messages=[{"role": "user", "content": prompt}]),
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.fp.readline().startswith(b"")  # headers are in: the worker is generating
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert closed.wait(30), "the generation was never closed"
    assert not finished.is_set() and seen and seen[-1] < 400, seen
    assert raw(server, "GET", "/v1/models")[0] == 200  # and the worker serves the next request


def test_request_log_cannot_carry_terminal_escapes(make_server, respond) -> None:
    server = make_server(respond)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/\x1b[2J\x07" + b"a" * 500 + b"?secret=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nConnection: close\r\n\r\n")
        assert sock.makefile("rb").read().startswith(b"HTTP/1.1 404 ")
    method, path, status, _ = server.request_log[-1]
    assert (method, status) == ("GET", 404)
    assert path.startswith("/v1/?[2J?a") and len(path) == 200 and "secret" not in path


@pytest.mark.slow
def test_prompt_longer_than_the_context_is_a_400(make_server, respond, engine) -> None:
    server = make_server(respond, max_content_chars=32_000)
    words = " ".join(f"word{i}" for i in range(3000))  # ~ 9000 tokens > n_ctx 1024
    status, _, payload = raw(server, "POST", "/v1/chat/completions",
                             chat_body(messages=[{"role": "user", "content": words}]))
    assert status == 400 and payload["error"]["code"] == "engine_refused"
    assert "does not fit" in payload["error"]["message"] and "word1" not in payload["error"]["message"]
    status, _, _ = raw(server, "POST", "/v1/chat/completions",
                       chat_body(stream=True, messages=[{"role": "user", "content": words}]))
    assert status == 400  # streaming too: the error comes before any event, as a real status


def test_unread_body_closes_the_connection(make_server, respond) -> None:
    server = make_server(respond)
    # a 405 with a body the server never reads: the leftover bytes must not become a second request
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        reply = sock.makefile("rb").read()  # until the server closes the connection
    assert reply.startswith(b"HTTP/1.1 405 ") and b"Connection: close" in reply and reply.count(b"HTTP/1.1") == 1
    assert [entry[:3] for entry in server.request_log] == [("POST", "/v1/models", 405)]


def test_dripping_headers_are_cut_off(make_server, respond) -> None:
    # each byte arrives well within the per-recv timeout; the request as a whole does not
    server = make_server(respond, socket_timeout=10, header_timeout=1)
    start = time.monotonic()
    closed = False
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        for byte in b"GET /v1/models HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
            except OSError:
                closed = True
                break
            if time.monotonic() - start > 8:
                break
        if not closed:
            try:
                closed = sock.recv(1024) == b""
            except OSError:
                closed = True
    assert closed and time.monotonic() - start < 5
    assert raw(server, "GET", "/v1/models")[0] == 200
