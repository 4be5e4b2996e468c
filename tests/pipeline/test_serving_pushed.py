"""The pipeline's pushed model served over TF Serving's REST and gRPC APIs, called with plain HTTP and the
official tensorflow_serving.apis stubs, matches the SavedModel called in-process."""
from __future__ import annotations

import json
import os
import urllib.request

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, predict_pb2, \
    prediction_service_pb2_grpc

from serving.server import ModelServer
from tests.conftest import ADULT_DIR


def _rows(n):
    spec = json.load(open(os.path.join(ADULT_DIR, "dataset.json")))
    names = [c["name"] for c in spec["columns"]]
    numeric = {c["name"] for c in spec["columns"] if c["type"] == "numeric"}
    rows = []
    with open(os.path.join(ADULT_DIR, "adult.test")) as f:
        for _, line in zip(range(n), f):
            raw = dict(zip(names, line.rstrip("\n").split(", ")))
            raw.pop("income")
            rows.append({k: (float(v) if k in numeric else ("" if v == "?" else v)) for k, v in raw.items()})
    return rows


def test_rest_and_grpc_predictions_match_the_in_process_model(standard_run):
    workdir, summary, _ = standard_run
    serving_dir = os.path.join(workdir, "serving")
    version_dir = max((os.path.join(serving_dir, "adult", v) for v in os.listdir(os.path.join(serving_dir, "adult"))),
                      key=lambda p: int(os.path.basename(p)))
    rows = _rows(20)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    model = tf.saved_model.load(version_dir)
    expected = model.signatures["predict_raw"](**{
        k: tf.constant(v, tf.float32 if isinstance(v[0], float) else tf.string) for k, v in columns.items()
    })["probabilities"].numpy()

    with ModelServer(serving_dir, rest_port=0, grpc_port=0, poll_interval_s=0, log=lambda *_: None) as server:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.rest_port}/v1/models/adult:predict",
            data=json.dumps({"signature_name": "predict_raw", "instances": rows}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.load(response)["predictions"]
        np.testing.assert_allclose([p["probabilities"] for p in predictions], expected, atol=1e-6)

        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            predict = predict_pb2.PredictRequest()
            predict.model_spec.name = "adult"
            predict.model_spec.signature_name = "predict_raw"
            for key, values in columns.items():
                predict.inputs[key].CopyFrom(tf.make_tensor_proto(
                    values, dtype=tf.float32 if isinstance(values[0], float) else tf.string))
            reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict, timeout=60)
            np.testing.assert_allclose(tf.make_ndarray(reply.outputs["probabilities"]), expected, atol=1e-6)
            assert reply.model_spec.version.value == int(os.path.basename(version_dir))

            status_request = get_model_status_pb2.GetModelStatusRequest()
            status_request.model_spec.name = "adult"
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=30)
            assert any(v.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
                       for v in status.model_version_status)
