"""Server hardening: where it listens, what it refuses, concurrency and abandoned streams.

Proves (loopback addresses only, every loop bounded):

- the default bind is 127.0.0.1 (``ServerThread``, ``serve`` and the ``serve``
  CLI default); any other address needs an explicit ``--host`` and prints a
  warning that the model becomes reachable without authentication;
- request bodies above the limit get 413 (with or without Content-Length);
  a chunked body is refused while it streams in: the server reads at most
  the limit plus one body message, closes the connection (the sender is cut
  off) and answers the next request; ``max_tokens`` above the limit gets 400;
- malformed requests (bad JSON, wrong types, missing or out-of-range fields,
  unknown model, wrong method/path, 400 random JSON bodies from hypothesis)
  always get a 4xx with an OpenAI-style error body, never a 5xx;
- 8 concurrent clients each get exactly the answer a sequential seeded run
  of the same request gives;
- a client that disconnects mid-stream frees the engine: the next request is
  served and ``/health`` shows nothing queued.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from runtime_model import build_runtime_model  # noqa: E402

from moestream.engine import server as server_mod  # noqa: E402
from moestream.engine.api import Engine  # noqa: E402
from moestream.engine.server import DEFAULT_HOST, ServerThread  # noqa: E402

torch.set_num_threads(1)
MAX_BODY, MAX_TOKENS = 20_000, 64


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine.load(str(build_runtime_model(tmp_path_factory.mktemp("hardening"))), memory="1GB", ctx=256)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def srv(engine):
    s = ServerThread(engine, model_name="tiny", max_body_bytes=MAX_BODY, max_tokens_limit=MAX_TOKENS)
    yield s
    s.stop()


@pytest.fixture()
def http(srv):
    with httpx.Client(base_url=f"http://{srv.host}:{srv.port}", timeout=120) as c:
        yield c


def _is_openai_error(r: httpx.Response) -> bool:
    body = r.json()
    return isinstance(body.get("error"), dict) and isinstance(body["error"].get("message"), str)


# ------------------------------------------------------------------------------------ where it listens
def test_default_bind_is_loopback(engine) -> None:
    from moestream.engine.cli import build_parser

    assert DEFAULT_HOST == "127.0.0.1"
    args = build_parser().parse_args(["serve", "default"])
    assert args.host == "127.0.0.1"
    with ServerThread(engine) as s:
        assert s.sock.getsockname()[0] == "127.0.0.1"
        assert httpx.get(f"http://127.0.0.1:{s.port}/health", timeout=60).status_code == 200


def test_non_loopback_bind_warns(engine, monkeypatch, capsys) -> None:
    """`serve(host=...)` with a public address warns; nothing is really bound off loopback here."""
    bound: list[tuple[str, int]] = []

    class FakeServer:
        def run(self, sockets):
            return None

    def fake_bind(host, port):
        bound.append((host, port))
        return socket.socket()

    monkeypatch.setattr(server_mod, "bind_socket", fake_bind)
    monkeypatch.setattr(server_mod, "_uvicorn_server", lambda app, quiet: FakeServer())
    server_mod.serve(engine, host="0.0.0.0", port=8123, quiet=True)
    err = capsys.readouterr().err
    assert bound == [("0.0.0.0", 8123)]
    assert "warning:" in err and "reachable from other machines" in err and "no authentication" in err
    for host in ("127.0.0.1", "::1", "localhost"):
        server_mod.serve(engine, host=host, port=8123, quiet=True)
        assert "warning:" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------ limits
def test_body_limit_with_and_without_content_length(http) -> None:
    big = {"model": "tiny", "prompt": "x" * (MAX_BODY + 10), "max_tokens": 1}
    r = http.post("/v1/completions", json=big)
    assert r.status_code == 413 and _is_openai_error(r)

    def chunks():
        data = json.dumps(big).encode()
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and _is_openai_error(r)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-cased headers, body) read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        assert got, f"connection closed before a response: {data!r}"
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        got = sock.recv(65536)
        if not got:
            break
        body += got
    return int(lines[0].split()[1]), headers, body


def test_chunked_body_over_limit_is_refused_while_streaming(srv, http) -> None:
    """A chunked body (no Content-Length) 3,000x the limit: 413 as soon as the limit is crossed.

    The server stops reading (it closes the connection, so the sender is cut off long before the
    64 MiB are out) and has read at most the limit plus the one body message that crossed it.
    """
    chunk, total = 4096, 64 * 2**20
    stats = srv.app.state.body_limit
    rejected_before = stats.rejected
    sock = socket.create_connection((srv.host, srv.port), timeout=60)
    outcome: dict[str, object] = {"sent": 0}

    def send_body() -> None:
        piece = (b'{"model": "tiny", "prompt": "' + b"x" * chunk)[:chunk]
        framed = b"%x\r\n" % chunk + piece + b"\r\n"
        try:
            for _ in range(total // chunk):
                sock.sendall(framed)
                outcome["sent"] = int(outcome["sent"]) + chunk
                piece = b"x" * chunk
                framed = b"%x\r\n" % chunk + piece + b"\r\n"
            sock.sendall(b"0\r\n\r\n")
            outcome["finished"] = True
        except OSError as exc:  # the server closed the connection under us: expected
            outcome["error"] = exc

    try:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        status, headers, body = _read_response(sock)
        sender.join(timeout=60)
        assert not sender.is_alive()
    finally:
        sock.close()
    assert status == 413, (status, body)
    assert isinstance(json.loads(body)["error"]["message"], str)
    assert headers.get("connection") == "close"
    assert "finished" not in outcome and isinstance(outcome.get("error"), OSError), outcome  # cut off
    assert int(outcome["sent"]) < total
    assert stats.rejected == rejected_before + 1
    read, last = stats.last_rejected_read_bytes, stats.last_rejected_message_bytes
    assert MAX_BODY < read and read - last <= MAX_BODY  # it stopped at the first message over the limit
    assert read <= MAX_BODY + 512 * 1024  # one message is bounded by uvicorn's read buffer, not by the body
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_chunked_body_within_limit_is_served(srv, http) -> None:
    body = json.dumps({"model": "tiny", "prompt": "Hello " * 50, "max_tokens": 2}).encode()
    assert len(body) < MAX_BODY

    def chunks():
        for i in range(0, len(body), 64):
            yield body[i:i + 64]

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_max_tokens_limit(http) -> None:
    for body, path in [({"model": "tiny", "prompt": "hi", "max_tokens": MAX_TOKENS + 1}, "/v1/completions"),
                       ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                         "max_completion_tokens": 10_000}, "/v1/chat/completions")]:
        r = http.post(path, json=body)
        assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": MAX_TOKENS})
    assert r.status_code == 200


MALFORMED = [
    ("POST", "/v1/completions", b"{not json"),
    ("POST", "/v1/completions", b""),
    ("POST", "/v1/completions", b"[]"),
    ("POST", "/v1/completions", b'"a string"'),
    ("POST", "/v1/completions", json.dumps({"prompt": "hi"}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny"}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "other", "prompt": "hi"}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 0}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": "many"}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "temperature": -1}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "top_p": 0}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": ["a", "b"]}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": 12}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "n": 3}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "stop": [1, 2]}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "stop": ["a"] * 40}).encode()),
    ("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "seed": -5}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"model": "tiny", "messages": []}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "wizard",
                                                                               "content": "x"}]}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"model": "tiny", "messages": "hello"}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"content": "x"}]}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "user",
                                                                               "content": 5}]}).encode()),
    ("POST", "/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                 "max_tokens": -1}).encode()),
    ("GET", "/v1/chat/completions", b""),
    ("POST", "/v1/nothing", b"{}"),
    ("DELETE", "/v1/models", b""),
]


@pytest.mark.parametrize("method,path,body", MALFORMED)
def test_malformed_requests_are_4xx(http, method: str, path: str, body: bytes) -> None:
    r = http.request(method, path, content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert _is_openai_error(r), r.text


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
FIELDS = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["tiny", "other", 3, None]),
    "prompt": JSON, "messages": st.lists(st.fixed_dictionaries({}, optional={"role": JSON | st.sampled_from(
        ["user", "system", "assistant"]), "content": JSON}), max_size=3) | JSON,
    "max_tokens": st.integers(-3, 3) | JSON, "temperature": JSON, "top_p": JSON, "top_k": JSON, "seed": JSON,
    "stop": JSON, "stream": st.booleans() | JSON, "n": JSON, "stream_options": JSON,
    "repetition_penalty": JSON, "max_completion_tokens": st.integers(-3, 3) | JSON,
})


def test_random_bodies_never_5xx(http) -> None:
    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=FIELDS, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def case(body, path) -> None:
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3:
            body["max_tokens"] = 3  # keep accepted requests short
        r = http.post(path, json=body)
        assert r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code >= 400:
            assert _is_openai_error(r), r.text

    case()


# ------------------------------------------------------------------------------------ concurrency
def _request(i: int) -> tuple[str, dict]:
    if i % 2:
        return "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": f"Hello {i}"}],
                                        "max_tokens": 12, "temperature": 0.9, "seed": 100 + i}
    return "/v1/completions", {"model": "tiny", "prompt": f"The quick brown fox {i}", "max_tokens": 12,
                               "temperature": 0.9, "seed": 100 + i}


def _text(path: str, body: dict) -> str:
    return body["choices"][0]["message"]["content"] if "chat" in path else body["choices"][0]["text"]


def test_eight_concurrent_clients_get_independent_answers(srv, engine) -> None:
    expected = {}
    for i in range(8):  # sequential seeded runs straight on the engine
        path, body = _request(i)
        kw = dict(max_tokens=12, temperature=0.9, seed=100 + i)
        r = engine.chat(body["messages"], **kw) if "chat" in path else engine.generate(body["prompt"], **kw)
        expected[i] = r.text
    assert len(set(expected.values())) > 1
    barrier = threading.Barrier(8)

    def client(i: int) -> str:
        path, body = _request(i)
        with httpx.Client(base_url=f"http://{srv.host}:{srv.port}", timeout=300) as c:
            barrier.wait(timeout=60)
            r = c.post(path, json=body)
        assert r.status_code == 200, r.text
        return _text(path, r.json())

    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(range(8), pool.map(client, range(8))))
    assert got == expected


def test_disconnect_mid_stream_frees_the_slot(srv, engine, http) -> None:
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": MAX_TOKENS, "temperature": 0.9,
            "seed": 3, "stream": True}
    with httpx.Client(base_url=f"http://{srv.host}:{srv.port}", timeout=120) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = 0
            for line in r.iter_lines():
                lines += bool(line.startswith("data: "))
                if lines >= 2:
                    break
        # leaving both blocks closes the connection mid-stream
    deadline = time.monotonic() + 60
    while (engine.busy or http.get("/health").json()["queued_requests"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.busy and http.get("/health").json()["queued_requests"] == 0
    requests_before = engine.stats()["requests"]
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    last = engine.stats()
    assert last["requests"] == requests_before + 1
