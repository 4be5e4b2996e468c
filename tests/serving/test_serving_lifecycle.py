"""Version hot-swap with requests in flight, draining, port errors, shutdown, SIGTERM, batching,
and the tensorflow_model_server (external binary) path."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from .helpers import privtrain_threads, push_version
from serving import PortInUseError
from serving.testing import make_example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EX = make_example(39.0, 40.0, "Private")
BODY = json.dumps({"instances": [{"b64": base64.b64encode(EX).decode()}]}).encode()


def rest_logit(port, version=None):
    v = f"/versions/{version}" if version else ""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/adult{v}:predict", data=BODY,
                                 method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["predictions"][0]["logits"]


def wait_for(cond, timeout=60.0, what="condition"):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_hot_swap_while_requests_in_flight(make_serving_dir, model_templates, start_server):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    d = make_serving_dir({1: "a"})
    s = start_server(d, poll_interval_s=0.2, max_versions=1)
    old = rest_logit(s.rest_port)
    stop, errors, seen = threading.Event(), [], []

    def rest_client():
        while not stop.is_set():
            try:
                seen.append(rest_logit(s.rest_port))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    def grpc_client():
        ch = grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}")
        try:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            req = predict_pb2.PredictRequest()
            req.model_spec.name = "adult"
            req.inputs["examples"].CopyFrom(tf.make_tensor_proto([EX]))
            while not stop.is_set():
                try:
                    stub.Predict(req, timeout=30)
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e))
        finally:
            ch.close()

    threads = [threading.Thread(target=rest_client), threading.Thread(target=rest_client),
               threading.Thread(target=grpc_client)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        push_version(d, model_templates, "adult", 2, "b")
        wait_for(lambda: seen and abs(seen[-1] - (old + 3.0)) < 1e-3, what="version 2 to answer")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert any(abs(x - old) < 1e-4 for x in seen) and abs(seen[-1] - (old + 3.0)) < 1e-3
    wait_for(lambda: [st[:2] for st in s.repo.status("adult")] == [(2, "AVAILABLE"), (1, "END")],
             what="version 1 to be unloaded")


def test_old_version_stays_loaded_until_requests_drain(make_serving_dir, model_templates, start_server):
    d = make_serving_dir({1: "a"})
    s = start_server(d, poll_interval_s=0.1, max_versions=1)
    held = s.repo.acquire("adult")            # an in-flight request pinned to version 1
    try:
        push_version(d, model_templates, "adult", 2, "b")
        wait_for(lambda: s.repo.available_versions("adult") == [2], what="version 2")
        assert held.state == "UNLOADING"
        out = held.signature("serving_default")({"examples": np.array([EX], dtype=object)})
        assert out["logits"].shape == (1,)     # the old version still answers its request
        assert abs(rest_logit(s.rest_port) - out["logits"][0] - 3.0) < 1e-3  # new requests: v2
    finally:
        s.repo.release(held)
    assert held.state == "END"


def test_labels_file(make_serving_dir, start_server):
    d = make_serving_dir({1: "a", 2: "b", 3: "a"})
    with open(os.path.join(d, "adult", "labels.json"), "w") as f:
        json.dump({"stable": 1, "canary": 3}, f)
    s = start_server(d, poll_interval_s=0, max_versions=1)
    assert s.repo.available_versions("adult") == [3, 1]   # newest + labelled
    assert s.repo.resolve("adult", label="stable").version == 1
    assert s.repo.resolve("adult").version == 3


def _listening_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("which", ["rest", "grpc"])
def test_port_taken_gives_clear_error(make_serving_dir, start_server, which):
    d = make_serving_dir({1: "a"})
    sock = _listening_socket()
    port = sock.getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(PortInUseError) as e:
            start_server(d, **{f"{which}_port": port})
        assert time.monotonic() - t0 < 5          # fails before loading any model
        msg = str(e.value)
        assert str(port) in msg and ("--rest-port" if which == "rest" else "--grpc-port") in msg
        assert "already in use" in msg
    finally:
        sock.close()
    assert privtrain_threads() == []


def test_stop_releases_ports_and_threads(make_serving_dir, start_server):
    import http.client

    before = set(threading.enumerate())
    d = make_serving_dir({1: "a"})
    s = start_server(d, poll_interval_s=0.2)
    conn = http.client.HTTPConnection("127.0.0.1", s.rest_port, timeout=10)  # idle keep-alive
    conn.request("GET", "/v1/models/adult")
    assert conn.getresponse().read()
    ports = (s.rest_port, s.grpc_port)
    s.stop()
    conn.close()
    assert privtrain_threads() == []
    leftover = [t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
    assert leftover == []
    for p in ports:       # both ports can be bound again (as a restarted server would: SO_REUSEADDR)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", p))
        sock.close()


def test_sigterm_shuts_down_cleanly(make_serving_dir):
    d = make_serving_dir({1: "a"})
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", PATH="/usr/bin:/bin")
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--serving-dir", d,
                             "--rest-port", "0", "--grpc-port", "0", "--poll-interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = ""
        t0 = time.monotonic()
        while not line.startswith("READY") and time.monotonic() - t0 < 120:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert line.startswith("READY"), f"server did not start (rc={proc.poll()})"
        rest = int(line.split()[1].split("=")[1])
        rest_logit(rest)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_batching_merges_concurrent_requests(make_serving_dir, start_server):
    d = make_serving_dir({1: "a"})
    s = start_server(d, poll_interval_s=0, batching={"max_batch_size": 16, "timeout_s": 0.05})
    single = rest_logit(s.rest_port)
    results, errors = [], []

    def call():
        try:
            results.append(rest_logit(s.rest_port))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 6
    np.testing.assert_allclose(results, single, rtol=1e-6)
    assert s.async_batcher.batches_run >= 1     # REST batches on the event loop


def test_batcher_unit_isolates_bad_requests():
    from serving.batcher import Batcher

    b = Batcher(max_batch_size=8, timeout_s=0.05)
    sizes = []

    def fn(inputs):
        x = inputs["x"]
        sizes.append(len(x))
        if np.any(x < 0):
            raise ValueError("negative")
        return {"y": x * 2}

    out, errs = {}, {}

    def call(i):
        try:
            out[i] = b.run("k", fn, {"x": np.array([i], dtype=np.float32)})["y"]
        except ValueError as e:
            errs[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in [1, 2, 3, -1, 5]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(errs) == {-1}
    assert {i: float(v[0]) for i, v in out.items()} == {1: 2.0, 2: 4.0, 3: 6.0, 5: 10.0}
    assert max(sizes) > 1


def test_tfserving_backend_is_refused_and_models_config_is_printed(make_serving_dir, start_server):
    """tensorflow_model_server cannot bind loopback only nor check tokens: privtrain does not start it,
    but prints its models.config for operators who run it behind their own proxy."""
    from serving.errors import ServingConfigError
    from serving.tfserving import models_config_text

    d = make_serving_dir({1: "a", 2: "b"})
    with open(os.path.join(d, "adult", "labels.json"), "w") as f:
        json.dump({"stable": 1}, f)
    with pytest.raises(ServingConfigError, match="listens on all interfaces"):
        start_server(d, backend="tfserving")
    assert privtrain_threads() == []
    cfg = models_config_text(d, max_versions=2)
    assert f'base_path: "{os.path.join(d, "adult")}"' in cfg
    assert 'version_labels { key: "stable" value: 1 }' in cfg
    assert "versions: 1 versions: 2" in cfg
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2
    parsed = text_format.Parse(cfg, model_server_config_pb2.ModelServerConfig())
    assert parsed.model_config_list.config[0].name == "adult"
