"""gRPC Predict checks request tensors before allocating anything: names, then dtypes (exactly the
signature's, as TF Serving), then declared sizes against --max-tensor-elements and the message limit;
the client's mistakes are INVALID_ARGUMENT, never INTERNAL."""
from __future__ import annotations

import resource

import grpc
import numpy as np
import pytest

from serving.testing import make_example


@pytest.fixture(scope="module")
def stub(tmp_path_factory, model_templates):
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from serving import ModelServer

    from .helpers import push_version

    d = tmp_path_factory.mktemp("grpc")
    push_version(d, model_templates, "adult", 1, "a")
    s = ModelServer(str(d), None, 0, backend="builtin", poll_interval_s=0, log=lambda m: None,
                    max_tensor_elements=1_000_000)
    s.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}")
    try:
        yield prediction_service_pb2_grpc.PredictionServiceStub(ch)
    finally:
        ch.close()
        s.stop()


def request(signature="serving_default"):
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = "adult"
    req.model_spec.signature_name = signature
    return req


def raw_inputs(req, age=None, hours=None, workclass=None):
    import tensorflow as tf

    req.inputs["age"].CopyFrom(age if age is not None else tf.make_tensor_proto(np.array([39.0], np.float32)))
    req.inputs["hours"].CopyFrom(hours if hours is not None else tf.make_tensor_proto(np.array([40.0], np.float32)))
    req.inputs["workclass"].CopyFrom(workclass if workclass is not None else tf.make_tensor_proto([b"Private"]))
    return req


def fails(stub, req):
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(req, timeout=60)
    return e.value.code(), e.value.details()


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_declared_shape_bomb_is_refused_before_allocating(stub):
    from tensorflow.core.framework import types_pb2

    before = peak_rss_mb()
    req = request()
    t = req.inputs["examples"]
    t.dtype = types_pb2.DT_STRING
    t.tensor_shape.dim.add().size = 100_000_000
    t.string_val.append(b"x")
    assert len(req.SerializeToString()) < 64
    code, details = fails(stub, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "100000000 elements" in details and "--max-tensor-elements" in details
    # an unknown name is reported first, whatever its declared size
    req2 = request()
    req2.inputs["nope"].CopyFrom(t)
    code, details = fails(stub, req2)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "alias not found in signature: nope" in details
    assert peak_rss_mb() - before < 200          # 100M strings would have been gigabytes


def test_padding_may_not_blow_up_a_small_message(tmp_path, model_templates, start_server):
    """Within the element cap, a few values padded (as TensorFlow pads) to more than the message
    limit are refused too."""
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from .helpers import push_version

    push_version(tmp_path, model_templates, "adult", 1, "a")
    s = start_server(str(tmp_path), rest_port=None, poll_interval_s=0, max_tensor_elements=10 ** 9,
                     max_request_elements=10 ** 9, max_request_bytes=1 << 40, max_message_bytes=1 << 20)
    with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        req = request()
        t = req.inputs["examples"]
        t.dtype = types_pb2.DT_STRING
        t.tensor_shape.dim.add().size = 50_000_000
        t.string_val.append(b"x" * 10)
        code, details = fails(prediction_service_pb2_grpc.PredictionServiceStub(ch), req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "padded" in details


@pytest.mark.parametrize("dtype", ["float64", "int64", "string", "int32"])
def test_wrong_dtype_is_invalid_argument_not_converted(stub, dtype):
    import tensorflow as tf

    value = np.array([39], dtype) if dtype != "string" else np.array([b"39"], object)
    req = raw_inputs(request("predict_raw"), age=tf.make_tensor_proto(value))
    code, details = fails(stub, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    name = {"float64": "double"}.get(dtype, dtype)     # TensorFlow's C++ names
    assert details == f"Expects arg[0] to be float but {name} is provided (input 'age')"


def test_malformed_tensors_are_invalid_argument(stub):
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, types_pb2

    wrong_size = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    wrong_size.tensor_shape.dim.add().size = 3
    wrong_size.tensor_content = np.array([1.0, 2.0], np.float32).tobytes()
    too_many = tf.make_tensor_proto(np.array([1.0, 2.0, 3.0], np.float32))
    too_many.tensor_shape.dim[0].size = 2
    too_many.ClearField("tensor_content")
    too_many.float_val.extend([1.0, 2.0, 3.0])
    negative = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    negative.tensor_shape.dim.add().size = -1
    for bad, needle in ((wrong_size, "tensor_content has 8 bytes"), (too_many, "3 values for shape [2]"),
                        (negative, "negative dimension")):
        code, details = fails(stub, raw_inputs(request("predict_raw"), age=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details


def test_fewer_values_are_padded_like_tensorflow(stub):
    """A shape [3] tensor with one value means three copies of it (Tensor::FromProto)."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, types_pb2

    def padded(dtype, field, value):
        t = tensor_pb2.TensorProto(dtype=dtype)
        t.tensor_shape.dim.add().size = 3
        getattr(t, field).append(value)
        return t

    req = raw_inputs(request("predict_raw"), age=padded(types_pb2.DT_FLOAT, "float_val", 39.0),
                     hours=padded(types_pb2.DT_FLOAT, "float_val", 40.0),
                     workclass=padded(types_pb2.DT_STRING, "string_val", b"Private"))
    out = tf.make_ndarray(stub.Predict(req, timeout=60).outputs["logits"])
    assert out.shape == (3,) and np.allclose(out, out[0])
    one = tf.make_ndarray(stub.Predict(raw_inputs(request("predict_raw")), timeout=60).outputs["logits"])
    assert np.allclose(out, one[0], rtol=1e-6)


def test_examples_over_grpc_still_work(stub):
    import tensorflow as tf

    req = request()
    req.inputs["examples"].CopyFrom(tf.make_tensor_proto([make_example(39.0, 40.0, "Private")] * 2))
    out = tf.make_ndarray(stub.Predict(req, timeout=60).outputs["probabilities"])
    assert out.shape == (2,)
