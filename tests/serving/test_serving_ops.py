"""Operations and TF Serving parity (issue 20): the Prometheus metrics endpoint and the access log of
both APIs; HEAD answered like GET without a body; invalid base64 and numbers beyond a double are 400s
(not a missing value, not infinity); an unknown gRPC signature is FAILED_PRECONDITION."""
from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest

from serving.testing import make_example

from .helpers import raw_http, split_responses

PATH = "/v1/models/adult:predict"
B64 = base64.b64encode(make_example(39.0, 40.0, "Private")).decode()
BODY = json.dumps({"instances": [{"b64": B64}]}).encode()
METRICS = "/monitoring/prometheus/metrics"


def http(port, method, path, body=b"", headers=""):
    data = (f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{headers}"
            "Connection: close\r\n\r\n").encode() + body
    return raw_http(port, data)


def one(port, method, path, body=b"", headers=""):
    (status, h, data), = split_responses(http(port, method, path, body, headers))
    return status, h, data


def grpc_predict(port, signature="serving_default", metadata=None):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    req = predict_pb2.PredictRequest()
    req.model_spec.name = "adult"
    req.model_spec.signature_name = signature
    req.inputs["examples"].CopyFrom(tf.make_tensor_proto([make_example(39.0, 40.0, "Private")]))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(req, timeout=60, metadata=metadata)


def _sample(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_prometheus_metrics_count_both_apis_and_need_the_token(make_serving_dir, start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("t0ken\n")
    s = start_server(make_serving_dir({1: "a"}), poll_interval_s=0, auth_token_file=str(tokens))
    auth = "Authorization: Bearer t0ken\r\n"
    assert one(s.rest_port, "GET", METRICS)[0] == 401            # same bearer token as the API
    for _ in range(3):
        assert one(s.rest_port, "POST", PATH, BODY, auth)[0] == 200
    assert one(s.rest_port, "POST", "/v1/models/nosuch:predict", BODY, auth)[0] == 404
    assert one(s.rest_port, "POST", "/v1/models/made-up-name-1:predict", BODY, auth)[0] == 404
    grpc_predict(s.grpc_port, metadata=[("authorization", "Bearer t0ken")])
    with pytest.raises(grpc.RpcError):
        grpc_predict(s.grpc_port)
    status, h, data = one(s.rest_port, "GET", METRICS, headers=auth)
    assert status == 200 and h["content-type"].startswith("text/plain")
    text = data.decode()
    name = "privtrain_serving_requests_total"
    assert _sample(text, name, api="rest", verb="predict", model="adult", code="200") == 3
    assert _sample(text, name, api="rest", verb="predict", model="other", code="404") == 2   # bounded labels
    assert _sample(text, name, api="rest", verb="metrics", code="401") == 1
    assert _sample(text, name, api="grpc", verb="predict", model="adult", code="OK") == 1
    assert _sample(text, name, api="grpc", verb="predict", code="UNAUTHENTICATED") == 1
    assert _sample(text, "privtrain_serving_request_latency_seconds_count", api="rest", verb="predict") == 5
    assert _sample(text, "privtrain_serving_model_versions", model="adult", state="AVAILABLE") == 1
    assert _sample(text, "privtrain_serving_requests_in_flight", api="rest") == 0    # all answered
    assert _sample(text, "privtrain_serving_rest_connections") >= 1                 # the scrape's own
    assert "made-up-name" not in text


def test_access_log_has_one_json_line_per_request_and_no_payload(make_serving_dir, start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-token\n")
    log = tmp_path / "access.log"
    s = start_server(make_serving_dir({1: "a"}), poll_interval_s=0, auth_token_file=str(tokens),
                     access_log=str(log))
    auth = "Authorization: Bearer s3cret-token\r\n"
    assert one(s.rest_port, "POST", PATH, BODY, auth)[0] == 200
    assert one(s.rest_port, "GET", "/v1/models/adult")[0] == 401
    grpc_predict(s.grpc_port, metadata=[("authorization", "Bearer s3cret-token")])
    s.stop()
    text = log.read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert [(x["api"], x["status"]) for x in lines] == [("rest", "200"), ("rest", "401"), ("grpc", "OK")]
    rest = lines[0]
    assert rest["client"] == "127.0.0.1" and rest["method"] == "POST" and rest["path"] == PATH
    assert rest["model"] == "adult" and rest["bytes_in"] == len(BODY) and rest["bytes_out"] > 0
    assert lines[2]["method"] == "Predict" and lines[2]["client"] == "127.0.0.1"
    assert all(x["ms"] >= 0 and x["time"].endswith("Z") for x in lines)
    assert B64[:20] not in text and "s3cret" not in text          # no inputs, no tokens


def test_metrics_can_be_turned_off(make_serving_dir, start_server):
    s = start_server(make_serving_dir({1: "a"}), grpc_port=None, poll_interval_s=0, metrics=False)
    assert one(s.rest_port, "GET", METRICS)[0] == 404


def test_head_is_answered_like_get_without_a_body(make_serving_dir, start_server):
    s = start_server(make_serving_dir({1: "a"}), grpc_port=None, poll_interval_s=0)
    status, h, get_body = one(s.rest_port, "GET", "/v1/models/adult")
    raw = http(s.rest_port, "HEAD", "/v1/models/adult")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest == b""
    assert f"Content-Length: {len(get_body)}".encode() in head
    raw = http(s.rest_port, "HEAD", "/v1/models/nosuch")
    assert raw.startswith(b"HTTP/1.1 404") and raw.partition(b"\r\n\r\n")[2] == b""


@pytest.fixture(scope="module")
def rest_port(tmp_path_factory, model_templates):
    from serving import ModelServer

    from .helpers import push_version

    d = tmp_path_factory.mktemp("ops")
    push_version(d, model_templates, "adult", 1, "a")
    s = ModelServer(str(d), 0, None, backend="builtin", poll_interval_s=0, log=lambda m: None)
    s.start()
    try:
        yield s.rest_port
    finally:
        s.stop()


@pytest.mark.parametrize("b64", ["!!!not base64!!!", "QUJD$", "QUJ=D"])
def test_invalid_base64_is_400_not_a_missing_value(rest_port, b64):
    body = json.dumps({"instances": [{"b64": b64}]}).encode()
    status, _, data = one(rest_port, "POST", PATH, body)
    assert status == 400 and "Unable to base64 decode" in json.loads(data)["error"], data


def test_base64_without_padding_is_accepted(rest_port):
    unpadded = B64.rstrip("=")
    status, _, padded = one(rest_port, "POST", PATH, BODY)
    assert status == 200
    status, _, data = one(rest_port, "POST", PATH, json.dumps({"instances": [{"b64": unpadded}]}).encode())
    assert status == 200 and json.loads(data) == json.loads(padded)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1" * 400 + ".5", "2E+0400"])
def test_numbers_beyond_a_double_are_400_not_infinity(rest_port, number):
    body = ('{"signature_name": "predict_raw", "instances": [{"age": %s, "hours": 40.0, "workclass": "Private"}]}'
            % number).encode()
    status, _, data = one(rest_port, "POST", PATH, body)
    assert status == 400 and "Number too big to be stored in double" in json.loads(data)["error"], data
    fine = body.replace(number.encode(), b"1e-400")   # underflows to 0, as RapidJSON
    assert one(rest_port, "POST", PATH, fine)[0] == 200


def test_unknown_grpc_signature_is_failed_precondition(make_serving_dir, start_server):
    s = start_server(make_serving_dir({1: "a"}), rest_port=None, poll_interval_s=0)
    with pytest.raises(grpc.RpcError) as e:
        grpc_predict(s.grpc_port, signature="nope")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details() == 'Serving signature key "nope" not found.'
    out = grpc_predict(s.grpc_port)
    import tensorflow as tf

    assert np.asarray(tf.make_ndarray(out.outputs["probabilities"])).shape == (1,)
