"""TLS and mutual TLS, bearer tokens (REST and gRPC), the refusal to serve beyond loopback without either,
and one-line errors for bad security flags and files. Certificates are made here with `cryptography`."""
from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import subprocess
import sys

import grpc
import pytest

from serving.testing import make_example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BODY = json.dumps({"instances": [{"b64": base64.b64encode(make_example(39.0, 40.0, "Private")).decode()}]})


@pytest.fixture
def serving_dir(make_serving_dir):
    return make_serving_dir({1: "a"})


def https(port, pki, cert=None, headers=None):
    ctx = ssl.create_default_context(cafile=pki["ca"][0])
    if cert:
        ctx.load_cert_chain(*pki[cert])
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request("POST", "/v1/models/adult:predict", BODY, headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def grpc_predict(channel, metadata=None):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    req = predict_pb2.PredictRequest()
    req.model_spec.name = "adult"
    req.inputs["examples"].CopyFrom(tf.make_tensor_proto([make_example(39.0, 40.0, "Private")]))
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(req, timeout=30, metadata=metadata)


def tls_channel(port, pki, cert=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(pki["ca"][0], "rb").read(),
        private_key=open(pki[cert][1], "rb").read() if cert else None,
        certificate_chain=open(pki[cert][0], "rb").read() if cert else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])


def test_tls_rest_and_grpc(serving_dir, start_server, pki):
    s = start_server(serving_dir, poll_interval_s=0, tls_cert=pki["server"][0], tls_key=pki["server"][1])
    status, body = https(s.rest_port, pki)
    assert status == 200 and len(body["predictions"]) == 1
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
        conn = http.client.HTTPConnection("127.0.0.1", s.rest_port, timeout=10)   # plaintext to TLS port
        try:
            conn.request("POST", "/v1/models/adult:predict", BODY)
            conn.getresponse().read()
        finally:
            conn.close()
    with tls_channel(s.grpc_port, pki) as ch:
        assert grpc_predict(ch).outputs["logits"].tensor_shape.dim[0].size == 1


def test_mutual_tls_requires_a_client_certificate_from_the_ca(serving_dir, start_server, pki):
    s = start_server(serving_dir, poll_interval_s=0, tls_cert=pki["server"][0], tls_key=pki["server"][1],
                     tls_client_ca=pki["ca"][0])
    assert https(s.rest_port, pki, cert="client")[0] == 200
    for cert in (None, "stranger"):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            https(s.rest_port, pki, cert=cert)
    with tls_channel(s.grpc_port, pki, cert="client") as ch:
        grpc_predict(ch)
    for cert in (None, "stranger"):
        with tls_channel(s.grpc_port, pki, cert=cert) as ch, pytest.raises(grpc.RpcError) as e:
            grpc_predict(ch)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_rest_and_grpc(serving_dir, start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# serving clients\nfirst-token-123\n\n  second-token-456  \n")
    s = start_server(serving_dir, poll_interval_s=0, auth_token_file=str(tokens))
    url = "/v1/models/adult:predict"
    for headers, want in (({}, 401), ({"Authorization": "Bearer nope"}, 401),
                          ({"Authorization": "Basic Zmlyc3Q="}, 401),
                          ({"Authorization": "Bearer first-token-123"}, 200),
                          ({"Authorization": "bearer second-token-456"}, 200)):
        conn = http.client.HTTPConnection("127.0.0.1", s.rest_port, timeout=30)
        conn.request("POST", url, BODY, headers)
        r = conn.getresponse()
        body = json.loads(r.read())
        conn.close()
        assert r.status == want, (headers, body)
        if want == 401:
            assert r.getheader("WWW-Authenticate", "").startswith("Bearer") and "error" in body
    conn = http.client.HTTPConnection("127.0.0.1", s.rest_port, timeout=30)   # status needs it as well
    conn.request("GET", "/v1/models/adult")
    assert conn.getresponse().status == 401
    conn.close()
    with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            grpc_predict(ch)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            grpc_predict(ch, metadata=[("authorization", "Bearer wrong")])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        grpc_predict(ch, metadata=[("authorization", "Bearer second-token-456")])


def test_tls_and_token_together(serving_dir, start_server, pki, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("t0ken\n")
    s = start_server(serving_dir, poll_interval_s=0, tls_cert=pki["server"][0], tls_key=pki["server"][1],
                     auth_token_file=str(tokens))
    assert https(s.rest_port, pki)[0] == 401
    assert https(s.rest_port, pki, headers={"Authorization": "Bearer t0ken"})[0] == 200
    with tls_channel(s.grpc_port, pki) as ch:
        grpc_predict(ch, metadata=[("authorization", "Bearer t0ken")])


def test_only_loopback_without_tls_or_auth(serving_dir, start_server, tmp_path, pki):
    from serving.errors import InsecureBindError
    from serving.options import ServerOptions, check_bind_allowed, is_loopback

    from .helpers import privtrain_threads

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(InsecureBindError, match="--tls-cert/--tls-key .* --auth-token-file"):
            start_server(serving_dir, host=host)
    assert privtrain_threads() == []
    tokens = tmp_path / "t"
    tokens.write_text("x\n")
    check_bind_allowed("0.0.0.0", ServerOptions(auth_token_file=str(tokens)))
    check_bind_allowed("0.0.0.0", ServerOptions(tls_cert=pki["server"][0], tls_key=pki["server"][1]))


@pytest.mark.parametrize("flags,needle", [
    (["--tls-cert", "CERT"], "TLS needs both --tls-cert and --tls-key"),
    (["--tls-client-ca", "CA"], "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
    (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "KEY"], "cannot read --tls-cert /nonexistent/cert.pem"),
    (["--tls-cert", "KEY", "--tls-key", "KEY"], "are not a matching PEM certificate and private key"),
    (["--auth-token-file", "EMPTY"], "holds no token"),
    (["--auth-token-file", "/nonexistent/tokens"], "cannot read --auth-token-file"),
    (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without TLS or authentication"),
    (["--backend", "tfserving"], "tensorflow_model_server backend is not offered"),
    (["--max-body-mb", "0"], "--max-body-mb must be a positive number"),
    (["--read-timeout", "-1"], "--read-timeout must be a positive number of seconds"),
])
def test_bad_flags_give_one_line(serving_dir, pki, tmp_path, flags, needle):
    (tmp_path / "empty").write_text("\n# nothing\n")
    subst = {"CERT": pki["server"][0], "KEY": pki["server"][1], "CA": pki["ca"][0],
             "EMPTY": str(tmp_path / "empty")}
    args = [subst.get(f, f) for f in flags]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-m", "serving.server", "--serving-dir", serving_dir, "--rest-port", "0",
                        "--grpc-port", "0", *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("privtrain serve: ") and lines[0].count("privtrain serve:") == 1
    assert needle in lines[0], lines[0]


def test_privtrain_serve_port_in_use_has_one_prefix(tmp_path, model_templates):
    """`privtrain serve` prints the taken-port error with one "privtrain serve:" prefix."""
    import socket

    from .helpers import push_version

    push_version(tmp_path / "serving", model_templates, "adult", 1, "a")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
        r = subprocess.run([sys.executable, "-m", "privtrain_cli", "serve", "--workdir", str(tmp_path),
                            "--rest-port", str(sock.getsockname()[1]), "--grpc-port", "0"],
                           capture_output=True, text=True, env=env, timeout=120)
    finally:
        sock.close()
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].count("privtrain serve:") == 1, r.stderr
    assert "already in use" in lines[0] and "--rest-port" in lines[0]
