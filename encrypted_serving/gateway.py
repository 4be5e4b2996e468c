"""A party's share gateway (runs on the party's host, outside the TF cluster's network): gRPC + mutual TLS.

    python -m encrypted_serving.gateway --config parties.json --party server1

Public side (clients and the model owner, certificates signed by the service CA, registered in the
service's registry.json and not revoked there; role = the cert's OU, pinned by the registry):

* ``Info``   -> the public model description (model.json, preprocessing.json), output policy, limits.
* ``Submit`` -> a frame holding this party's replicated share pair (``a`` = s_i, ``b`` = s_{i+1}) of a
  batch (role ``client``, kind ``predict``) or of every weight array (role ``model-owner``, kind ``model``).
  Checked: role, request id, dtype, shapes, lengths, batch size; then per registered identity (the registry's
  name of the certificate): requests and bytes in flight, rows against the rate limit (a request costs its rows,
  at least ``min_rows_per_request``) and against the daily query budget (rows per UTC day, recorded in the
  party's ledger, which outlives restarts).
* ``Fetch``  -> this party's share of the request's output, **only to the certificate that submitted it**, and
  only while that certificate is still registered and not revoked (checked again when the output is ready).
* ``Predict`` -> ``Submit`` + wait + the output share on the same call (what the client library uses).

Private side: a Unix socket in the party's own directory, accepted only from processes in the TF cluster's
network namespace (local mode) or of the same user (multi-host), used by this party's compute worker
(``encrypted_serving.worker``): ``wait`` (new submissions, long poll), ``take`` (the shares, handed once
into the fixed program), ``put`` (the output share), ``fail``, ``hb`` (heartbeat). Nothing is written to
disk: shares live in this process's memory until fetched or expired.

Pure Python (grpcio, numpy, cryptography): no TF, no platform import.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from concurrent import futures
from typing import Dict, Optional

import grpc
import numpy as np

from encrypted_serving import certs
from encrypted_serving import parties as pc
from encrypted_serving import ring

SERVICE = "privtrain.ShareGateway"
MAX_MSG = 64 * 1024 * 1024
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MSG), ("grpc.max_send_message_length", MAX_MSG)]
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,80}$")


def log(party, msg):
    sys.stderr.write("[gateway %s pid=%d] %s\n" % (party, os.getpid(), msg))
    sys.stderr.flush()


def _ident(x):
    return x


class Request:
    __slots__ = ("id", "owner", "owner_name", "kind", "n", "arrays", "seq", "created", "state", "result",
                 "error", "event", "digests", "nbytes")

    def __init__(self, rid, owner, owner_name, kind, n, arrays, seq, digests):
        self.id, self.owner, self.owner_name, self.kind, self.n = rid, owner, owner_name, kind, n
        self.arrays, self.seq, self.digests = arrays, seq, digests
        self.nbytes = 0
        self.created = time.monotonic()
        self.state = "submitted"
        self.result = None
        self.error = None
        self.event = threading.Event()


class TokenBucket:
    """Per-certificate token bucket whose tokens are rows (a request costs its rows, at least min_cost)."""

    def __init__(self, rate: float, burst: float, min_cost: float = 1.0):
        self.rate, self.burst, self.min_cost = float(rate), float(burst), float(min_cost)
        self.buckets: Dict[str, list] = {}
        self.lock = threading.Lock()

    def allow(self, key: str, rows: float = 1.0) -> bool:
        cost = max(float(rows), self.min_cost)
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < cost:
                self.buckets[key] = [tokens, now]
                return False
            self.buckets[key] = [tokens - cost, now]
            return True


LEDGER_FORMAT = "privtrain-query-budget/1"


class BudgetError(ValueError):
    """The query-budget ledger exists but cannot be read: the gateway does not start (fail closed)."""


class DailyBudget:
    """Rows per registered identity (the name the certificate registry holds) per UTC day, recorded in a JSON
    ledger that outlives restarts: re-issuing a certificate under the same name does not refresh the budget.

    The ledger is this party's own file (``parties.<party>.budget``; the local service keeps it in
    ``<run>/budget/``, which a service start does not wipe); each of the three gateways charges every request it
    accepts, so a client cannot spend more than rows_per_day at any of them. A missing ledger starts empty; one
    that cannot be read or parsed stops the gateway rather than forget what was spent."""

    def __init__(self, path: str, rows_per_day: int):
        self.path, self.limit, self.lock = path, int(rows_per_day), threading.Lock()
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            data = {"format": LEDGER_FORMAT, "identities": {}}
        except (OSError, ValueError) as e:
            raise BudgetError("cannot read the query-budget ledger %s (%s): refusing to start rather than reset "
                              "every client's budget; restore the file (deleting it resets all budgets)"
                              % (path, getattr(e, "strerror", None) or e)) from None
        self.ledger = self._identities(data)

    def _identities(self, data) -> dict:
        def entry(e):
            if not (isinstance(e, dict) and isinstance(e.get("day"), str) and isinstance(e.get("rows"), int)
                    and not isinstance(e.get("rows"), bool) and e["rows"] >= 0):
                raise BudgetError("%s: a ledger entry is not {day, rows}: refusing to start; restore the file"
                                  % self.path)
            return e
        if isinstance(data, dict) and data.get("format") == LEDGER_FORMAT and isinstance(data.get("identities"), dict):
            return {who: entry(e) for who, e in data["identities"].items()}
        if isinstance(data, dict) and "format" not in data and all(
                isinstance(e, dict) and isinstance(e.get("name"), str) for e in data.values()):
            out = {}       # the earlier ledger, keyed by certificate fingerprint: today's rows summed per name
            for e in map(entry, data.values()):
                if e["day"] == self.today():
                    out[e["name"]] = {"day": e["day"], "rows": out.get(e["name"], {}).get("rows", 0) + e["rows"]}
            return out
        raise BudgetError("%s is not a query-budget ledger (format %r): refusing to start; restore the file"
                          % (self.path, LEDGER_FORMAT))

    @staticmethod
    def today() -> str:
        return time.strftime("%Y-%m-%d", time.gmtime())

    def used(self, who: str) -> int:
        e = self.ledger.get(who)
        return int(e["rows"]) if e and e.get("day") == self.today() else 0

    def charge(self, who: str, rows: int) -> Optional[str]:
        """Charge rows to the identity `who`, or return why not (nothing charged)."""
        with self.lock:
            used = self.used(who)
            if used + rows > self.limit:
                return ("identity %r has used %d of its %d rows for today (UTC %s); this request needs %d more: "
                        "retry tomorrow or ask the operator for a larger query budget"
                        % (who, used, self.limit, self.today(), rows))
            ledger = dict(self.ledger, **{who: {"day": self.today(), "rows": used + rows}})
            tmp = self.path + ".tmp"
            try:
                os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
                with open(tmp, "w") as f:
                    json.dump({"format": LEDGER_FORMAT, "identities": ledger}, f)
                os.replace(tmp, self.path)
            except OSError as e:     # not recorded: not admitted
                return "the query budget cannot be recorded (%s: %s); request refused" % (self.path, e.strerror)
            self.ledger = ledger
            return None


class Gateway:
    def __init__(self, config: dict, party: str, fault_file: Optional[str] = None):
        from encrypted_serving import model_format as mf
        self.c, self.party = config, party
        self.fault_file = fault_file
        from encrypted_serving import bounds
        self.model = mf.load_config(config["public_dir"])
        bounds.check(self.model)        # a model without a valid truncation certificate is not served
        with open(os.path.join(config["public_dir"], mf.PREPROCESSING_JSON)) as f:
            self.preprocessing = json.load(f)
        self.weight_shapes = {}
        fan = self.model["input_dim"]
        for i, layer in enumerate(self.model["layers"]):
            self.weight_shapes[mf.kernel_key(i)] = [fan, layer["units"]]
            self.weight_shapes[mf.bias_key(i)] = [layer["units"]]
            fan = layer["units"]
        self.requests: Dict[str, Request] = {}
        self.cond = threading.Condition()
        self.seq = 0
        self.last_hb = None
        self.last_wait = None
        self.model_loaded = False
        self.stopping = None
        rl = config["rate_limit"]
        self.bucket = TokenBucket(rl["rows_per_second"], rl["burst_rows"], rl["min_rows_per_request"])
        self.budget = DailyBudget(pc.budget_ledger(config, party), config["query_budget"]["rows_per_day"])
        self.in_flight = config["in_flight"]
        self.admit = threading.Lock()
        th = config["threads"]
        self.workers, self.max_waiting, self.waiting = int(th["workers"]), int(th["workers"]) - int(th["reserve"]), 0
        self._cert_cache: Dict[bytes, tuple] = {}
        self.registry = certs.Registry(config["registry"])
        netns = config.get("netns")
        self.netns_ino = os.stat(netns).st_ino if netns else None   # /proc/<pid>/ns/net of the cluster

    # ------------------------------------------------------------------ identity
    def _peer(self, context):
        ac = context.auth_context()
        pem = (ac.get("x509_pem_cert") or [None])[0]
        if not pem:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate signed by the service CA is required")
        hit = self._cert_cache.get(pem)
        if hit is None:
            from cryptography import x509
            cert = x509.load_pem_x509_certificate(pem)
            hit = (certs.fingerprint_pem(pem), certs.role_of(cert), certs.name_of(cert))
            self._cert_cache[pem] = hit
        why = self.registry.check(*hit)     # registered, not revoked, role as registered (re-read on change)
        if why:
            log(self.party, "refused %r: %s" % (hit[2], why))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        entry = self.registry.lookup(hit[0]) or {}
        return hit[0], hit[1], entry.get("name", hit[2])     # the registered identity: what limits are charged to

    # ------------------------------------------------------------------ public RPCs
    def info(self, request: bytes, context) -> bytes:
        fp, role, name = self._peer(context)
        return json.dumps({"party": self.party, "model": self.model, "preprocessing": self.preprocessing,
                           "output": self.c["output"], "max_batch": self.c["max_batch"],
                           "batch_sizes": self.c["batch_sizes"],
                           "rate_limit": self.c["rate_limit"], "query_budget": self.c["query_budget"],
                "rows_used_today": self.budget.used(name), "in_flight": self.in_flight,
                "model_loaded": self.model_loaded,
                           "you": {"name": name, "role": role}}).encode()

    def submit(self, request: bytes, context) -> bytes:
        rid = self._accept(request, context)
        return json.dumps({"accepted": rid, "party": self.party}).encode()

    def predict(self, request: bytes, context) -> bytes:
        """Submit + Fetch in one call (one round trip less); the result goes back on the submitting call."""
        with self._waiting_slot(context):
            rid = self._accept(request, context)
            # A call that ends without its result (the client cancelled it, e.g. because another party refused
            # or was unreachable) withdraws a request not yet taken: it would otherwise hold the identity's
            # in-flight slot until the janitor's timeout, and admission at the three parties could livelock.
            context.add_callback(lambda: self._withdraw(rid))
            return self._result(rid, context)

    def _withdraw(self, rid: str) -> None:
        with self.cond:
            req = self.requests.get(rid)
            if req is not None and req.state == "submitted":
                self._fail(req, "request %r was withdrawn: its call ended before it was computed" % rid)

    @contextlib.contextmanager
    def _waiting_slot(self, context):
        """Calls that wait for a result hold a worker thread: at most `waiting` of them at once, so that the
        pool's other threads always answer Info/Submit (16 waiting calls used to occupy the whole pool)."""
        with self.admit:
            if self.waiting >= self.max_waiting:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              "party %s is busy: %d calls are already waiting for results (limit %d); retry shortly"
                              % (self.party, self.waiting, self.max_waiting))
            self.waiting += 1
        try:
            yield
        finally:
            with self.admit:
                self.waiting -= 1

    def _accept(self, request: bytes, context) -> str:
        fp, role, name = self._peer(context)
        if self.stopping:
            context.abort(grpc.StatusCode.UNAVAILABLE, "party %s is stopping: %s" % (self.party, self.stopping))
        try:
            header, arrays = ring.unpack(request)
        except ring.FrameError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed share for party %s: %s" % (self.party, e))
        kind, rid = header.get("kind"), header.get("request_id")
        if not isinstance(rid, str) or not _ID.match(rid):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id must be 1-80 characters of [A-Za-z0-9_.:-]")
        if kind == "predict":
            if role != "client":
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              "certificate %r has role %r; predictions need a client certificate" % (name, role))
            if not self.model_loaded:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no model has been loaded into the service yet")
            d = self.model["input_dim"]
            if set(arrays) != {"a", "b"}:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a prediction frame holds exactly arrays 'a' and 'b' "
                              "(this party's share pair), got %s" % sorted(arrays))
            a, b = arrays["a"], arrays["b"]
            if a.ndim != 2 or a.shape != b.shape or a.shape[1] != d:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "share shape must be [n, %d] for both arrays, got %s "
                              "and %s (wrong length)" % (d, list(a.shape), list(b.shape)))
            n = int(a.shape[0])
            if n not in self.c["batch_sizes"]:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch size must be one of %s (pad the batch), got %d"
                              % (self.c["batch_sizes"], n))
            digests = [ring.digest(a), ring.digest(b)]
        elif kind == "model":
            if role != "model-owner":
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              "certificate %r has role %r; only the model owner may upload weights" % (name, role))
            want = {k + s: v for k, v in self.weight_shapes.items() for s in ("/a", "/b")}
            got = {k: list(v.shape) for k, v in arrays.items()}
            if got != want:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "weight shares do not match model.json: expected %s, "
                              "got %s" % (want, got))
            n = 0
            digests = [ring.digest(np.concatenate([arrays[k + "/a"].ravel() for k in self.weight_shapes])),
                       ring.digest(np.concatenate([arrays[k + "/b"].ravel() for k in self.weight_shapes]))]
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "kind must be 'predict' or 'model', got %r" % (kind,))
        nbytes = sum(int(v.nbytes) for v in arrays.values())
        with self.admit:        # in-flight caps, then rows against the rate limit and the daily budget
            if kind == "predict":
                why = self._admission(fp, name, n, nbytes)
                if why:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
            with self.cond:
                if rid in self.requests:
                    context.abort(grpc.StatusCode.ALREADY_EXISTS, "request id %r is already in use" % rid)
                self.seq += 1
                req = self.requests[rid] = Request(rid, fp, name, kind, n, arrays, self.seq, digests)
                req.nbytes = nbytes
                self.cond.notify_all()
        return rid

    def _admission(self, fp: str, name: str, n: int, nbytes: int) -> Optional[str]:
        with self.cond:
            mine = [r for r in self.requests.values() if r.owner_name == name and r.state in ("submitted", "taken")]
        cap_n, cap_b = int(self.in_flight["requests"]), int(self.in_flight["bytes"])
        if len(mine) >= cap_n:
            return ("identity %r already has %d request(s) in flight at party %s (limit %d): wait for their "
                    "results before sending more" % (name, len(mine), self.party, cap_n))
        held = sum(r.nbytes for r in mine)
        if held + nbytes > cap_b:
            return ("identity %r would hold %d bytes of shares in flight at party %s (limit %d): wait for "
                    "earlier results or send smaller batches" % (name, held + nbytes, self.party, cap_b))
        if self.budget.used(name) + n > self.budget.limit:      # per identity, not per certificate
            return self.budget.charge(name, n)
        if not self.bucket.allow(name, n):
            return ("rate limit of %g rows/s (burst %g rows, at least %g rows per request) exceeded for identity "
                    "%r; retry later" % (self.bucket.rate, self.bucket.burst, self.bucket.min_cost, name))
        return self.budget.charge(name, n)

    def fetch(self, request: bytes, context) -> bytes:
        fp, role, name = self._peer(context)
        try:
            rid = json.loads(request.decode())["request_id"]
        except (ValueError, KeyError, UnicodeDecodeError, TypeError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fetch needs a JSON object with request_id")
        with self.cond:
            req = self.requests.get(rid)
        if req is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no request %r at party %s (expired, fetched, or never "
                          "submitted here)" % (rid, self.party))
        if req.owner != fp:
            log(self.party, "refused fetch of %s by %r (submitted by %r)" % (rid, name, req.owner_name))
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "request %r was submitted with another certificate; outputs go only to their submitter" % rid)
        with self._waiting_slot(context):
            return self._result(rid, context)

    def _result(self, rid: str, context) -> bytes:
        with self.cond:
            req = self.requests.get(rid)
        if req is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "request %r expired" % rid)
        # The driver fails a stuck request (naming the party) within request_timeout plus its diagnosis.
        timeout = float(self.c["request_timeout_s"]) + 10.0
        if not req.event.wait(timeout):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "party %s: no result for %r within %.0fs; %s"
                          % (self.party, rid, timeout, self.diagnose()))
        with self.cond:
            self.requests.pop(rid, None)
        if req.error:
            context.abort(grpc.StatusCode.ABORTED, req.error)
        entry = self.registry.lookup(req.owner)     # revoked (or unregistered) while the request ran: no output
        if entry is None or entry.get("revoked"):
            log(self.party, "withheld the output of %s: %r was revoked while it ran" % (rid, req.owner_name))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate %r was revoked while request %r ran: its "
                          "output is withheld; ask the operator for a new certificate" % (req.owner_name, rid))
        return req.result

    def diagnose(self) -> str:
        now = time.monotonic()
        if self.last_hb is None:
            return "this party's compute worker never connected"
        if now - self.last_hb > 3.0:
            return "party %s's compute worker has not answered for %.1fs (stopped, wedged or dead)" % (
                self.party, now - self.last_hb)
        if self.last_wait is None or now - self.last_wait > 3.0:
            return "the driver has not polled party %s for a while (driver or another party stuck)" % self.party
        return "the computation did not finish in time (another party may be slow or missing the request)"

    # ------------------------------------------------------------------ backend (compute worker)
    def _backend_allowed(self, conn) -> Optional[str]:
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.getuid():
            return "uid %d" % uid
        if self.netns_ino is not None:
            try:
                ino = os.stat("/proc/%d/ns/net" % pid).st_ino
            except OSError:
                return "pid %d (namespace unknown)" % pid
            if ino != self.netns_ino:
                return "pid %d outside the service's network namespace" % pid
        return None

    def serve_backend(self, path: str):
        if os.path.exists(path):
            os.remove(path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        os.chmod(path, 0o600)
        srv.listen(16)
        while True:
            conn, _ = srv.accept()
            why = self._backend_allowed(conn)
            if why:
                log(self.party, "refused backend connection from %s" % why)
                conn.close()
                continue
            threading.Thread(target=self._backend_conn, args=(conn,), daemon=True).start()

    def _backend_conn(self, conn):
        try:
            while True:
                head = ring.recv_exact(conn, 8)
                if head is None:
                    return
                (length,) = struct.unpack("<Q", head)
                header, arrays = ring.unpack(ring.recv_exact(conn, length))
                reply = self._backend_op(header, arrays)
                conn.sendall(struct.pack("<Q", len(reply)) + reply)
        except (OSError, ring.FrameError) as e:
            log(self.party, "backend connection closed: %s" % e)
        finally:
            conn.close()

    def _backend_op(self, header, arrays) -> bytes:
        op = header.get("op")
        if op == "hb":
            self.last_hb = time.monotonic()
            return ring.pack({"ok": True})
        if op == "wait":
            self.last_wait = time.monotonic()
            self.model_loaded = bool(header.get("model_loaded", self.model_loaded))
            since, deadline = int(header.get("since", 0)), time.monotonic() + header.get("timeout_ms", 200) / 1000.0
            with self.cond:
                while True:
                    ready = [r for r in self.requests.values() if r.seq > since and r.state == "submitted"]
                    left = deadline - time.monotonic()
                    if ready or left <= 0 or self.stopping:
                        break
                    self.cond.wait(left)
                # owner: the submitting certificate's fingerprint, so that the driver serves certificates in turn
                # and refuses a request whose shares came from different certificates
                out = [{"id": r.id, "kind": r.kind, "n": r.n, "digests": r.digests, "seq": r.seq,
                        "owner": r.owner} for r in ready]
                return ring.pack({"seq": self.seq, "ready": out})
        if "ids" in header and op in ("take", "put"):
            return self._backend_many(op, header, arrays)
        rid = header.get("id")
        with self.cond:
            req = self.requests.get(rid)
        if req is None:
            return ring.pack({"error": "no request %r at party %s (gateway restarted or request expired)" % (rid, self.party)})
        if op == "take":
            if req.state != "submitted":
                return ring.pack({"error": "request %r was already taken" % rid})
            req.state = "taken"
            arrays, req.arrays = req.arrays, None     # handed over once; not kept
            return ring.pack({"ok": True}, arrays)
        if op == "put":
            self._put(req, header.get("output"), arrays)
            return ring.pack({"ok": True})
        if op == "fail":
            self._fail(req, header.get("error", "failed"))
            return ring.pack({"ok": True})
        return ring.pack({"error": "unknown op %r" % op})

    def _put(self, req, output, arrays):
        req.result = ring.pack({"request_id": req.id, "party": self.party, "kind": req.kind, "output": output}, arrays)
        req.state = "done"
        if req.kind == "model":
            self.model_loaded = True
        req.event.set()

    def _backend_many(self, op, header, arrays) -> bytes:
        """Cross-request batching (the driver merged several clients' requests into one program run): take the
        share pairs of all `ids` at once (rows concatenated in that order), or put each request's rows of the
        output share back under its own id, so that each submitter fetches only its own rows."""
        ids = header.get("ids")
        with self.cond:
            reqs = [self.requests.get(rid) for rid in ids] if isinstance(ids, list) else []
        missing = [rid for rid, r in zip(ids or [], reqs) if r is None or r.kind != "predict"]
        if not reqs or missing:
            return ring.pack({"error": "no prediction request %r at party %s (gateway restarted or request expired)"
                              % ((missing or [ids])[0], self.party)})
        if op == "take":
            with self.cond:
                taken = [r.id for r in reqs if r.state != "submitted"]
                if taken:
                    return ring.pack({"error": "request %r was already taken" % taken[0]})
                for r in reqs:
                    r.state = "taken"
                parts = [(r.arrays, r.n) for r in reqs]
                for r in reqs:
                    r.arrays = None                   # handed over once; not kept
            return ring.pack({"ok": True, "rows": [n for _, n in parts]},
                             {"a": np.concatenate([p["a"] for p, _ in parts]),
                              "b": np.concatenate([p["b"] for p, _ in parts])})
        rows, share = header.get("rows"), arrays.get("share")
        if rows != [r.n for r in reqs] or share is None or share.shape[0] != sum(rows):
            return ring.pack({"error": "merged output does not match the requests' rows"})
        at = 0
        for r, n in zip(reqs, rows):
            self._put(r, header.get("output"), {"share": share[at:at + n].copy()})
            at += n
        return ring.pack({"ok": True})

    def _fail(self, req, message):
        req.arrays = None
        req.error = message
        req.state = "failed"
        req.event.set()

    def janitor(self):
        ttl = 2 * float(self.c["request_timeout_s"]) + 10
        while True:
            time.sleep(1.0)
            now = time.monotonic()
            with self.cond:
                for rid, r in list(self.requests.items()):
                    # the driver fails incomplete or stuck requests (naming the party) after request_timeout_s;
                    # this is the backstop when the driver itself is gone
                    if r.state == "submitted" and now - r.created > float(self.c["request_timeout_s"]) + 10.0:
                        self._fail(r, "party %s: request %r was not computed within %.0fs; %s"
                                   % (self.party, rid, float(self.c["request_timeout_s"]) + 10, self.diagnose()))
                    if now - r.created > ttl:
                        self.requests.pop(rid, None)

    def stop_all(self, reason):
        self.stopping = reason
        with self.cond:
            for r in self.requests.values():
                if not r.event.is_set():
                    self._fail(r, "service stopped: %s" % reason)
            self.cond.notify_all()


def server_credentials(c: dict, party: str):
    p = c["parties"][party]
    certs.check_valid(p["cert"], "gateway certificate of %s" % party)
    with open(p["key"], "rb") as f:
        key = f.read()
    with open(p["cert"], "rb") as f:
        cert = f.read()
    with open(c["ca"], "rb") as f:
        ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="privtrain share gateway (one per party)")
    ap.add_argument("--config", required=True, help="parties.json")
    ap.add_argument("--party", required=True, choices=pc.PARTY_NAMES)
    ap.add_argument("--fault-file", default=None, help="on SIGTERM, fail pending requests with the reason in this file")
    args = ap.parse_args(argv)
    try:
        c = pc.load_parties(args.config)
        gw = Gateway(c, args.party, args.fault_file)
        creds = server_credentials(c, args.party)
    except (pc.ConfigError, certs.CertError, OSError, ValueError) as e:   # BoundsError, BudgetError: ValueErrors
        log(args.party, "error: %s" % e)
        return 2
    pdir = c["parties"][args.party]["dir"]
    os.makedirs(pdir, exist_ok=True)
    os.chmod(pdir, 0o700)
    threading.Thread(target=gw.serve_backend, args=(pc.backend_socket(c, args.party),), daemon=True).start()
    threading.Thread(target=gw.janitor, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=gw.workers), options=GRPC_OPTIONS,
                         maximum_concurrent_rpcs=4 * gw.workers)     # beyond that: RESOURCE_EXHAUSTED, not a queue
    handlers = {
        "Info": grpc.unary_unary_rpc_method_handler(gw.info, _ident, _ident),
        "Submit": grpc.unary_unary_rpc_method_handler(gw.submit, _ident, _ident),
        "Fetch": grpc.unary_unary_rpc_method_handler(gw.fetch, _ident, _ident),
        "Predict": grpc.unary_unary_rpc_method_handler(gw.predict, _ident, _ident),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    addr = c["parties"][args.party]["gateway"]
    if server.add_secure_port(addr, creds) == 0:
        log(args.party, "error: cannot listen on %s" % addr)
        return 2
    server.start()
    parent = os.getppid()
    done = threading.Event()

    def on_term(signum, _frame):
        reason = "operator stopped the service"
        if args.fault_file and os.path.isfile(args.fault_file):
            with open(args.fault_file) as f:
                reason = f.read().strip() or reason
        gw.stop_all(reason)
        done.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    with open(os.path.join(pdir, "gateway.ready"), "w") as f:
        f.write("%d\n" % os.getpid())
    log(args.party, "listening on %s (mutual TLS)" % addr)
    while not done.wait(0.5):
        if os.getppid() != parent:
            gw.stop_all("the launcher is gone")
            break
    time.sleep(1.0)            # let waiting Fetch calls deliver the reason
    server.stop(0.5).wait(2)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
