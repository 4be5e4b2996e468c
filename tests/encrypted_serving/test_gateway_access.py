"""One share gateway on its own (no TF: a fake compute worker on its backend socket), attacked through its public
side (issue 19): certificate registration and revocation, role pinning of the gateways (item 4), rows charged
against rate limits and a per-certificate daily budget, in-flight caps (item 3).

Each attack is first shown to work where it must (a registered certificate, a real gateway certificate, a
request inside the limits), so that a refusal is the property under test, not a broken probe.
"""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from encrypted_serving import certs, parties as pc, ring, service, share_client as sc
from encrypted_serving import model_format as mf

from conftest import REPO, random_mlp   # at import: later, 'conftest' may name another directory's

D = 4


class FakeWorker(threading.Thread):
    """Stands in for the party's compute worker on the gateway's backend socket: reports the model loaded and,
    if `answer`, completes every prediction with a zero output share."""

    def __init__(self, path, answer=True):
        super().__init__(daemon=True)
        self.path, self.answer, self.stop, self.seen = path, answer, threading.Event(), []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)

    def call(self, header, arrays=None):
        f = ring.pack(header, arrays or {})
        self.sock.sendall(struct.pack("<Q", len(f)) + f)
        (n,) = struct.unpack("<Q", ring.recv_exact(self.sock, 8))
        return ring.unpack(ring.recv_exact(self.sock, n))

    def run(self):
        try:
            self._loop()
        except (OSError, TypeError, ring.FrameError):    # the gateway went away at the end of the test
            pass

    def _loop(self):
        since = 0
        while not self.stop.is_set():
            head, _ = self.call({"op": "wait", "since": since, "timeout_ms": 100, "model_loaded": True})
            since = head["seq"]
            for r in head["ready"]:
                self.seen.append(r["id"])
                if self.answer and r["kind"] == "predict":
                    self.call({"op": "take", "id": r["id"]})
                    self.call({"op": "put", "id": r["id"], "output": "logit"},
                              {"share": np.zeros(r["n"], np.int64)})


@pytest.fixture
def gateway(tmp_path, request):
    """server0's gateway process for a 4-input linear model; yields a dict of paths and helpers. Indirect
    parametrisation overrides parties.json keys (limits)."""
    config, weights = random_mlp(D, hidden=(), seed=0)
    spec = [{"name": "f%d" % i, "kind": "numeric", "mean": 0.0, "std": 1.0, "log1p": False, "clip": [-3, 3]}
            for i in range(D)]
    model = mf.save_model(str(tmp_path / "model"), config, weights, spec)
    public = tmp_path / "public"
    public.mkdir()
    for f in (mf.MODEL_JSON, mf.PREPROCESSING_JSON):
        (public / f).write_bytes(open(os.path.join(model, f), "rb").read())
    cdir, offline = str(tmp_path / "certs"), str(tmp_path / "offline-ca")
    certs.init_local(cdir, ("client", "client2"), ca_key_dir=offline)
    layout = service.GatewayService("unused", run_dir=str(tmp_path))     # the service's run-directory layout
    port = _free_port()
    pdir = tmp_path / "parties" / "server0"
    pdir.mkdir(parents=True)
    cfg = {"format": pc.PARTIES_FORMAT, "public_dir": str(public), "ca": os.path.join(cdir, "ca.pem"),
           "registry": certs.registry_path(cdir),
           "tf": {n: "127.0.0.1:1" for n in pc.PARTY_NAMES + (pc.DRIVER,)},
           "parties": {p: {"gateway": "127.0.0.1:%d" % (port if p == "server0" else 1),
                           "cert": os.path.join(cdir, p + ".pem"), "key": os.path.join(cdir, p + ".key"),
                           "dir": layout.party_dir(p), "budget": layout.budget_path(p)} for p in pc.PARTY_NAMES},
           "output": "logit", "batch_sizes": [1, 100], "max_batch": 100, "request_timeout_s": 5,
           "rate_limit": {"rows_per_second": 1000, "burst_rows": 1000, "min_rows_per_request": 10},
           "query_budget": {"rows_per_day": 250},
           "in_flight": {"requests": 2, "bytes": 1 << 20}}
    cfg.update(getattr(request, "param", {}))
    pj = str(tmp_path / "parties.json")
    pc.save(cfg, pj)
    gw = {"addr": "127.0.0.1:%d" % port, "cdir": cdir, "offline": offline, "registry": cfg["registry"],
          "socket": pc.backend_socket(pc.load_parties(pj), "server0"), "tmp": tmp_path, "cfg": cfg, "pj": pj,
          "log": str(tmp_path / "gateway.log"), "procs": []}
    try:
        _launch(gw)
        yield gw
    finally:
        for proc in gw["procs"]:
            _kill(proc)


def _launch(gw, wait=True):
    """Start server0's gateway for gw's parties.json (kept in gw["procs"]; the fixture stops it)."""
    with open(gw["log"], "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "encrypted_serving.gateway", "--config", gw["pj"],
                                 "--party", "server0"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    gw["procs"].append(proc)
    gw["proc"] = proc
    ready = os.path.join(gw["cfg"]["parties"]["server0"]["dir"], "gateway.ready")
    deadline = time.monotonic() + 60
    while wait and not os.path.exists(ready):
        assert proc.poll() is None, open(gw["log"]).read()
        assert time.monotonic() < deadline, "gateway not ready"
        time.sleep(0.1)
    return proc


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _stub(gw, name=None, cert=None, key=None, target="server0"):
    ca = open(os.path.join(gw["cdir"], "ca.pem"), "rb").read()
    if name:
        cert = os.path.join(gw["cdir"], name + ".pem")
        key = os.path.join(gw["cdir"], name + ".key")
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=open(key, "rb").read(),
                                         certificate_chain=open(cert, "rb").read())
    ch = grpc.secure_channel(gw["addr"], creds, options=[("grpc.ssl_target_name_override",
                                                          certs.tls_name(target, "party"))])
    return ch, {m: ch.unary_unary("/privtrain.ShareGateway/" + m) for m in ("Info", "Submit", "Fetch", "Predict")}


def _info(calls):
    return json.loads(calls["Info"](b"{}", timeout=10))


# ------------------------------------------------------------------------------------------------ item 4
def test_attack_an_unregistered_ca_signed_certificate_is_refused(gateway):
    ch, calls = _stub(gateway, "client")
    assert _info(calls)["you"]["name"] == "client"          # control: a registered certificate is answered
    # The attacker obtained a certificate signed by the service CA that the operator never registered.
    cpath, kpath = certs.issue(str(gateway["tmp"] / "stray"), "stray", "client", ca_dir=gateway["offline"])
    ch2, stray = _stub(gateway, cert=cpath, key=kpath)
    with pytest.raises(grpc.RpcError) as e:
        _info(stray)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not registered" in e.value.details()
    certs.register(gateway["registry"], cpath)              # the operator registers it: now it is answered
    assert _info(stray)["you"]["name"] == "stray"
    ch.close(), ch2.close()


def test_attack_a_revoked_certificate_is_refused_at_once(gateway):
    ch, calls = _stub(gateway, "client2")
    assert _info(calls)["you"]["name"] == "client2"
    assert certs.main(["revoke", gateway["registry"], "client2"]) == 0     # no gateway restart
    with pytest.raises(grpc.RpcError) as e:
        _info(calls)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in e.value.details()
    ch.close()
    ch, calls = _stub(gateway, "client")                                  # others are still served
    assert _info(calls)["you"]["name"] == "client"
    ch.close()


def test_attack_a_client_certificate_named_server0_cannot_pose_as_gateway(gateway, tmp_path):
    # control: the client library accepts the real gateway of server0
    ch, calls = _stub(gateway, "client")
    assert _info(calls)["party"] == "server0"
    ch.close()
    # A client of the service (its certificate signed by the same CA, role client, named "server0") runs a fake
    # gateway and gets a victim to connect to it (DNS, a config file): the victim's client must refuse it.
    cpath, kpath = certs.issue(str(tmp_path / "evil"), "server0", "client", ca_dir=gateway["offline"])
    port = _free_port()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("privtrain.ShareGateway", {
        "Info": grpc.unary_unary_rpc_method_handler(lambda req, ctx: json.dumps({"party": "server0"}).encode())}),))
    server.add_secure_port("127.0.0.1:%d" % port, grpc.ssl_server_credentials(
        [(open(kpath, "rb").read(), open(cpath, "rb").read())]))
    server.start()
    try:
        client_json = str(tmp_path / "victim.json")
        pc.save({"format": pc.CLIENT_FORMAT, "ca": os.path.join(gateway["cdir"], "ca.pem"),
                 "cert": os.path.join(gateway["cdir"], "client.pem"), "key": os.path.join(gateway["cdir"], "client.key"),
                 "gateways": [["server0", "127.0.0.1:%d" % port], ["server1", gateway["addr"]],
                              ["server2", gateway["addr"]]]}, client_json)
        with sc.ShareClient(client_json, timeout_s=10) as victim:
            with pytest.raises(grpc.RpcError) as e:
                victim.calls[0]["Info"](b"{}", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_attack_revocation_withholds_the_output_of_a_call_already_in_progress(gateway):
    """Review 2 B4: the certificate was checked once, when Predict started; revoking it while the computation ran
    still delivered the output. Now the gateway checks the registry again before handing the output share."""
    w = _worker(gateway, answer=False)                     # the test completes the request itself
    ctl = FakeWorker(gateway["socket"])                    # a second backend connection, driven from here
    ch, calls = _stub(gateway, "client")
    done = calls["Predict"].future(_frame("rv-0", 1), timeout=20)
    _complete_when_seen(w, ctl, "rv-0")
    assert len(done.result()) > 0                          # control: a registered certificate gets its output
    pending = calls["Predict"].future(_frame("rv-1", 1), timeout=20)
    deadline = time.monotonic() + 10
    while "rv-1" not in w.seen:                            # the call is waiting inside the gateway
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert certs.main(["revoke", gateway["registry"], "client"]) == 0
    _complete_when_seen(w, ctl, "rv-1")
    with pytest.raises(grpc.RpcError) as e:
        pending.result()
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked while" in e.value.details()
    w.stop.set(), ch.close()


def _complete_when_seen(w, ctl, rid):
    deadline = time.monotonic() + 10
    while rid not in w.seen:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ctl.call({"op": "take", "id": rid})
    ctl.call({"op": "put", "id": rid, "output": "logit"}, {"share": np.zeros(1, np.int64)})


def test_the_ca_key_stays_out_of_the_service_directories(tmp_path):
    cdir, offline = str(tmp_path / "run" / "certs"), str(tmp_path / "offline")
    certs.init_local(cdir)
    assert not [f for f in os.listdir(cdir) if f.startswith("ca") and f.endswith(".key")]
    certs.init_local(str(tmp_path / "run2" / "certs"), ca_key_dir=offline)
    assert os.path.isfile(os.path.join(offline, "ca.key"))
    assert not os.path.exists(str(tmp_path / "run2" / "certs" / "ca.key"))
    # issuing later needs the offline key, and a gateway certificate is server-only, a client's client-only
    cpath, _ = certs.issue(str(tmp_path / "more"), "alice", "client", ca_dir=offline)
    from cryptography import x509
    eku = certs.load_cert(cpath).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    san = certs.load_cert(cpath).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alice.client.privtrain"]


# ------------------------------------------------------------------------------------------------ item 3
def _frame(rid, n):
    a = ring.random_ring((n, D))
    return ring.pack({"kind": "predict", "request_id": rid}, {"a": a, "b": ring.random_ring((n, D))})


def _worker(gw, answer=True):
    w = FakeWorker(gw["socket"], answer)
    w.start()
    deadline = time.monotonic() + 10
    ch, calls = _stub(gw, "client")
    while not _info(calls)["model_loaded"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ch.close()
    return w


def _refusal(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    return e.value.details()


@pytest.mark.parametrize("gateway", [{"rate_limit": {"rows_per_second": 1, "burst_rows": 100,
                                                     "min_rows_per_request": 10},
                                      "query_budget": {"rows_per_day": 10 ** 6}}], indirect=True)
def test_attack_one_large_request_costs_its_rows_against_the_rate_limit(gateway):
    w = _worker(gateway)
    ch, calls = _stub(gateway, "client")
    calls["Predict"](_frame("big-1", 100), timeout=10)               # 100 rows: the whole burst
    details = _refusal(lambda: calls["Predict"](_frame("big-2", 100), timeout=10))
    assert "rate limit of 1 rows/s" in details, details               # (it was one token per request)
    ch2, other = _stub(gateway, "client2")                            # another certificate has its own bucket
    other["Predict"](_frame("other-1", 100), timeout=10)
    w.stop.set(), ch.close(), ch2.close()


@pytest.mark.parametrize("gateway", [{"query_budget": {"rows_per_day": 250}}], indirect=True)
def test_attack_the_daily_query_budget_counts_rows_and_is_recorded(gateway):
    w = _worker(gateway)
    ch, calls = _stub(gateway, "client")
    for i in range(2):
        calls["Predict"](_frame("q-%d" % i, 100), timeout=10)        # 200 of 250 rows
    details = _refusal(lambda: calls["Predict"](_frame("q-2", 100), timeout=10))
    assert "used 200 of its 250 rows for today" in details, details
    assert _info(calls)["rows_used_today"] == 200
    calls["Predict"](_frame("q-3", 1), timeout=10)                     # what is left can still be spent
    ledger = json.load(open(gateway["cfg"]["parties"]["server0"]["budget"]))
    assert ledger["identities"]["client"]["rows"] == 201
    ch2, other = _stub(gateway, "client2")
    other["Predict"](_frame("o-1", 100), timeout=10)
    w.stop.set(), ch.close(), ch2.close()


@pytest.mark.parametrize("gateway", [{"query_budget": {"rows_per_day": 150}}], indirect=True)
def test_attack_a_service_restart_with_fresh_certificates_does_not_refresh_the_budget(gateway):
    """Review 2 B2/B3: a service start wiped parties/ (where the ledger was) and issued a fresh CA and fresh client
    certificates, and the ledger was keyed by certificate hash: every restart, or a re-issued certificate of the
    same name, gave a fresh daily budget. Now the ledger is keyed by the registered name and kept in budget/."""
    tmp = gateway["tmp"]
    w = _worker(gateway)
    ch, calls = _stub(gateway, "client")
    calls["Predict"](_frame("r-1", 100), timeout=10)
    assert "used 100 of its 150 rows" in _refusal(lambda: calls["Predict"](_frame("r-2", 100), timeout=10))
    w.stop.set(), ch.close()
    # The restart, as GatewayService.start does it without certs_dir: every directory it wipes goes (public/ is
    # copied from the model again), then a fresh CA issues new certificates under the same names.
    _kill(gateway["proc"])
    public = open(tmp / "public" / mf.MODEL_JSON, "rb").read(), open(tmp / "public" / mf.PREPROCESSING_JSON, "rb").read()
    for sub in service.WIPED_AT_START + ("certs",):
        shutil.rmtree(str(tmp / sub), ignore_errors=True)
    os.makedirs(str(tmp / "public"))
    (tmp / "public" / mf.MODEL_JSON).write_bytes(public[0])
    (tmp / "public" / mf.PREPROCESSING_JSON).write_bytes(public[1])
    old_fp = certs.fingerprint(certs.load_cert(os.path.join(gateway["offline"], "ca.pem")))
    certs.init_local(gateway["cdir"], ("client", "client2"), ca_key_dir=str(tmp / "offline-ca-2"))
    os.makedirs(gateway["cfg"]["parties"]["server0"]["dir"], mode=0o700)
    _launch(gateway)
    assert certs.fingerprint(certs.load_cert(os.path.join(gateway["cdir"], "ca.pem"))) != old_fp
    w = _worker(gateway)
    ch, calls = _stub(gateway, "client")                      # the new certificate of the same identity
    assert _info(calls)["rows_used_today"] == 100
    assert "used 100 of its 150 rows" in _refusal(lambda: calls["Predict"](_frame("r-3", 100), timeout=10))
    calls["Predict"](_frame("r-4", 1), timeout=10)            # what is left can still be spent
    w.stop.set(), ch.close()


def test_an_unreadable_budget_ledger_stops_the_gateway(gateway):
    """Fail closed (review 2 B2): the gateway used to start with an empty ledger when budget.json was unreadable."""
    _kill(gateway["proc"])
    os.makedirs(os.path.dirname(gateway["cfg"]["parties"]["server0"]["budget"]), exist_ok=True)
    with open(gateway["cfg"]["parties"]["server0"]["budget"], "w") as f:
        f.write("{ not json")
    os.remove(os.path.join(gateway["cfg"]["parties"]["server0"]["dir"], "gateway.ready"))
    proc = _launch(gateway, wait=False)
    assert proc.wait(60) == 2
    lines = [l for l in open(gateway["log"]).read().splitlines() if "budget" in l]
    assert lines and "cannot read the query-budget ledger" in lines[-1] and "refusing to start" in lines[-1], lines


@pytest.mark.parametrize("gateway", [{"in_flight": {"requests": 2, "bytes": 10000}}], indirect=True)
def test_attack_one_certificate_cannot_pile_up_requests_or_share_bytes(gateway):
    w = _worker(gateway, answer=False)        # nothing completes: submissions stay in flight (shares in memory)
    ch, calls = _stub(gateway, "client")
    calls["Submit"](_frame("f-1", 100), timeout=10)                   # 6400 bytes of shares
    assert "bytes of shares in flight" in _refusal(lambda: calls["Submit"](_frame("f-2", 100), timeout=10))
    calls["Submit"](_frame("f-3", 1), timeout=10)
    assert "2 request(s) in flight" in _refusal(lambda: calls["Submit"](_frame("f-4", 1), timeout=10))
    ch2, other = _stub(gateway, "client2")                             # others are admitted meanwhile
    other["Submit"](_frame("o-1", 1), timeout=10)
    w.stop.set(), ch.close(), ch2.close()


def test_a_cancelled_call_frees_its_in_flight_slot(gateway):
    """A client whose call at another party failed cancels the others; the gateway withdraws that request at once.
    (Stranded requests used to hold the identity's in-flight slots until the janitor's timeout, so that after a
    gateway restart the three parties' admissions could refuse a client in turn for minutes.)"""
    w = _worker(gateway, answer=False)        # nothing completes: a call waits for its result until cancelled
    ch, calls = _stub(gateway, "client")
    for i in range(2):
        fut = calls["Predict"].future(_frame("c-%d" % i, 1), timeout=30)
        time.sleep(0.5)                       # admitted and waiting
        fut.cancel()
    deadline = time.monotonic() + 10
    while True:                               # both slots come back within a moment, not after the timeout
        fut = calls["Predict"].future(_frame("c-new-%d" % time.monotonic_ns(), 1), timeout=30)
        time.sleep(0.5)
        if not fut.done():
            break                             # admitted: waiting for its result
        assert "in flight" in str(fut.exception()) and time.monotonic() < deadline, fut.exception()
    fut.cancel()
    w.stop.set(), ch.close()


def test_the_driver_serves_certificates_in_turn():
    """One client's queue of batches must not starve another's (issue 19 item 3: the victim's latency went from
    44 ms to 1,868 ms behind a noisy client): the driver runs the pending requests round-robin over certificates."""
    from encrypted_serving.driver import Driver
    cfg = {"request_timeout_s": 5, "tf": {n: "127.0.0.1:1" for n in pc.PARTY_NAMES + (pc.DRIVER,)}}
    d = Driver(cfg)
    d.pending = {}
    for i in range(6):                                     # the noisy client's six batches arrive first
        d.pending["noisy-%d" % i] = {"first": float(i), "parts": {0: {"owner": "aaaa"}}}
    d.pending["victim-0"] = {"first": 10.0, "parts": {0: {"owner": "bbbb"}}}
    order = [rid for rid, _ in d._in_turn()]
    assert order.index("victim-0") <= 1, order             # (it was served after all six: insertion order)
    assert [r for r in order if r.startswith("noisy")] == ["noisy-%d" % i for i in range(6)]


def test_attack_overflowing_frame_shapes_are_refused_as_malformed(gateway):
    """Review 2 B6: np.prod of a shape such as [2**62, 4] wrapped around to 0, so the element cap was skipped and
    the reshape raised a ValueError the gateway did not expect (the client got UNKNOWN). Now: INVALID_ARGUMENT."""
    w = _worker(gateway)
    ch, calls = _stub(gateway, "client")
    for shape in ([2 ** 62, 4], [2 ** 64, 1], [2 ** 32, 2 ** 32], [0, 2 ** 40], [1] * 40):
        h = json.dumps({"kind": "predict", "request_id": "x", "arrays": [{"name": "a", "dtype": "<i8",
                                                                          "shape": shape}]}).encode()
        with pytest.raises(grpc.RpcError) as e:
            calls["Predict"](ring.MAGIC + struct.pack("<I", len(h)) + h, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "invalid shape" in e.value.details(), shape
        with pytest.raises(ring.FrameError):
            ring.unpack(ring.MAGIC + struct.pack("<I", len(h)) + h)
    calls["Predict"](_frame("ok-1", 1), timeout=10)        # control: a well-formed frame is still served
    w.stop.set(), ch.close()


def test_attack_one_request_cannot_combine_shares_from_different_certificates(gateway):
    """Review 2 B7: the driver combined the three parties' submissions of a request id without asking who sent
    them, so shares submitted by different certificates made one request. Now it refuses that request. The
    owners come from a real gateway's wait reply (what the driver polls)."""
    from encrypted_serving import driver
    w = _worker(gateway, answer=False)
    seen = {}
    for name in ("client", "client2"):
        ch, calls = _stub(gateway, name)
        calls["Submit"](_frame("mix-" + name, 1), timeout=10)
        ch.close()
    ctl = FakeWorker(gateway["socket"])
    head, _ = ctl.call({"op": "wait", "since": 0, "timeout_ms": 100, "model_loaded": True})
    for item in head["ready"]:
        seen[item["id"]] = item
    a, b = seen["mix-client"], seen["mix-client2"]
    assert a["owner"] != b["owner"]
    same = {i: dict(a, digests=["d", "d"]) for i in range(3)}   # replicated shares agree: only owners may differ
    assert driver.inconsistent(same) == ""                  # control: one submitter at every party
    mixed = dict(same)
    mixed[2] = dict(b, digests=["d", "d"])                  # party 2's share of the request came from client2
    assert "different certificates" in driver.inconsistent(mixed)
    w.stop.set()


@pytest.mark.parametrize("gateway", [{"threads": {"workers": 4, "reserve": 2},
                                      "in_flight": {"requests": 5, "bytes": 1 << 20}}], indirect=True)
def test_attack_waiting_calls_cannot_occupy_the_whole_thread_pool(gateway):
    """16 Predict calls used to hold all 16 gateway threads for 31 s (Info and Submit of everyone else queued):
    now calls waiting for results may use all threads but a reserve, and the rest answer at once."""
    w = _worker(gateway, answer=False)                     # nothing completes: every Predict waits
    ch, calls = _stub(gateway, "client")
    pending = [calls["Predict"].future(_frame("w-%d" % i, 1), timeout=30) for i in range(2)]
    deadline = time.monotonic() + 10
    while len(w.seen) < 2:                                 # both are waiting inside the gateway
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ch2, other = _stub(gateway, "client2")
    assert "is busy" in _refusal(lambda: other["Predict"](_frame("w-x", 1), timeout=10))
    t0 = time.monotonic()
    other["Submit"](_frame("s-1", 1), timeout=10)          # the reserve still answers, promptly
    assert _info(other)["party"] == "server0" and time.monotonic() - t0 < 5
    for f in pending:
        f.cancel()
    w.stop.set(), ch.close(), ch2.close()


def test_attack_merged_requests_each_output_goes_only_to_its_own_certificate(gateway):
    """Cross-request batching (issue 19 speed goals): the worker takes two certificates' requests in one call and
    puts one merged output share back; each submitter gets exactly its own rows, the other certificate gets nothing
    of it, and the rows stay charged per certificate."""
    w = FakeWorker(gateway["socket"])                      # not started: this test drives the backend itself
    w.call({"op": "wait", "since": 0, "timeout_ms": 1, "model_loaded": True})
    ch, mine = _stub(gateway, "client")
    ch2, other = _stub(gateway, "client2")
    fa, fb = _frame("m-a", 1), _frame("m-b", 1)
    mine["Submit"](fa, timeout=10)
    other["Submit"](fb, timeout=10)
    head, arrays = w.call({"op": "take", "ids": ["m-a", "m-b"]})
    assert head["rows"] == [1, 1]                          # both pairs, concatenated in the driver's order
    np.testing.assert_array_equal(arrays["a"], np.concatenate([ring.unpack(fa)[1]["a"], ring.unpack(fb)[1]["a"]]))
    again, _ = w.call({"op": "take", "ids": ["m-b"]})
    assert "already taken" in again["error"]               # handed over once, merged or not
    head, _ = w.call({"op": "put", "ids": ["m-a", "m-b"], "rows": [1, 1], "output": "logit"},
                     {"share": np.array([7, 9], np.int64)})
    assert head["ok"] is True and "error" not in head
    fetch = lambda calls, rid: calls["Fetch"](json.dumps({"request_id": rid}).encode(), timeout=10)  # noqa: E731
    with pytest.raises(grpc.RpcError) as e:
        fetch(other, "m-a")                                 # client2 cannot read client's row of the merged run
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ring.unpack(fetch(mine, "m-a"))[1]["share"].tolist() == [7]
    assert ring.unpack(fetch(other, "m-b"))[1]["share"].tolist() == [9]
    ledger = json.load(open(gateway["cfg"]["parties"]["server0"]["budget"]))
    assert sorted((k, v["rows"]) for k, v in ledger["identities"].items()) == [("client", 1), ("client2", 1)]
    ch.close(), ch2.close(), w.sock.close()


def test_the_driver_merges_concurrent_small_requests_in_turn():
    """Concurrent batch-1 requests of several certificates share one program run (cross-request batching), in the
    certificates-in-turn order, up to merge_rows rows; large batches and model loads run alone."""
    from encrypted_serving.driver import Driver
    cfg = {"request_timeout_s": 5, "batch_sizes": [1, 100], "merge_rows": 4,
           "tf": {n: "127.0.0.1:1" for n in pc.PARTY_NAMES + (pc.DRIVER,)}}
    d = Driver(cfg)
    ready = [("a%d" % i, {}, "predict", 1) for i in range(6)] + [("big", {}, "predict", 100), ("m", {}, "model", 0)]
    runs = [([r for r, _ in g], kind, n) for g, kind, n in d._runs(ready)]
    assert runs == [(["a0", "a1", "a2", "a3"], "predict", 4), (["a4", "a5"], "predict", 4),
                    (["big"], "predict", 100), (["m"], "model", 0)]
    assert [g for g, _, _ in d._runs([("one", {}, "predict", 1)])] == [[("one", {})]]   # alone: its own program
    d.c["merge_rows"] = 0                                  # batching off: one run per request
    assert len(list(d._runs(ready[:3]))) == 3


def test_an_earlier_ledger_keyed_by_certificate_is_carried_over_per_identity(tmp_path):
    """The ledger used to be keyed by certificate fingerprint: today's rows of every certificate of one name
    carry over to that identity (two certificates of 'client' spent 30 + 40 rows), earlier days do not."""
    from encrypted_serving.gateway import DailyBudget
    today = DailyBudget.today()
    path = str(tmp_path / "budget.json")
    with open(path, "w") as f:
        json.dump({"aa" * 32: {"day": today, "rows": 30, "name": "client"},
                   "bb" * 32: {"day": today, "rows": 40, "name": "client"},
                   "cc" * 32: {"day": "2000-01-01", "rows": 99, "name": "client2"}}, f)
    b = DailyBudget(path, 100)
    assert (b.used("client"), b.used("client2")) == (70, 0)
    assert "used 70 of its 100 rows" in b.charge("client", 31)
    assert b.charge("client", 30) is None
    assert json.load(open(path))["identities"]["client"]["rows"] == 100
    for bad in ({"format": "privtrain-query-budget/1", "identities": {"client": {"day": today, "rows": "x"}}},
                {"format": "other"}, [1, 2]):
        with open(path, "w") as f:
            json.dump(bad, f)
        with pytest.raises(ValueError, match="refusing to start"):          # BudgetError: fail closed
            DailyBudget(path, 100)


def test_the_service_refuses_to_start_on_an_unreadable_ledger_in_one_line(tmp_path, adult_model_dir):
    """GatewayService.start checks every party's ledger before it starts anything (review 2 B2, fail closed)."""
    svc = service.GatewayService(adult_model_dir, run_dir=str(tmp_path / "run"), isolation="none")
    os.makedirs(os.path.dirname(svc.budget_path("server1")))
    with open(svc.budget_path("server1"), "w") as f:
        f.write("[1, 2")
    with pytest.raises(service.EncryptedServiceError) as e:
        svc.start()
    assert "\n" not in str(e.value) and "cannot read the query-budget ledger" in str(e.value), e.value
    assert not svc.procs and os.path.isfile(svc.budget_path("server1"))     # nothing started, the ledger kept
