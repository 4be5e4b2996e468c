"""Certificates for the share gateways' mutual TLS (both environments; needs ``cryptography``).

The set-up makes, for local use, a private CA and one certificate per party gateway, per client and for
the model owner. A certificate's role is its OrganizationalUnit: ``party``, ``client`` or ``model-owner``.
Operators may bring their own (PEM files; same OU convention), named in ``parties.json``/``client.json``.

    python -m encrypted_serving.certs init DIR                    # ca + server0-2 + model-owner + client
    python -m encrypted_serving.certs issue DIR NAME --role client [--days N]
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import os
import sys
from typing import Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROLES = ("party", "client", "model-owner")
PARTY_NAMES = ("server0", "server1", "server2")


class CertError(RuntimeError):
    """A certificate is missing, unreadable, expired or has the wrong role; the message says which."""


def _now():
    return dt.datetime.now(dt.timezone.utc)


def _write(path: str, data: bytes, private: bool = False) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def paths(directory: str, name: str) -> Tuple[str, str]:
    return os.path.join(directory, name + ".pem"), os.path.join(directory, name + ".key")


def make_ca(directory: str, days: int = 365) -> Tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privtrain encrypted-serving local CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    cpath, kpath = paths(directory, "ca")
    _write(cpath, cert.public_bytes(serialization.Encoding.PEM))
    _write(kpath, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()), private=True)
    return cpath, kpath


def issue(directory: str, name: str, role: str, days: float = 30, hosts=("127.0.0.1", "localhost"),
          not_before: Optional[dt.datetime] = None, ca_dir: Optional[str] = None) -> Tuple[str, str]:
    """Issue NAME.pem/NAME.key in directory, signed by ca_dir's (default: directory's) ca.pem/ca.key.
    days may be negative (an already expired certificate, for tests)."""
    if role not in ROLES:
        raise CertError("role must be one of %s, got %r" % (ROLES, role))
    ca_dir = ca_dir or directory
    ca_cert = load_cert(os.path.join(ca_dir, "ca.pem"))
    with open(os.path.join(ca_dir, "ca.key"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    end = _now() + dt.timedelta(days=days)
    if end <= start:
        start = end - dt.timedelta(days=1)
    sans = [x509.DNSName(name)]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    usage = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(ca_key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    cpath, kpath = paths(directory, name)
    _write(cpath, cert.public_bytes(serialization.Encoding.PEM))
    _write(kpath, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()), private=True)
    return cpath, kpath


def init_local(directory: str, clients=("client",), days: float = 30) -> str:
    """A CA, the three party gateways' certificates, the model owner's and one per client."""
    make_ca(directory)
    for p in PARTY_NAMES:
        issue(directory, p, "party", days)
    issue(directory, "model-owner", "model-owner", days)
    for c in clients:
        issue(directory, c, "client", days)
    return directory


def load_cert(path: str) -> x509.Certificate:
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read())
    except OSError as e:
        raise CertError("cannot read certificate %s: %s" % (path, e.strerror)) from e
    except ValueError as e:
        raise CertError("%s is not a PEM certificate" % path) from e


def not_after(cert: x509.Certificate) -> dt.datetime:
    try:
        return cert.not_valid_after_utc
    except AttributeError:   # cryptography < 42
        return cert.not_valid_after.replace(tzinfo=dt.timezone.utc)


def check_valid(path: str, what: str = "certificate") -> x509.Certificate:
    """Raise CertError if the certificate at path has expired (or is not yet valid)."""
    cert = load_cert(path)
    end = not_after(cert)
    if end <= _now():
        raise CertError("%s %s expired on %s; issue a new one (python -m encrypted_serving.certs issue DIR NAME "
                        "--role ROLE) or ask the operator" % (what, path, end.strftime("%Y-%m-%d %H:%M:%S UTC")))
    return cert


def role_of(cert: x509.Certificate) -> Optional[str]:
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return ous[0].value if ous else None


def name_of(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return cns[0].value if cns else "?"


def fingerprint_pem(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="privtrain encrypted-serving certificates")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="CA + server0-2 + model-owner + clients")
    p.add_argument("dir")
    p.add_argument("--client", action="append", default=None)
    p.add_argument("--days", type=float, default=30)
    p = sub.add_parser("issue", help="one more certificate signed by DIR/ca.pem")
    p.add_argument("dir")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--days", type=float, default=30)
    p.add_argument("--host", action="append", default=None, help="address(es) for a party certificate")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "init":
            init_local(args.dir, tuple(args.client or ["client"]), args.days)
            print(args.dir)
        else:
            print(issue(args.dir, args.name, args.role, args.days, tuple(args.host or ("127.0.0.1", "localhost")))[0])
    except (CertError, OSError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
