"""`privtrain serve --encrypted` (issue 19, item 1): the encrypted service starts no plaintext endpoint unless
asked (--also-plaintext), and then only with TLS or a token.

Attack: a local process (no credentials) looks for the serving process's listening ports and asks every one
for a prediction over plain HTTP. Against plain `privtrain serve` (the control) it gets the exact logits; the
old `serve --encrypted` also started that server (REST on 127.0.0.1, no auth), so the same probe got the logits
the encrypted service is meant to protect. Now the only ports are the three mutual-TLS gateways.
"""
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from encrypted_serving import service

from conftest import ADULT, REPO

tf = pytest.importorskip("tensorflow")
if not tf.__version__.startswith("2.15"):
    pytest.skip("builds a Keras SavedModel in the platform env", allow_module_level=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, adult_spec):
    from test_encrypted_export import pipeline_style_model
    model = pipeline_style_model(adult_spec, hidden=(8, 8), seed=5)
    wd = tmp_path_factory.mktemp("wd")
    vdir = wd / "serving" / "adult" / "1700000000"
    model.save(str(vdir), save_format="tf")
    (vdir / "assets.extra").mkdir()
    (vdir / "assets.extra" / "preprocessing.json").write_text(json.dumps(adult_spec))
    return str(wd), model


def _listening_ports(pid):
    """TCP ports in LISTEN state held by pid or any of its descendants (host network namespace)."""
    pids, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        try:
            for t in os.listdir("/proc/%d/task" % p):
                for c in open("/proc/%d/task/%s/children" % (p, t)).read().split():
                    if int(c) not in pids:
                        pids.add(int(c))
                        frontier.append(int(c))
        except OSError:
            pass
    inodes = set()
    for p in pids:
        try:
            for fd in os.listdir("/proc/%d/fd" % p):
                try:
                    link = os.readlink("/proc/%d/fd/%s" % (p, fd))
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    ports = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(f).read().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def _probe(port, instance):
    """What an unauthenticated local process gets from a port: the logit, or None."""
    body = json.dumps({"instances": [instance]}).encode()
    req = urllib.request.Request("http://127.0.0.1:%d/v1/models/adult:predict" % port, data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            out = json.loads(r.read())
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return None
    preds = out.get("predictions")
    return float(np.ravel(preds[0])[0]) if preds else None


def _start(args, wd):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-m", "privtrain_cli", "serve", "--workdir", wd, "--rest-port", "0",
                             "--grpc-port", "0"] + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc


def _wait_ready(proc, needle, timeout=900):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if line.startswith(needle):
            return lines
    raise AssertionError("no %r line; stdout %s; stderr %s" % (needle, lines, proc.stderr.read()[-3000:]
                                                              if proc.poll() is not None else ""))


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _instance(adult_spec):
    from encrypted_serving import preprocessing as pp
    from test_encrypted_export import transformed_features
    rows = pp.read_raw_rows(os.path.join(ADULT, "adult.test"), pp.load_dataset_description(ADULT), limit=1)[0]
    feats, _ = transformed_features(rows, adult_spec)
    inst = {k: (v[0].tolist()) for k, v in feats.items()}
    keras_in = {k: v.astype("float32" if v.dtype.kind == "f" else "int64") for k, v in feats.items()}
    return inst, keras_in


def test_plain_serve_control_the_probe_gets_exact_logits(workdir, adult_spec):
    wd, model = workdir
    inst, keras_in = _instance(adult_spec)
    truth = float(model(keras_in, training=False).numpy().ravel()[0])
    proc = _start([], wd)
    try:
        _wait_ready(proc, "READY rest=", timeout=300)
        got = [v for v in (_probe(p, inst) for p in _listening_ports(proc.pid)) if v is not None]
    finally:
        _stop(proc)
    assert got and abs(got[0] - truth) < 1e-4, (got, truth)


@pytest.mark.skipif(os.geteuid() != 0 or not service.shutil.which("ip"), reason="needs root and iproute2")
def test_attack_serve_encrypted_exposes_no_plaintext_endpoint(workdir, adult_spec):
    wd, _ = workdir
    inst, _ = _instance(adult_spec)
    proc = _start(["--encrypted", "--encrypted-output", "label"], wd)
    try:
        lines = _wait_ready(proc, "READY")
        assert not any(l.startswith("READY rest=") for l in lines), lines
        ports = _listening_ports(proc.pid)
        gateways = {int(a.rsplit(":", 1)[1]) for _, a in json.load(open(os.path.join(
            wd, "encrypted_serving", "clients", "client", "client.json")))["gateways"]}
        assert ports == gateways, (ports, gateways)            # only the three mutual-TLS gateways listen
        assert all(_probe(p, inst) is None for p in ports)
    finally:
        _stop(proc)
    assert proc.returncode is not None


def test_also_plaintext_without_tls_or_token_is_refused(workdir):
    wd, _ = workdir
    proc = _start(["--encrypted", "--also-plaintext"], wd)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "--also-plaintext" in lines[0] and "--auth-token-file" in lines[0], err


def test_also_plaintext_with_a_server_certificate_only_is_refused(workdir, tmp_path):
    """Review 2 B1: --tls-cert/--tls-key without --tls-client-ca encrypts the connection but authenticates no
    one: any local process would still get the exact logits. Refused before anything starts."""
    from encrypted_serving import certs
    cert, key = certs.make_ca(str(tmp_path / "tls"))            # any certificate + key pair the server can load
    wd, _ = workdir
    proc = _start(["--encrypted", "--also-plaintext", "--tls-cert", cert, "--tls-key", key], wd)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 2, (out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "--tls-client-ca" in lines[0] and "authenticates no one" in lines[0], err
    assert "READY" not in out


def test_the_plaintext_endpoint_is_allowed_only_with_authentication_and_says_it_has_no_budget():
    """The rule itself (no TF, no server): a token or mutual TLS, and the output names the missing budget."""
    from types import SimpleNamespace as NS
    from encrypted_serving import cli
    args = NS(encrypted=True, also_plaintext=True)
    for opts in (NS(tls=False, auth=False, tls_client_ca=None), NS(tls=True, auth=False, tls_client_ca=None)):
        with pytest.raises(ValueError, match="--tls-client-ca"):
            cli.plaintext_wanted(args, opts)
    assert cli.plaintext_wanted(args, NS(tls=False, auth=True, tls_client_ca=None))
    assert cli.plaintext_wanted(args, NS(tls=True, auth=False, tls_client_ca="ca.pem"))
    assert not cli.plaintext_wanted(NS(encrypted=True, also_plaintext=False), NS(tls=True, auth=True,
                                                                                 tls_client_ca="ca.pem"))
    assert "NO query budget" in cli.PLAINTEXT_NOTE


@pytest.mark.skipif(os.geteuid() != 0 or not service.shutil.which("ip"), reason="needs root and iproute2")
def test_also_plaintext_with_a_token_says_the_endpoint_has_no_query_budget(workdir, adult_spec, tmp_path):
    """With a token the plaintext endpoint starts next to the encrypted service; the output states that it has no
    query budget (review 2 B1), and a caller without the token still gets nothing from any port."""
    wd, _ = workdir
    inst, _ = _instance(adult_spec)
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    os.chmod(str(token), 0o600)
    proc = _start(["--encrypted", "--encrypted-output", "label", "--also-plaintext", "--auth-token-file",
                   str(token)], wd)
    try:
        lines = _wait_ready(proc, "READY rest=")
        notes = [l for l in lines if l.startswith("NOTE plaintext endpoint")]
        assert notes and "NO query budget" in notes[0], lines
        assert all(_probe(p, inst) is None for p in _listening_ports(proc.pid))
    finally:
        _stop(proc)
