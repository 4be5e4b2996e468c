"""Limits an attacker meets (issue 20): a small gRPC request declaring huge padded tensors is refused
before anything is allocated (per-request element and byte caps); a model computation running past the
request timeout is cancelled; idle TCP connections (no TLS handshake, no bytes) can neither hold every
connection slot nor lock other clients out, also on a TLS + bearer-token server."""
from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import time

import grpc
import numpy as np
import pytest

from serving.testing import make_example

from .helpers import push_version, raw_http, split_responses, start_server_process, stop_process

PATH = "/v1/models/adult:predict"
BODY = json.dumps({"instances": [{"b64": base64.b64encode(make_example(39.0, 40.0, "Private")).decode()}]})


def _request(model="adult", signature="predict_raw"):
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    return req


def _padded(req, name, dtype, n, value):
    """``name``: declared shape [n], one value (TensorFlow pads it to n)."""
    from tensorflow.core.framework import types_pb2

    t = req.inputs[name]
    t.dtype = dtype
    t.tensor_shape.dim.add().size = n
    if dtype == types_pb2.DT_STRING:
        t.string_val.append(value)
    else:
        t.float_val.append(value)


def _fails(stub, req, timeout=120):
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(req, timeout=timeout)
    return e.value.code(), e.value.details()


def _peak_rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_padded_tensors_within_the_per_tensor_cap_are_refused_by_the_request_cap(make_serving_dir, start_server):
    """Three inputs of 1M elements each (one value sent each) pass a 1M per-tensor cap; together they are
    over the 1M per-request cap: refused naming it, before the model runs on 1M padded rows."""
    import resource

    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    s = start_server(make_serving_dir({1: "a"}), rest_port=None, poll_interval_s=0,
                     max_tensor_elements=1_000_000, max_request_elements=1_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    req = _request()
    _padded(req, "age", types_pb2.DT_FLOAT, 1_000_000, 39.0)
    _padded(req, "hours", types_pb2.DT_FLOAT, 1_000_000, 40.0)
    _padded(req, "workclass", types_pb2.DT_STRING, 1_000_000, b"Private")
    assert len(req.SerializeToString()) < 200
    with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        code, details = _fails(stub, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "3000000 elements" in details and "--max-request-elements" in details, details
        # the byte cap: one 1000-byte string padded to 400,000 elements (within both element caps)
        req = _request(signature="serving_default")
        _padded(req, "examples", types_pb2.DT_STRING, 400_000, b"e" * 1000)
        code, details = _fails(stub, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-request-mb" in details, details
        # a normal request still works
        import tensorflow as tf

        ok = _request()
        ok.inputs["age"].CopyFrom(tf.make_tensor_proto(np.array([39.0], np.float32)))
        ok.inputs["hours"].CopyFrom(tf.make_tensor_proto(np.array([40.0], np.float32)))
        ok.inputs["workclass"].CopyFrom(tf.make_tensor_proto([b"Private"]))
        assert stub.Predict(ok, timeout=60).outputs["logits"].tensor_shape.dim[0].size == 1
    # 1M padded rows through the model would have taken hundreds of MB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before < 100


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A model with 6 float and 8 string inputs (the shape of the issue's 439-byte bomb)."""
    import tensorflow as tf

    d = tmp_path_factory.mktemp("wide")
    specs = [tf.TensorSpec([None], tf.float32, name=f"f{i}") for i in range(6)]
    specs += [tf.TensorSpec([None], tf.string, name=f"s{i}") for i in range(8)]

    @tf.function(input_signature=specs)
    def serve(*xs):
        total = tf.add_n(list(xs[:6]))
        for s in xs[6:]:
            total += tf.cast(tf.strings.length(s), tf.float32)
        return {"y": total}

    module = tf.Module()
    module.serve = serve
    tf.saved_model.save(module, str(d / "wide" / "1"), signatures={"serving_default": serve})
    return str(d)


def test_the_issue_bomb_is_refused_with_default_limits_and_memory_stays_put(wide_model):
    """The issue's request (6 x 16M float inputs and 8 x 1M string inputs, one value each, about 440
    bytes) against `python -m serving.server` with its default flags: refused naming the cap, and the
    server's peak RSS does not move (it used to peak at 4.4 GB)."""
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    proc, _, grpc_port = start_server_process(wide_model)
    try:
        req = _request("wide", "serving_default")
        for i in range(6):
            _padded(req, f"f{i}", types_pb2.DT_FLOAT, 16 * 1024 * 1024, 1.0)
        for i in range(8):
            _padded(req, f"s{i}", types_pb2.DT_STRING, 1024 * 1024, b"a")
        assert len(req.SerializeToString()) < 500
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            ok = _request("wide", "serving_default")
            for i in range(6):
                _padded(ok, f"f{i}", types_pb2.DT_FLOAT, 2, 1.0)
            for i in range(8):
                _padded(ok, f"s{i}", types_pb2.DT_STRING, 2, b"ab")
            import tensorflow as tf

            assert tf.make_ndarray(stub.Predict(ok, timeout=60).outputs["y"]).tolist() == [22.0, 22.0]
            before = _peak_rss_mb(proc.pid)
            for _ in range(3):
                code, details = _fails(stub, req)
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert "--max-request-elements" in details and "14 input tensors" in details, details
            # strings alone: 8 x 1.5M one-byte strings pass the element caps, not the byte cap
            strings = _request("wide", "serving_default")
            for i in range(6):
                _padded(strings, f"f{i}", types_pb2.DT_FLOAT, 1, 1.0)
            for i in range(8):
                _padded(strings, f"s{i}", types_pb2.DT_STRING, 1_500_000, b"a")
            code, details = _fails(stub, strings)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-request-mb" in details, details
            assert _peak_rss_mb(proc.pid) - before < 50
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def slow_dir(tmp_path_factory):
    """``spin(n: int64[]) -> x``: a loop of n steps (n = 10**12 never ends by itself)."""
    import tensorflow as tf

    d = tmp_path_factory.mktemp("slow")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="n")])
    def spin(n):
        i, acc = tf.while_loop(lambda i, a: i < n[0], lambda i, a: (i + 1, a * 0.5 + 1.0),
                               [tf.constant(0, tf.int64), tf.constant(0.0)])
        return {"x": tf.fill(tf.shape(n), acc)}

    module = tf.Module()
    module.spin = spin
    tf.saved_model.save(module, str(d / "slow" / "1"), signatures={"serving_default": spin})
    return str(d)


def test_a_computation_past_the_request_timeout_is_cancelled(slow_dir, start_server):
    """REST 504 / gRPC DEADLINE_EXCEEDED naming --request-timeout; the computation is cancelled, so the
    only worker is free again for the next request (also when the gRPC client's deadline is shorter)."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    import tensorflow as tf

    s = start_server(slow_dir, poll_interval_s=0, request_timeout_s=1.0, rest_workers=1, grpc_workers=1)
    forever = json.dumps({"instances": [10 ** 12]}).encode()
    quick = json.dumps({"instances": [10]}).encode()

    def rest(body):
        (status, _, data), = split_responses(raw_http(s.rest_port, (
            f"POST /v1/models/slow:predict HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body, timeout=120))
        return status, json.loads(data)

    status, got = rest(forever)
    assert status == 504 and "--request-timeout" in got["error"], got
    assert rest(quick) == (200, {"predictions": [pytest.approx(1.998046875)]})

    def req(n):
        r = _request("slow", "serving_default")
        r.inputs["n"].CopyFrom(tf.make_tensor_proto(np.array([n], np.int64)))
        return r

    with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        code, details = _fails(stub, req(10 ** 12))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "--request-timeout" in details
    s.stop()
    s = start_server(slow_dir, poll_interval_s=0, rest_port=None, grpc_workers=1)   # default 30 s timeout
    with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        code, _ = _fails(stub, req(10 ** 12), timeout=1.0)     # the client's deadline
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        # the single worker was freed by the cancellation (not after 30 s, not never)
        out = tf.make_ndarray(stub.Predict(req(10), timeout=20).outputs["x"])
        assert out.tolist() == [pytest.approx(1.998046875)]


# ---- idle connections ---------------------------------------------------------------------------
def _idle(port, source, n):
    """n connected sockets from ``source`` that never send a byte."""
    out = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
        out.append(c)
    return out


def _closed_by_server(c) -> bool:
    """Reads until the server closes (True) or 30 s pass without it (False)."""
    try:
        while True:
            if not c.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def _plain_get(port):
    return raw_http(port, b"GET /v1/models/adult HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls+token"])
def test_idle_connections_cannot_lock_clients_out(make_serving_dir, start_server, secure, request):
    """Idle sockets (no handshake, no bytes) from one address get at most --max-connections-per-client
    slots; idle sockets from several addresses filling every slot are closed after the handshake
    timeout; a normal client is served in both cases (it was locked out for the whole read timeout)."""
    kw = {}
    if secure:
        pki = request.getfixturevalue("pki")
        tokens = request.getfixturevalue("tmp_path") / "tokens"
        tokens.write_text("t0ken\n")
        kw = dict(tls_cert=pki["server"][0], tls_key=pki["server"][1], auth_token_file=str(tokens))
    s = start_server(make_serving_dir({1: "a"}), grpc_port=None, poll_interval_s=0, max_connections=32,
                     max_connections_per_client=8, handshake_timeout_s=1.0, read_timeout_s=120.0, **kw)

    def served():
        if not secure:
            return split_responses(_plain_get(s.rest_port))[0][0]
        ctx = ssl.create_default_context(cafile=pki["ca"][0])
        conn = http.client.HTTPSConnection("127.0.0.1", s.rest_port, context=ctx, timeout=30)
        try:
            conn.request("GET", "/v1/models/adult", headers={"Authorization": "Bearer t0ken"})
            return conn.getresponse().status
        finally:
            conn.close()

    socks = []
    try:
        # one address: 32 idle sockets, all but 8 refused at once; the 8 closed after the handshake timeout
        socks = _idle(s.rest_port, "127.0.0.2", 32)
        assert served() == 200
        assert all(_closed_by_server(c) for c in socks)
        for c in socks:
            c.close()
        # four addresses, 8 each: every slot taken by silent sockets, all closed after the handshake timeout
        socks = [c for src in ("127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6")
                 for c in _idle(s.rest_port, src, 8)]
        assert all(_closed_by_server(c) for c in socks)
        assert served() == 200
    finally:
        for c in socks:
            c.close()


def test_a_client_that_sent_a_request_keeps_its_keep_alive_connection(make_serving_dir, start_server):
    """The handshake timeout is for the first request only: a keep-alive connection that has been
    answered is not cut after it (only after --read-timeout)."""
    s = start_server(make_serving_dir({1: "a"}), grpc_port=None, poll_interval_s=0, handshake_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", s.rest_port), timeout=30) as c:
        c.sendall(b"GET /v1/models/adult HTTP/1.1\r\nHost: t\r\n\r\n")
        assert c.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)     # past the handshake timeout, well within the read timeout
        c.sendall(b"GET /v1/models/adult HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert c.recv(65536).startswith(b"HTTP/1.1 200")
