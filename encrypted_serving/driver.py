"""The operator's driver (encrypted env): ``python -m encrypted_serving.driver --config parties.json``.

Runs inside the private TF cluster (task ``driver`` of job ``tfe``) and loops over one fixed program
(``encrypted_serving.program``): it long-polls the three parties' gateways *through their own workers*
for new submissions (ids, batch sizes and share digests only), and when all three parties hold the same
request with consistent replicated shares (party i's second share digest == party i+1's first), runs the
load or predict program for it. It never receives a share: only metadata and one dummy per party.

Faults: a request that not every party received within the timeout, or whose shares are inconsistent, is
failed with a message naming the party. A party whose TF worker dies or stops answering is fatal: the
driver writes a one-line reason to ``--fault-file`` (the launcher passes it to the gateways, which hand it
to waiting clients) and exits with status 3, and the launcher stops every process.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from encrypted_serving import parties as pc

EXIT_FAULT = 3
IDLE_POLL_MS = 1000      # gateways answer a long poll as soon as a submission arrives
PARTIAL_POLL_MS = 2      # some parties hold a request the others have not reported yet


def log(msg):
    sys.stderr.write("[driver pid=%d] %s\n" % (os.getpid(), msg))
    sys.stderr.flush()


class Fatal(RuntimeError):
    pass


def _answers(addr: str, timeout: float = 2.0) -> str:
    """'ok', 'closed' (nothing listening: dead) or 'silent' (port open, process not answering)."""
    import socket
    host, port = addr.rsplit(":", 1)
    try:
        s = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError:
        return "closed"
    try:
        s.settimeout(timeout)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        return "ok" if s.recv(9) else "closed"
    except OSError:
        return "silent"
    finally:
        s.close()


def inconsistent(parts: dict) -> str:
    """Why the three parties' submissions of one request id cannot be one request ('' if they can): one kind, one
    size, one submitting certificate (else one request could combine shares sent by different clients), and
    replicated shares that agree between neighbouring parties."""
    kinds = {p["kind"] for p in parts.values()}
    sizes = {p["n"] for p in parts.values()}
    owners = {p.get("owner") for p in parts.values()}
    if len(owners) != 1 or None in owners:
        return "its shares were submitted with different certificates at the parties (one request, one submitter)"
    bad = [pc.PARTY_NAMES[i] + "/" + pc.PARTY_NAMES[(i + 1) % 3] for i in range(3)
           if parts[i]["digests"][1] != parts[(i + 1) % 3]["digests"][0]]
    if len(kinds) != 1 or len(sizes) != 1 or bad:
        return "the parties received inconsistent shares (%s)" % (
            "replicated share differs between " + ", ".join(bad) if bad else "kind/size differ")
    return ""


class Driver:
    def __init__(self, c: dict, fault_file: str = None, warm=(1, 1000)):
        self.c, self.fault_file, self.warm = c, fault_file, warm
        self.timeout = float(c["request_timeout_s"])
        self.addrs = pc.tf_addresses(c)

    def diagnose(self) -> str:
        bad = []
        for p in pc.PARTY_NAMES:
            state = _answers(self.addrs[p])
            if state == "silent":          # a process being killed can hold its port for a moment: look again
                time.sleep(0.7)
                state = _answers(self.addrs[p])
            if state == "closed":
                bad.append("party %s's compute worker is gone (nothing listens at %s)" % (p, self.addrs[p]))
            elif state == "silent":
                bad.append("party %s's compute worker is not answering (stopped or wedged)" % p)
        return "; ".join(bad) or "every party's worker answers now (a transient error or a slow party)"

    def guarded(self, fn, what: str, limit: float):
        box = {}

        def target():
            try:
                box["v"] = fn()
            except BaseException as e:  # noqa: BLE001
                box["e"] = e

        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(limit)
        if t.is_alive():
            raise Fatal("encrypted service: no answer within %.0fs while %s: %s" % (limit, what, self.diagnose()))
        if "e" in box:
            import tensorflow as tf
            e = box["e"]
            if isinstance(e, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                              tf.errors.AbortedError)):
                raise Fatal("encrypted service failed while %s: %s (TF: %s)" % (what, self.diagnose(), type(e).__name__))
            raise e
        return box["v"]

    def fault(self, message: str) -> int:
        log("FATAL: " + message)
        if self.fault_file:
            with open(self.fault_file + ".tmp", "w") as f:
                f.write(message + "\n")
            os.replace(self.fault_file + ".tmp", self.fault_file)
        # Tell the gateways of the parties that still answer (bounded; a stuck runtime may not let us).
        pending = list(getattr(self, "pending", {}).keys())
        if pending and hasattr(self, "program"):
            def tell():
                for rid in pending:
                    try:
                        self.program.run_fail(rid, message)
                    except Exception:  # noqa: BLE001
                        pass
            t = threading.Thread(target=tell, daemon=True)
            t.start()
            t.join(3.0)
        return EXIT_FAULT

    def run(self) -> int:
        c = self.c
        from encrypted_serving import model_format as mf
        model = mf.load_config(c["public_dir"])
        from encrypted_serving import bounds
        try:
            bounds.check(model)     # inputs are clamped to the public box; the owner certified no truncation fails
        except bounds.BoundsError as e:
            log("error: %s" % e)
            return 2
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
        from tensorflow.python.eager import context as _ctx
        _ctx.context().operation_timeout_in_ms = int(1000 * max(self.timeout, 600))
        _ctx.context().intra_op_parallelism_threads = 1
        _ctx.context().inter_op_parallelism_threads = 2
        import tf_encrypted as tfe
        from encrypted_serving.program import Program, WARMUP_ID
        names = pc.PARTY_NAMES + (pc.DRIVER,)
        tfe.set_config(tfe.RemoteConfig({n: self.addrs[n] for n in names}, job_name="tfe"))
        spec = tf.train.ClusterSpec({"tfe": [self.addrs[n] for n in names]})
        try:
            self.guarded(lambda: tf.config.experimental_connect_to_cluster(spec, job_name="tfe",
                                                                         task_index=pc.tf_task_index(pc.DRIVER)),
                         "connecting to the parties", 120)
            self.program = program = self.guarded(lambda: Program(model, c["output"]), "setting up ABY3 keys", 300)
            for n in self.warm:                 # trace + instantiate on every party before serving
                t0 = time.monotonic()
                self.guarded(lambda: program.run_predict(WARMUP_ID, n), "instantiating the program (batch %d)" % n, 900)
                log("program for batch %d ready in %.1fs" % (n, time.monotonic() - t0))
                runs = []
                for _ in range(int(os.environ.get("PRIVTRAIN_DRIVER_WARM_RUNS", "3"))):
                    t1 = time.perf_counter()
                    self.guarded(lambda: program.run_predict(WARMUP_ID, n), "warming up", 600)
                    runs.append(1000 * (time.perf_counter() - t1))
                if runs:
                    log("program for batch %d: %s ms per run (no data: warm-up)" % (n, sorted(round(r, 1) for r in runs)))
        except Fatal as e:
            return self.fault(str(e))
        ready = os.path.join(c["driver"]["dir"], "driver.ready")
        with open(ready, "w") as f:
            f.write("%d\n" % os.getpid())
        log("serving")
        since = [0, 0, 0]
        self.pending = {}          # id -> {"first": t, "parts": {i: info}}
        model_loaded = False
        parent = os.getppid()
        while True:
            if os.getppid() != parent:
                log("launcher gone, exiting")
                return 0
            try:
                # Idle: a long poll (each gateway answers at once when a submission arrives). A request that some
                # parties reported and others not yet: poll again without blocking on the parties that already did
                # (with one fixed 200 ms poll, an isolated request waited for that timeout on them).
                young = any(time.monotonic() - e["first"] < 1.0 for e in self.pending.values())
                wait_ms = PARTIAL_POLL_MS if young else IDLE_POLL_MS     # (a share sent to one party only: not young)
                replies = self.guarded(lambda: program.run_wait(since, model_loaded, wait_ms), "polling the gateways",
                                       self.timeout)
            except Fatal as e:
                return self.fault(str(e))
            except Exception as e:  # noqa: BLE001
                log("poll failed: %s" % str(e).splitlines()[0][:300])
                time.sleep(0.2)
                continue
            now = time.monotonic()
            down = {}
            for i, r in enumerate(replies):
                if "error" in r:
                    down[i] = r["error"]
                    continue
                since[i] = int(r["seq"])   # a restarted gateway starts again from 0
                for item in r["ready"]:
                    self.pending.setdefault(item["id"], {"first": now, "parts": {}})["parts"][i] = item
            ready = []             # complete, consistent requests, certificates in turn
            for rid, entry in self._in_turn():
                parts = entry["parts"]
                if len(parts) < 3:
                    missing = [pc.PARTY_NAMES[i] for i in range(3) if i not in parts]
                    gone = [pc.PARTY_NAMES[i] for i in down if i not in parts]
                    if gone or now - entry["first"] > self.timeout:
                        why = ("the gateway of party %s is unreachable (%s)" % (", ".join(gone), down[
                            pc.PARTY_NAMES.index(gone[0])]) if gone else
                               "party %s never received its share within %.0fs" % (", ".join(missing), self.timeout))
                        self._fail(rid, "request %s failed: %s" % (rid, why))
                    continue
                del self.pending[rid]
                why = inconsistent(parts)
                if why:
                    self._fail(rid, "request %s rejected: %s" % (rid, why))
                    continue
                ready.append((rid, entry, parts[0]["kind"], parts[0]["n"]))
            for group, kind, n in self._runs(ready):
                rid = ",".join(r for r, _ in group)
                t0 = time.monotonic()
                try:
                    if kind == "model":
                        self.guarded(lambda: program.run_load(rid), "loading the model", max(self.timeout, 120))
                        model_loaded = True
                    else:
                        first = n not in program._predict
                        self.guarded(lambda: program.run_predict(rid, n), "predicting",
                                     self.timeout + (600 if first else 0))
                except Fatal as e:
                    for r, entry in group:
                        self.pending[r] = entry
                    return self.fault(str(e))
                except Exception as e:  # noqa: BLE001
                    msg = str(e).strip().splitlines()
                    for r, _ in group:
                        self._fail(r, "request %s failed: %s" % (r, (msg[0] if msg else type(e).__name__)[:500]))
                    continue
                log("%s %s n=%d (%d request(s)) in %.1f ms" % (kind, rid[:60], n, len(group),
                                                              1000 * (time.monotonic() - t0)))

    def _runs(self, ready):
        """Program runs for the ready requests, in their (certificates-in-turn) order: a model load alone; small
        predictions merged (cross-request batching: up to `merge_rows` rows of several certificates in one run of
        the smallest instantiated program that holds them; each request's rows go back under its own id); larger
        ones alone. Yields ([(rid, entry)], kind, program batch size)."""
        merge = int(self.c.get("merge_rows", 0) or 0)
        sizes = sorted(set(self.c.get("batch_sizes", [])) | ({merge} if merge > 1 else set()))
        group, rows = [], 0

        def flush():
            if len(group) == 1 and rows in sizes:
                return list(group), "predict", rows
            return list(group), "predict", next(s for s in sizes if s >= rows)

        for rid, entry, kind, n in ready:
            if kind != "predict" or merge <= 1 or n >= merge:
                if group:                     # the order stays the certificates-in-turn order
                    yield flush()
                    group, rows = [], 0
                yield [(rid, entry)], kind, n
                continue
            if rows + n > merge:
                yield flush()
                group, rows = [], 0
            group.append((rid, entry))
            rows += n
        if group:
            yield flush()

    def _in_turn(self):
        """Pending requests with certificates served in turn (each one's 1st request, then each one's 2nd, ...;
        oldest first within a round), so that one client's stream of batches cannot starve the others."""
        rank, order = {}, []
        for rid, entry in self.pending.items():
            owner = next(iter(entry["parts"].values()), {}).get("owner", "")
            rank[owner] = rank.get(owner, 0) + 1
            order.append((rank[owner], entry["first"], rid, entry))
        return [(rid, entry) for _, _, rid, entry in sorted(order, key=lambda t: t[:2])]

    def _fail(self, rid, message):
        log(message)
        self.pending.pop(rid, None)
        try:
            self.guarded(lambda: self.program.run_fail(rid, message), "reporting a failed request", 10)
        except Exception as e:  # noqa: BLE001
            log("could not report the failure: %s" % str(e).splitlines()[0][:200])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="privtrain encrypted-serving driver (operator side)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--fault-file", default=None)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    c = pc.load_parties(args.config)
    os.makedirs(c["driver"]["dir"], exist_ok=True)
    merge = int(c.get("merge_rows", 0) or 0)
    code = Driver(c, args.fault_file, tuple(sorted(set(c["batch_sizes"]) | ({merge} if merge > 1 else set())))).run()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
