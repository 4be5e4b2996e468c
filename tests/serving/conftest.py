"""Fixtures for the serving tests: two exported SavedModel templates (bias 0 and bias 3), serving
directories built from them, and a server factory that always stops what it started."""
from __future__ import annotations

import datetime
import ipaddress
import os

import pytest

from .helpers import push_version

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BIAS = {"a": 0.0, "b": 3.0}


@pytest.fixture(scope="session")
def model_templates(tmp_path_factory):
    from serving.testing import export_demo_model

    root = tmp_path_factory.mktemp("templates")
    return {k: export_demo_model(str(root / k), bias=b) for k, b in BIAS.items()}


@pytest.fixture
def make_serving_dir(tmp_path, model_templates):
    def make(versions, name="adult"):
        d = tmp_path / "serving"
        d.mkdir(exist_ok=True)
        for v, t in versions.items():
            push_version(d, model_templates, name, v, t)
        return str(d)
    return make


@pytest.fixture
def start_server():
    """``start_server(serving_dir, **kw)`` -> started ModelServer on free ports; stopped at teardown."""
    from serving import ModelServer

    started = []

    def start(serving_dir, **kw):
        kw.setdefault("backend", "builtin")
        kw.setdefault("log", lambda m: None)
        s = ModelServer(serving_dir, kw.pop("rest_port", 0), kw.pop("grpc_port", 0), **kw)
        started.append(s)
        return s.start()

    try:
        yield start
    finally:
        for s in started:
            s.stop()


def _cert(subject, issuer_name, issuer_key, key, *, ca=False, server=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("pki")
    out = {}

    def write(name, cert, key):
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        out[name] = (str(d / f"{name}.pem"), str(d / f"{name}.key"))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("privtrain test CA", "privtrain test CA", ca_key, ca_key, ca=True)
    write("ca", ca, ca_key)
    for name, server in (("server", True), ("client", False)):
        k = ec.generate_private_key(ec.SECP256R1())
        write(name, _cert(name, "privtrain test CA", ca_key, k, server=server), k)
    other_key = ec.generate_private_key(ec.SECP256R1())
    k = ec.generate_private_key(ec.SECP256R1())
    write("stranger", _cert("stranger", "someone else", other_key, k), k)
    out["dir"] = d
    return out
