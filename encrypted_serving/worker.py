"""A party's compute worker (encrypted env): ``python -m encrypted_serving.worker --config parties.json --party N``.

A plain ``tf.distribute.Server`` task of the private TF cluster (job ``tfe``: server0-2 and the driver),
run where clients cannot reach it (local mode: inside the service's own network namespace). It executes
the fixed program the operator's driver places on it. Shares enter and leave that program only through
four Python functions registered here under fixed tokens and run *in this process*, which talk to this
party's own gateway over its private Unix socket:

* ``privtrain_wait``  : new submissions at this gateway (ids, sizes, share digests), long poll;
* ``privtrain_take``  : this party's share pair of a request (the gateway hands it over once);
* ``privtrain_put``   : this party's share of the output, back to the gateway;
* ``privtrain_fail``  : tell the gateway a request failed (the message goes to its submitter).

So a share crosses the TF cluster only as the ABY3 protocol sends it (and the driver sees only request
metadata and one dummy number per party and call). Exits when its launcher goes away.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

import numpy as np

from encrypted_serving import parties as pc
from encrypted_serving import ring

WARMUP_ID = "__warmup__"
TOKENS = ("privtrain_wait", "privtrain_take", "privtrain_put", "privtrain_fail")


def log(party, msg):
    sys.stderr.write("[worker %s pid=%d] %s\n" % (party, os.getpid(), msg))
    sys.stderr.flush()


class GatewayLink:
    """Per-thread connections to the gateway's backend socket (reconnects after a gateway restart)."""

    def __init__(self, path: str, party: str):
        self.path, self.party = path, party
        self.local = threading.local()

    def call(self, header: dict, arrays=None, timeout: float = 60.0):
        for attempt in (0, 1):
            conn = getattr(self.local, "conn", None)
            try:
                if conn is None:
                    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    conn.settimeout(timeout)
                    conn.connect(self.path)
                    self.local.conn = conn
                data = ring.pack(header, arrays)
                conn.sendall(struct.pack("<Q", len(data)) + data)
                head = ring.recv_exact(conn, 8)
                if head is None:
                    raise OSError("gateway closed the connection")
                reply_h, reply_a = ring.unpack(ring.recv_exact(conn, struct.unpack("<Q", head)[0]))
                if "error" in reply_h:
                    raise RuntimeError("privtrain-gateway %s: %s" % (self.party, reply_h["error"]))
                return reply_h, reply_a
            except OSError as e:
                self.local.conn = None
                try:
                    conn and conn.close()
                except OSError:
                    pass
                if attempt:
                    raise RuntimeError("privtrain-gateway %s unreachable: %s" % (self.party, e)) from e


def _s(x) -> str:
    return x.decode() if isinstance(x, (bytes, np.bytes_)) else str(x)


def make_functions(link: GatewayLink, weight_keys, input_dim: int):
    """The four bridge functions (numpy in / numpy out, as tf.py_func calls them)."""

    def wait(since, timeout_ms, model_loaded):
        try:
            h, _ = link.call({"op": "wait", "since": int(since), "timeout_ms": int(timeout_ms),
                              "model_loaded": bool(model_loaded)})
        except RuntimeError as e:          # gateway down or restarting: tell the driver, do not fail the call
            h = {"error": str(e)}
        return np.array(json.dumps(h).encode(), dtype=object)

    merged = {}     # "id1,id2,..." -> [rows per id]: how put splits a merged batch's output (same program run)

    def take(rid, kind, n):
        if _s(rid) == WARMUP_ID:      # the driver instantiating the program: no data involved
            z = np.zeros((int(n), input_dim), dtype=np.int64)
            return [z, z]
        if _s(kind) == "model":
            _, arrays = link.call({"op": "take", "id": _s(rid)})
            return [arrays[k + s] for k in weight_keys for s in ("/a", "/b")]
        ids = _s(rid).split(",")
        if len(ids) == 1:
            _, arrays = link.call({"op": "take", "id": ids[0]})
            a, b, rows = arrays["a"], arrays["b"], None
        else:
            # cross-request batching: several requests (each owned by its own certificate) in one program run;
            # one gateway call takes them all, rows concatenated in the driver's order
            h, arrays = link.call({"op": "take", "ids": ids})
            a, b, rows = arrays["a"], arrays["b"], [int(r) for r in h["rows"]]
            merged[_s(rid)] = rows
        if a.shape[0] < int(n):       # padding rows: shares of zero, their outputs never leave this party
            pad = np.zeros((int(n) - a.shape[0], input_dim), dtype=np.int64)
            a, b = np.concatenate([a, pad]), np.concatenate([b, pad])
        return [a, b]

    def put(rid, output, share):
        if _s(rid) == WARMUP_ID:
            return np.int64(1)
        ids = _s(rid).split(",")
        share = np.asarray(share, dtype=np.int64)
        if len(ids) == 1:
            link.call({"op": "put", "id": ids[0], "output": _s(output)}, {"share": share})
        else:             # each request's rows go back under its own id (the gateway hands them only to its submitter)
            rows = merged.pop(_s(rid))
            link.call({"op": "put", "ids": ids, "rows": rows, "output": _s(output)}, {"share": share[:sum(rows)]})
        return np.int64(1)

    def fail(rid, message):
        try:
            link.call({"op": "fail", "id": _s(rid), "error": _s(message)}, timeout=5.0)
        except RuntimeError:
            pass
        return np.int64(1)

    return {"privtrain_wait": wait, "privtrain_take": take, "privtrain_put": put, "privtrain_fail": fail}


def register(functions):
    """Register the bridge functions under fixed tokens in this process's py_func registry."""
    from tensorflow.python.ops import script_ops
    for token, fn in functions.items():
        script_ops._py_funcs._funcs[token] = fn   # the registry holds weak references: keep `functions` alive
    return functions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="privtrain compute worker (one per party, inside the private network)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--party", required=True, choices=pc.PARTY_NAMES)
    args = ap.parse_args(argv)
    c = pc.load_parties(args.config)
    party = args.party
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    from encrypted_serving import model_format as mf
    model = mf.load_config(c["public_dir"])
    weight_keys = [k for i in range(len(model["layers"])) for k in (mf.kernel_key(i), mf.bias_key(i))]
    link = GatewayLink(pc.backend_socket(c, party), party)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf_encrypted  # noqa: F401  TFE's kernels (secure_seed, seeded sampling) run in this process
    keep = register(make_functions(link, weight_keys, model["input_dim"]))
    addrs = pc.tf_addresses(c)
    spec = tf.train.ClusterSpec({"tfe": [addrs[n] for n in pc.PARTY_NAMES + (pc.DRIVER,)]})
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=2)
    server = tf.distribute.Server(spec, job_name="tfe", task_index=pc.tf_task_index(party), config=config, start=True)
    log(party, "TF worker listening at %s (private network)" % addrs[party])
    with open(os.path.join(c["parties"][party]["dir"], "worker.ready"), "w") as f:
        f.write("%d\n" % os.getpid())
    parent = os.getppid()
    hb = GatewayLink(link.path, party)
    while True:
        try:
            hb.call({"op": "hb"}, timeout=2.0)
        except RuntimeError:
            pass
        if os.getppid() != parent:
            log(party, "launcher gone, exiting")
            os._exit(0)
        time.sleep(0.5)
    del server, keep


if __name__ == "__main__":
    sys.exit(main())
