"""Certificates for the share gateways' mutual TLS (both environments; needs ``cryptography``).

The set-up makes, for local use, a private CA and one certificate per party gateway, per client and for
the model owner. A certificate's role is its OrganizationalUnit: ``party``, ``client`` or ``model-owner``.
Operators may bring their own (PEM files; same OU convention), named in ``parties.json``/``client.json``.

Role pinning: a party (gateway) certificate may only authenticate a TLS *server* (extended key usage
serverAuth) and names ``<party>.party.privtrain``, the name clients check; a client or model-owner
certificate may only authenticate a TLS *client* (clientAuth) and names ``<name>.<role>.privtrain``. So a
client certificate called ``server0`` cannot pose as gateway server0, nor a gateway's as a client.

Registration: a gateway answers only certificates listed (by SHA-256 fingerprint, with their role) in the
service's ``registry.json`` and not revoked there; revocation takes effect on the next call, no restart.

The CA's private key never sits in a running service's directories: ``init`` keeps it only in
``--ca-key-dir`` (an offline place the operator chooses) or discards it.

    python -m encrypted_serving.certs init DIR [--ca-key-dir OFFLINE]   # ca + server0-2 + model-owner + client
    python -m encrypted_serving.certs issue DIR NAME --role client --ca-key-dir OFFLINE [--days N]
    python -m encrypted_serving.certs register REGISTRY CERT.pem        # allow a certificate
    python -m encrypted_serving.certs revoke REGISTRY NAME_OR_SHA256    # revoke it (gateways refuse it at once)
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROLES = ("party", "client", "model-owner")
PARTY_NAMES = ("server0", "server1", "server2")
REGISTRY_FORMAT = "privtrain-encrypted-registry/1"


def tls_name(name: str, role: str) -> str:
    """The DNS name a certificate of this role carries and a peer checks: e.g. ``server0.party.privtrain``."""
    return "%s.%s.privtrain" % (name, role)


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
    sans = [x509.DNSName(tls_name(name, role))]
    if role == "party":       # a gateway: addresses too; it may only act as a TLS server
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        usage = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    else:                     # a client or the model owner: only a TLS client
        usage = [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=True)
            .sign(ca_key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    cpath, kpath = paths(directory, name)
    _write(cpath, cert.public_bytes(serialization.Encoding.PEM))
    _write(kpath, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()), private=True)
    return cpath, kpath


def init_local(directory: str, clients=("client",), days: float = 30, ca_key_dir: Optional[str] = None) -> str:
    """A CA, the three party gateways' certificates, the model owner's and one per client, in directory
    (ca.pem, NAME.pem, NAME.key). The CA's key goes to ca_key_dir (created 0700; must not be directory) or,
    without one, is destroyed once the certificates are issued. Also writes directory/registry.json with
    every issued certificate registered."""
    if ca_key_dir is not None and os.path.abspath(ca_key_dir) == os.path.abspath(directory):
        raise CertError("keep the CA key out of the service's certificate directory %s: give another "
                        "--ca-key-dir" % directory)
    os.makedirs(directory, exist_ok=True)
    work = tempfile.mkdtemp(prefix="privtrain-ca-")
    try:
        make_ca(work)
        shutil.copyfile(os.path.join(work, "ca.pem"), os.path.join(directory, "ca.pem"))
        issued = []
        for p in PARTY_NAMES:
            issued.append(issue(directory, p, "party", days, ca_dir=work)[0])
        issued.append(issue(directory, "model-owner", "model-owner", days, ca_dir=work)[0])
        for c in clients:
            issued.append(issue(directory, c, "client", days, ca_dir=work)[0])
        registry = registry_path(directory)
        for path in issued:
            register(registry, path)
        if ca_key_dir is not None:
            os.makedirs(ca_key_dir, mode=0o700, exist_ok=True)
            for f in ("ca.pem", "ca.key"):
                shutil.copyfile(os.path.join(work, f), os.path.join(ca_key_dir, f))
            os.chmod(os.path.join(ca_key_dir, "ca.key"), 0o600)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return directory


# ---------------------------------------------------------------------------------------------- registry
def registry_path(directory: str) -> str:
    return os.path.join(directory, "registry.json")


def load_registry(path: str) -> dict:
    try:
        with open(path) as f:
            reg = json.load(f)
    except FileNotFoundError:
        return {"format": REGISTRY_FORMAT, "certificates": {}}
    except (OSError, ValueError) as e:
        raise CertError("cannot read the certificate registry %s: %s" % (path, e)) from e
    if reg.get("format") != REGISTRY_FORMAT or not isinstance(reg.get("certificates"), dict):
        raise CertError("%s is not a certificate registry (format %r)" % (path, REGISTRY_FORMAT))
    return reg


def _save_registry(path: str, reg: dict) -> None:
    _write(path, (json.dumps(reg, indent=1, sort_keys=True) + "\n").encode())


def register(registry: str, cert_path: str) -> str:
    """Allow the certificate at cert_path (its role is pinned to its OU). Returns its fingerprint."""
    cert = load_cert(cert_path)
    role = role_of(cert)
    if role not in ROLES:
        raise CertError("%s has role (OU) %r; expected one of %s" % (cert_path, role, ROLES))
    fp = fingerprint(cert)
    reg = load_registry(registry)
    reg["certificates"][fp] = {"name": name_of(cert), "role": role, "revoked": None,
                               "registered": _now().strftime("%Y-%m-%dT%H:%M:%SZ")}
    _save_registry(registry, reg)
    return fp


def revoke(registry: str, who: str) -> list:
    """Revoke by name (every certificate of that name) or SHA-256 fingerprint. Returns the revoked names."""
    reg = load_registry(registry)
    hits = [fp for fp, e in reg["certificates"].items() if fp == who.lower() or e["name"] == who]
    if not hits:
        raise CertError("no certificate named or with fingerprint %r in %s" % (who, registry))
    for fp in hits:
        reg["certificates"][fp]["revoked"] = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
    _save_registry(registry, reg)
    return [reg["certificates"][fp]["name"] for fp in hits]


class Registry:
    """A gateway's view of registry.json, re-read whenever the file changes (revocation needs no restart)."""

    def __init__(self, path: str):
        self.path, self._key, self._certs = path, None, {}

    def lookup(self, fp: str) -> Optional[dict]:
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            key = None
        if key != self._key:
            self._certs = load_registry(self.path)["certificates"] if key else {}
            self._key = key
        return self._certs.get(fp)

    def check(self, fp: str, role: Optional[str], name: str) -> Optional[str]:
        """None if the certificate may be served, else the one-line reason."""
        e = self.lookup(fp)
        if e is None:
            return ("certificate %r (sha256 %s...) is not registered with this service: ask the operator to "
                    "register it (python -m encrypted_serving.certs register REGISTRY CERT)" % (name, fp[:16]))
        if e.get("revoked"):
            return "certificate %r was revoked on %s: ask the operator for a new one" % (name, e["revoked"])
        if e.get("role") != role:
            return "certificate %r has role %r but is registered as %r" % (name, role, e.get("role"))
        return None


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


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def fingerprint_pem(pem: bytes) -> str:
    return fingerprint(x509.load_pem_x509_certificate(pem))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="privtrain encrypted-serving certificates")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init", help="CA + server0-2 + model-owner + clients (+ registry.json)")
    p.add_argument("dir")
    p.add_argument("--client", action="append", default=None)
    p.add_argument("--days", type=float, default=30)
    p.add_argument("--ca-key-dir", default=None, help="keep the CA key here (offline); default: destroy it")
    p = sub.add_parser("issue", help="one more certificate signed by the CA in --ca-key-dir")
    p.add_argument("dir")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--days", type=float, default=30)
    p.add_argument("--ca-key-dir", required=True, help="where init kept the CA key (ca.pem, ca.key)")
    p.add_argument("--host", action="append", default=None, help="address(es) for a party certificate")
    p = sub.add_parser("register", help="allow a certificate at the gateways")
    p.add_argument("registry")
    p.add_argument("cert")
    p = sub.add_parser("revoke", help="revoke a certificate (by name or SHA-256 fingerprint)")
    p.add_argument("registry")
    p.add_argument("who")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "init":
            init_local(args.dir, tuple(args.client or ["client"]), args.days, args.ca_key_dir)
            print(args.dir)
        elif args.cmd == "issue":
            print(issue(args.dir, args.name, args.role, args.days, tuple(args.host or ("127.0.0.1", "localhost")),
                        ca_dir=args.ca_key_dir)[0])
        elif args.cmd == "register":
            print(register(args.registry, args.cert))
        else:
            print("revoked: %s" % ", ".join(revoke(args.registry, args.who)))
    except (CertError, OSError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
