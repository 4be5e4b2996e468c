"""The built-in server against TF Serving's REST API (plain HTTP) and gRPC API (official stubs)."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from serving.testing import make_example

ROWS = [(39.0, 40.0, "Private"), (52.0, 60.0, "Gov"), (23.0, 20.0, "Other")]


def http(method, url, body=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_templates):
    """One server for this module: model 'adult' versions 1 (bias 0) and 2 (bias 3)."""
    from serving import ModelServer
    from .helpers import push_version

    d = tmp_path_factory.mktemp("served")
    push_version(d, model_templates, "adult", 1, "a")
    push_version(d, model_templates, "adult", 2, "b")
    s = ModelServer(str(d), 0, 0, backend="builtin", poll_interval_s=0, log=lambda m: None)
    s.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}")
    try:
        yield s, f"http://127.0.0.1:{s.rest_port}/v1/models/adult", ch, d
    finally:
        ch.close()
        s.stop()


@pytest.fixture(scope="module")
def expected(served):
    """In-process reference outputs per version, straight from the SavedModel."""
    import tensorflow as tf

    _, _, _, d = served
    out = {}
    for v in (1, 2):
        m = tf.saved_model.load(str(d / "adult" / str(v)))
        r = m.signatures["serving_default"](examples=tf.constant([make_example(*x) for x in ROWS]))
        out[v] = {k: t.numpy() for k, t in r.items()}
    return out


def b64_examples():
    return [{"b64": base64.b64encode(make_example(*x)).decode()} for x in ROWS]


def test_status_has_tf_serving_shape(served):
    _, url, _, _ = served
    code, body = http("GET", url)
    assert code == 200
    assert body == {"model_version_status": [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    code, body = http("GET", url + "/versions/1")
    assert code == 200 and [s["version"] for s in body["model_version_status"]] == ["1"]


def test_metadata(served):
    _, url, _, _ = served
    code, body = http("GET", url + "/metadata")
    assert code == 200
    assert body["model_spec"] == {"name": "adult", "signature_name": "", "version": "2"}
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "predict_raw", "classify"} <= set(sigs)
    sd = sigs["serving_default"]
    assert sd["method_name"] == "tensorflow/serving/predict"
    assert sd["inputs"]["examples"]["dtype"] == "DT_STRING"
    assert sd["inputs"]["examples"]["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}],
                                                        "unknown_rank": False}
    assert set(sd["outputs"]) == {"probabilities", "logits"}
    assert set(sigs["predict_raw"]["inputs"]) == {"age", "hours", "workclass"}
    assert sigs["classify"]["outputs"]["classes"]["dtype"] == "DT_STRING"
    code, body = http("GET", url + "/versions/1/metadata")
    assert code == 200 and body["model_spec"]["version"] == "1"


def test_predict_rest_row_and_columnar(served, expected):
    _, url, _, _ = served
    code, body = http("POST", url + ":predict", {"instances": b64_examples()})
    assert code == 200
    preds = body["predictions"]
    assert len(preds) == len(ROWS) and set(preds[0]) == {"probabilities", "logits"}
    np.testing.assert_allclose([p["logits"] for p in preds], expected[2]["logits"], rtol=1e-6)
    code, body = http("POST", url + ":predict", {"signature_name": "serving_default",
                                                 "inputs": {"examples": b64_examples()}})
    assert code == 200
    np.testing.assert_allclose(body["outputs"]["probabilities"], expected[2]["probabilities"], rtol=1e-6)
    # raw features: one object per instance (row) and one list per input (columnar)
    code, body = http("POST", url + ":predict", {"signature_name": "predict_raw", "instances": [
        {"age": a, "hours": h, "workclass": w} for a, h, w in ROWS]})
    assert code == 200
    np.testing.assert_allclose([p["logits"] for p in body["predictions"]], expected[2]["logits"],
                               rtol=1e-5)
    code, body = http("POST", url + ":predict", {"signature_name": "predict_raw", "inputs": {
        "age": [r[0] for r in ROWS], "hours": [r[1] for r in ROWS], "workclass": [r[2] for r in ROWS]}})
    assert code == 200
    np.testing.assert_allclose(body["outputs"]["logits"], expected[2]["logits"], rtol=1e-5)


def test_specific_version_and_labels(served, expected):
    _, url, _, _ = served
    code, body = http("POST", url + "/versions/1:predict", {"inputs": b64_examples()})
    assert code == 200
    np.testing.assert_allclose(body["outputs"]["logits"], expected[1]["logits"], rtol=1e-6)
    # convention without labels.json: canary = newest, stable = the one before
    code, body = http("POST", url + "/labels/stable:predict", {"inputs": b64_examples()})
    np.testing.assert_allclose(body["outputs"]["logits"], expected[1]["logits"], rtol=1e-6)
    code, body = http("POST", url + "/labels/canary:predict", {"inputs": b64_examples()})
    np.testing.assert_allclose(body["outputs"]["logits"], expected[2]["logits"], rtol=1e-6)
    code, body = http("GET", url + "/labels/stable")
    assert code == 200 and body["model_version_status"][0]["version"] == "1"


def test_classify_and_regress(served, expected):
    _, url, ch, _ = served
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc
    code, body = http("POST", url + ":classify", {"signature_name": "classify", "examples": [
        {"age": a, "hours": h, "workclass": w} for a, h, w in ROWS]})
    assert code == 200
    assert [c[0] for c in body["results"][0]] == ["<=50K", ">50K"]
    np.testing.assert_allclose([r[1][1] for r in body["results"]], expected[2]["probabilities"], rtol=1e-6)
    # context features are merged into every example
    code, body2 = http("POST", url + ":classify", {"signature_name": "classify", "context": {"hours": 40.0},
                                                   "examples": [{"age": 39.0, "workclass": "Private"}]})
    assert code == 200 and body2["results"][0] == body["results"][0]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name, req.model_spec.signature_name = "adult", "classify"
    for x in ROWS:
        req.input.example_list.examples.add().ParseFromString(make_example(*x))
    resp = stub.Classify(req, timeout=30)
    assert resp.model_spec.version.value == 2
    np.testing.assert_allclose([c.classes[1].score for c in resp.result.classifications],
                               expected[2]["probabilities"], rtol=1e-6)
    # no signature of this model is a regression signature
    code, body = http("POST", url + ":regress", {"examples": [{"age": 39.0}]})
    assert code == 400 and body == {"error": "Expected one output Tensor."}


def test_grpc_predict_metadata_status(served, expected):
    import tensorflow as tf
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                         predict_pb2, prediction_service_pb2_grpc)
    _, _, ch, _ = served
    stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "adult"
    req.inputs["examples"].CopyFrom(tf.make_tensor_proto([make_example(*x) for x in ROWS]))
    resp = stub.Predict(req, timeout=30)
    assert resp.model_spec.version.value == 2 and resp.model_spec.signature_name == "serving_default"
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["logits"]), expected[2]["logits"], rtol=1e-6)
    req.model_spec.version.value = 1
    req.output_filter.append("probabilities")
    resp = stub.Predict(req, timeout=30)
    assert list(resp.outputs) == ["probabilities"]
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["probabilities"]),
                               expected[1]["probabilities"], rtol=1e-6)
    # raw-feature signature with numeric tensors
    raw = predict_pb2.PredictRequest()
    raw.model_spec.name, raw.model_spec.signature_name = "adult", "predict_raw"
    raw.model_spec.version_label = "canary"
    raw.inputs["age"].CopyFrom(tf.make_tensor_proto(np.array([r[0] for r in ROWS], np.float32)))
    raw.inputs["hours"].CopyFrom(tf.make_tensor_proto(np.array([r[1] for r in ROWS], np.float32)))
    raw.inputs["workclass"].CopyFrom(tf.make_tensor_proto([r[2] for r in ROWS]))
    resp = stub.Predict(raw, timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["logits"]), expected[2]["logits"], rtol=1e-5)

    mreq = get_model_metadata_pb2.GetModelMetadataRequest()
    mreq.model_spec.name = "adult"
    mreq.metadata_field.append("signature_def")
    mresp = stub.GetModelMetadata(mreq, timeout=30)
    sdm = get_model_metadata_pb2.SignatureDefMap()
    assert mresp.metadata["signature_def"].Unpack(sdm)
    assert sdm.signature_def["serving_default"].inputs["examples"].dtype == tf.string.as_datatype_enum
    assert mresp.model_spec.version.value == 2

    sreq = get_model_status_pb2.GetModelStatusRequest()
    sreq.model_spec.name = "adult"
    sresp = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(sreq, timeout=30)
    assert [(m.version, m.state) for m in sresp.model_version_status] == [
        (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE),
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]


@pytest.mark.parametrize("method,path,body,code,message", [
    ("POST", ":predict", b"instances = [1, 2]", 400, "JSON Parse error"),
    ("POST", ":predict", b"", 400, "JSON Parse error: The document is empty"),
    ("POST", ":predict", {"signature_name": 100}, 400, "'signature_name' key must be a string value."),
    ("POST", ":predict", {"foo": [1]}, 400, "Missing 'inputs' or 'instances' key"),
    ("POST", ":predict", {"instances": [1], "inputs": [1]}, 400, "only one of 'inputs' or 'instances'"),
    ("POST", ":predict", {"signature_name": "nope", "instances": ["x"]}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("POST", ":predict", {"signature_name": "predict_raw", "inputs": {"age": ["x"], "hours": [1.0],
                                                                      "workclass": ["Gov"]}},
     400, "is not of expected type: float"),
    ("POST", ":predict", {"signature_name": "predict_raw", "inputs": {"age": [1.0]}}, 400,
     "Missing named input: hours in 'inputs' object."),  # the first missing, sorted
    ("POST", ":predict", {"signature_name": "predict_raw", "instances": [{"age": 1.0}]}, 400,
     "keys do not match signature inputs"),
    ("POST", "/versions/7:predict", {"instances": ["x"]}, 404, "Servable not found for request: Specific(adult, 7)"),
    ("POST", "/labels/nope:predict", {"instances": ["x"]}, 400, "Unrecognized servable version label: nope"),
    ("GET", "/versions/9", None, 404, "Could not find version 9 of model adult"),
    ("GET", ":predict", None, 400, "Malformed request: GET /v1/models/adult:predict"),
    ("POST", "/metadata", {}, 400, "Malformed request"),
])
def test_bad_requests_give_tf_serving_errors(served, method, path, body, code, message):
    _, url, _, _ = served
    got_code, got = http(method, url + path, body)
    assert got_code == code
    assert list(got) == ["error"] and message in got["error"]


def test_unknown_model_rest_and_grpc(served):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    s, url, ch, _ = served
    code, body = http("POST", url.replace("adult", "nosuch") + ":predict", {"instances": ["x"]})
    assert code == 404 and body == {"error": "Servable not found for request: Latest(nosuch)"}
    stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "nosuch"
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    req.model_spec.name = "adult"
    req.inputs["wrong"].CopyFrom(tf.make_tensor_proto([b"x"]))
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # same number of inputs, unknown name: TF Serving's wording, not "1!=1"
    assert e.value.details() == ("input tensor alias not found in signature: wrong. Inputs expected to be "
                                 "in the set {examples}.")
    req.inputs["other"].CopyFrom(tf.make_tensor_proto([b"x"]))
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("input size does not match signature: 2!=1 ")
    assert "Missing but required: {examples}" in e.value.details()
