"""The REST server as an attacker or a sloppy client meets it: framing (chunked bodies, request smuggling,
bad Content-Length), limits (body, read timeout, connections, concurrent requests), malformed JSON
(deep nesting, lone surrogates), value checks (1e300 for float32, booleans in examples, extra columnar
keys), and a SIGTERM that arrives while a request is in flight."""
from __future__ import annotations

import base64
import json
import signal
import socket
import threading
import time

import numpy as np
import pytest

from serving.testing import make_example

from .helpers import raw_http, split_responses, start_server_process, stop_process

EX = make_example(39.0, 40.0, "Private")
BODY = json.dumps({"instances": [{"b64": base64.b64encode(EX).decode()}]}).encode()
PATH = "/v1/models/adult:predict"


def post(path, body: bytes, extra_headers=b"", close=True) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n".encode() + extra_headers
            + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body)


def chunked(body: bytes, pieces=2) -> bytes:
    step = max(1, len(body) // pieces)
    out = b""
    for i in range(0, len(body), step):
        part = body[i:i + step]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_templates):
    from serving import ModelServer

    from .helpers import push_version

    d = tmp_path_factory.mktemp("http")
    push_version(d, model_templates, "adult", 1, "a")
    s = ModelServer(str(d), 0, None, backend="builtin", poll_interval_s=0, log=lambda m: None,
                    max_body_bytes=16384, read_timeout_s=2.0)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def one(port, data):
    responses = split_responses(raw_http(port, data))
    assert len(responses) == 1, responses
    status, headers, body = responses[0]
    return status, headers, (json.loads(body) if body else None)


def test_chunked_body_is_a_body_not_a_second_request(server):
    port = server.rest_port
    head = f"POST {PATH} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    # keep-alive: a chunked predict, then a plain one on the same connection
    raw = raw_http(port, head + chunked(BODY, 3) + post(PATH, BODY))
    (s1, _, b1), (s2, _, b2) = split_responses(raw)
    assert s1 == s2 == 200
    assert json.loads(b1) == json.loads(b2) and len(json.loads(b1)["predictions"]) == 1
    # a request hidden in a chunked body is not executed: one response (the body is not JSON)
    smuggled = b"GET /v1/models/adult HTTP/1.1\r\nHost: t\r\n\r\n"
    raw = raw_http(port, f"POST {PATH} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                         "Connection: close\r\n\r\n".encode() + chunked(smuggled, 1))
    responses = split_responses(raw)
    assert [r[0] for r in responses] == [400]
    assert "JSON Parse error" in json.loads(responses[0][2])["error"]


@pytest.mark.parametrize("headers,needle", [
    (b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n", "both Content-Length and Transfer-Encoding"),
    (b"Transfer-Encoding: gzip\r\n", "Unsupported Transfer-Encoding"),
    (b"Content-Length: abc\r\n", "Content-Length must be a non-negative integer"),
    (b"Content-Length: -5\r\n", "Content-Length must be a non-negative integer"),
    (b"Content-Length: 5, 6\r\n", "Content-Length must be a non-negative integer"),
])
def test_ambiguous_framing_is_refused_and_the_connection_closed(server, headers, needle):
    data = f"POST {PATH} HTTP/1.1\r\nHost: t\r\n".encode() + headers + b"\r\n" + BODY
    status, h, body = one(server.rest_port, data)   # raw_http returns: the server closed the connection
    assert status == 400 and h.get("connection") == "close"
    assert needle in body["error"]


def test_body_size_cap_content_length_and_chunked(server):
    big = json.dumps({"instances": [{"b64": base64.b64encode(EX).decode()}] * 400}).encode()
    assert len(big) > 16384
    status, h, body = one(server.rest_port, post(PATH, big))
    assert status == 413 and "--max-body-mb" in body["error"] and h.get("connection") == "close"
    head = f"POST {PATH} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    status, _, body = one(server.rest_port, head + chunked(big, 8))
    assert status == 413 and "larger than the server allows" in body["error"]
    # just under the cap still works
    ok = json.dumps({"instances": [{"b64": base64.b64encode(EX).decode()}] * 100}).encode()
    assert len(ok) < 16384
    status, _, body = one(server.rest_port, post(PATH, ok))
    assert status == 200 and len(body["predictions"]) == 100


def test_slow_or_idle_connections_are_closed_after_the_read_timeout(server):
    port = server.rest_port
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: t\r\n")   # headers never finish
        assert s.recv(100) == b""                                           # closed by the server
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(post(PATH, BODY + b" " * 10)[:-5])                         # body never finishes
        assert s.recv(100) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:  # idle keep-alive
        s.sendall(post(PATH, BODY, close=False))
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        while True:
            more = s.recv(65536)
            if not more:
                break


@pytest.mark.parametrize("body,needle", [
    (b"[" * 8000 + b"]" * 8000, "nested too deeply"),
    (b'{"instances": ' + b"[" * 5000 + b'"x"' + b"]" * 5000 + b"}", "nested too deeply"),
    (b'{"instances": ["\\ud800"]}', "surrogate"),
    (b'{"signature_name": "\\udfff", "instances": ["x"]}', "surrogate"),
    (b'{"instances": [{"b64": "eA=="}], "x": "\\ud83d\\ude00 ok, then \\ud83d alone"}', "surrogate"),
    (b'{"instances": ["\xed\xa0\x80"]}', "JSON Parse error"),
], ids=["deep-array", "deep-instances", "lone-high", "lone-low-signature", "lone-after-pair", "raw-surrogate"])
def test_malformed_json_is_a_client_error(server, body, needle):
    status, _, got = one(server.rest_port, post(PATH, body))
    assert status == 400 and needle in got["error"]


def test_valid_surrogate_pair_is_text(server):
    body = json.dumps({"signature_name": "classify", "examples": [
        {"age": 39.0, "hours": 40.0, "workclass": "Private", "note": "\U0001F600"}]}).encode()
    assert b"\\ud83d\\ude00" in body      # json.dumps escapes it as a surrogate pair
    status, _, got = one(server.rest_port, post("/v1/models/adult:classify", body))
    assert status == 200, got


def test_classify_surrogate_and_float_range(server):
    path = "/v1/models/adult:classify"
    status, _, got = one(server.rest_port, post(path, b'{"signature_name": "classify", '
                                                     b'"examples": [{"workclass": "\\udc00"}]}'))
    assert status == 400 and "surrogate" in got["error"]
    status, _, got = one(server.rest_port, post(path, json.dumps(
        {"signature_name": "classify", "examples": [{"age": 1e300, "hours": 40.0}]}).encode()))
    assert status == 400 and "out of float32 range" in got["error"]


@pytest.mark.parametrize("value", [1e300, -1e300, 3.5e38])
def test_float32_input_out_of_range_is_400(server, value):
    body = json.dumps({"signature_name": "predict_raw", "inputs": {
        "age": [value], "hours": [40.0], "workclass": ["Private"]}}).encode()
    status, _, got = one(server.rest_port, post(PATH, body))
    assert status == 400
    assert "is not of expected type: float" in got["error"] and "out of range" in got["error"]
    ok = json.dumps({"signature_name": "predict_raw", "inputs": {
        "age": [3.4e38], "hours": [40.0], "workclass": ["Private"]}}).encode()   # float32 max is 3.40e38
    assert one(server.rest_port, post(PATH, ok))[0] == 200


def test_booleans_in_classify_examples_are_int64(server):
    body = {"signature_name": "classify", "examples": [
        {"age": 39.0, "hours": 40.0, "workclass": "Private", "is_member": True, "flags": [True, False, 1]}]}
    status, _, got = one(server.rest_port, post("/v1/models/adult:classify", json.dumps(body).encode()))
    assert status == 200, got
    plain = {"signature_name": "classify", "examples": [{"age": 39.0, "hours": 40.0, "workclass": "Private"}]}
    assert one(server.rest_port, post("/v1/models/adult:classify", json.dumps(plain).encode()))[2] == got
    from serving.codec import example_from_json
    from tensorflow.core.example import example_pb2

    ex = example_pb2.Example.FromString(example_from_json({"b": True, "l": [False, True, 7]}))
    assert list(ex.features.feature["b"].int64_list.value) == [1]
    assert list(ex.features.feature["l"].int64_list.value) == [0, 1, 7]


def test_extra_keys_in_columnar_inputs_are_ignored(server):
    cols = {"age": [39.0, 52.0], "hours": [40.0, 60.0], "workclass": ["Private", "Gov"]}
    status, _, plain = one(server.rest_port, post(PATH, json.dumps(
        {"signature_name": "predict_raw", "inputs": cols}).encode()))
    assert status == 200
    status, _, extra = one(server.rest_port, post(PATH, json.dumps(
        {"signature_name": "predict_raw", "inputs": dict(cols, income=[">50K", "<=50K"], id=[1, 2])}).encode()))
    assert status == 200 and extra == plain


def test_error_texts(server):
    # Different names, same count: name the alias, not "1!=1".
    status, _, got = one(server.rest_port, post(PATH, json.dumps(
        {"signature_name": "predict_raw", "instances": [{"age": 1.0, "hours": 2.0, "job": "x"}]}).encode()))
    assert status == 400 and "1!=1" not in got["error"] and "3!=3" not in got["error"]


def test_connection_and_request_limits(make_serving_dir, start_server, monkeypatch):
    """A connection costs no thread; over max_connections: 503; over max_concurrent_requests: 429."""
    from serving.repository import Signature

    d = make_serving_dir({1: "a"})
    s = start_server(d, grpc_port=None, poll_interval_s=0, max_connections=40, max_concurrent_requests=1)
    threads_before = threading.active_count()
    socks = []
    try:
        for _ in range(40):
            socks.append(socket.create_connection(("127.0.0.1", s.rest_port), timeout=60))
            socks[-1].sendall(b"GET /v1/models/adult HTTP/1.1\r\nHost: t\r\n\r\n")
        for c in socks:
            assert c.recv(65536).startswith(b"HTTP/1.1 200")   # all 40 served, kept alive
        assert threading.active_count() <= threads_before + 2   # no thread per connection
        status, h, body = one(s.rest_port, b"GET /v1/models/adult HTTP/1.1\r\nHost: t\r\n\r\n")
        assert status == 503 and "--max-connections" in body["error"]
    finally:
        for c in socks:
            c.close()
    deadline = time.monotonic() + 60      # the server notices the closed connections
    while one(s.rest_port, b"GET /v1/models/adult HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")[0] != 200:
        assert time.monotonic() < deadline, "connections were not released"
        time.sleep(0.05)
    # one request computing on a worker (held inside the model call; the first call of a route always
    # runs on a worker), a second one is refused with 429
    release, entered = threading.Event(), threading.Event()
    original = Signature.__call__

    def held(self, inputs, **kw):
        entered.set()
        release.wait(60)
        return original(self, inputs, **kw)

    monkeypatch.setattr(Signature, "__call__", held)
    first = {}
    t = threading.Thread(target=lambda: first.setdefault("r", one(s.rest_port, post(PATH, BODY))))
    t.start()
    try:
        assert entered.wait(60)
        status, _, got = one(s.rest_port, post(PATH, BODY))
        assert status == 429 and "--max-concurrent-requests" in got["error"]
    finally:
        release.set()
        t.join()
    assert first["r"][0] == 200


def test_sigterm_lets_the_in_flight_request_finish(make_serving_dir):
    """SIGTERM while a request's body is still arriving: the server stops accepting, reads the rest,
    answers it whole (Connection: close), then exits 0."""
    d = make_serving_dir({1: "a"})
    proc, port, _ = start_server_process(d)
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=60)
        c.sendall(f"POST {PATH} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                  "Expect: 100-continue\r\n\r\n".encode())
        assert c.recv(100).startswith(b"HTTP/1.1 100")   # the headers are in: the request is in flight
        c.sendall(f"{len(BODY):x}\r\n".encode() + BODY[:10])
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60   # wait until the listening socket is closed
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                time.sleep(0.05)
            except OSError:
                break
        else:
            raise AssertionError("the server kept accepting connections after SIGTERM")
        assert proc.poll() is None       # still draining
        c.sendall(BODY[10:] + b"\r\n0\r\n\r\n")
        raw = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            raw += chunk
        c.close()
        (status, headers, body), = [r for r in split_responses(raw) if r[0] >= 200]
        assert status == 200 and headers.get("connection") == "close"
        assert len(json.loads(body)["predictions"]) == 1
        assert proc.wait(timeout=60) == 0
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_memory_returns_after_a_45_mb_request(make_serving_dir):
    """RSS goes back to within 100 MB of its idle size after a 45 MB predict request."""
    from .helpers import rss_bytes

    d = make_serving_dir({1: "a"})
    proc, port, _ = start_server_process(d)
    try:
        assert one(port, post(PATH, BODY))[0] == 200
        idle = rss_bytes(proc.pid)
        n = 1_000_000
        rng = np.random.default_rng(0)
        cols = {"age": rng.uniform(17, 90, n).tolist(), "hours": rng.uniform(1, 80, n).tolist(),
                "workclass": ["Self-emp"] * n}
        big = json.dumps({"signature_name": "predict_raw", "inputs": cols}).encode()
        assert len(big) > 45e6
        status, _, got = one(port, post(PATH, big))
        assert status == 200 and len(got["outputs"]["logits"]) == n
        del got
        one(port, post(PATH, BODY))
        deadline = time.monotonic() + 30
        while rss_bytes(proc.pid) - idle > 100e6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rss_bytes(proc.pid) - idle <= 100e6, (idle, rss_bytes(proc.pid))
    finally:
        stop_process(proc)


def test_batching_path_answers_errors_like_the_plain_path(make_serving_dir, start_server):
    d = make_serving_dir({1: "a"})
    s = start_server(d, grpc_port=None, poll_interval_s=0, batching=True)
    port = s.rest_port
    assert one(port, post(PATH, BODY))[0] == 200
    for body, code, needle in ((b"{", 400, "JSON Parse error"),
                               (b'{"signature_name": "nope", "instances": ["x"]}', 400, "not found in signature def"),
                               (b'{"instances": ' + b"[" * 5000 + b'"x"' + b"]" * 5000 + b"}", 400, "nested"),
                               (b'{"instances": ["\\ud800"]}', 400, "surrogate")):
        status, _, got = one(port, post(PATH, body))
        assert status == code and needle in got["error"], got
    status, _, got = one(port, post("/v1/models/nosuch:predict", BODY))
    assert status == 404
    assert one(port, post(PATH, BODY))[0] == 200
