"""One long-running party of the encrypted service (encrypted env): ``python -m encrypted_serving.player``.

LEGACY (the old client-driven design, issue 9): kept only as the baseline of simulations/bench_encrypted.py
and the control of the attack tests. A client of this design drives the parties' TF graph and can read the
weights; the served design is encrypted_serving.service / gateway / worker / driver / share_client.


Each party (server0, server1, server2, model-owner) is a plain ``tf.distribute.Server`` task of job
``tfe``; it executes whatever TF ops the driver (the prediction client, see engine.py) places on it.

The model owner additionally stages its weights, before its server starts, as raw little-endian
float32 files in ``weights_stage_dir`` (one file per array, ``dense_{i}_kernel.f32``/``dense_{i}_bias.f32``);
only TF ops placed on the model owner's own device read them (``tf.io.read_file`` runs in this process),
so the weights enter the computation as secret shares produced on the model owner.

Lifecycle: writes ``<run_dir>/ready/<name>`` once its server listens, then watches:
* SIGTERM / SIGINT -> exit 0;
* its launcher (parent) gone -> exit 0;
* another service party unreachable for ``--peer-grace`` seconds -> log and exit 3 (so that when one
  party dies the others do not linger).
It always leaves with ``os._exit`` (TF 2.9's gRPC server cannot be stopped in-process).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from encrypted_serving import cluster as cl

EXIT_PEER_LOST = 3


def log(name, msg):
    sys.stderr.write("[encrypted-serving %s pid=%d] %s\n" % (name, os.getpid(), msg))
    sys.stderr.flush()


def stage_weights(model_dir: str, stage_dir: str) -> None:
    import numpy as np
    from encrypted_serving import model_format as mf
    config = mf.load_config(model_dir)
    weights = mf.load_weights(model_dir, config)
    os.makedirs(stage_dir, exist_ok=True)
    os.chmod(stage_dir, 0o700)
    for key, arr in weights.items():
        path = os.path.join(stage_dir, key.replace("/", "_") + ".f32")
        tmp = path + ".tmp"
        np.ascontiguousarray(arr, dtype="<f4").tofile(tmp)
        os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", required=True, help="cluster.json")
    ap.add_argument("--name", required=True, choices=cl.SERVICE_PLAYERS)
    ap.add_argument("--model-dir", help="encrypted_model directory (model-owner only)")
    ap.add_argument("--peer-grace", type=float, default=3.0)
    ap.add_argument("--poll", type=float, default=0.5)
    args = ap.parse_args(argv)

    cluster = cl.load(args.cluster)
    name = args.name
    parent = os.getppid()

    def on_signal(signum, _frame):
        log(name, "received signal %d, exiting" % signum)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if name == cl.MODEL_OWNER:
        if not args.model_dir:
            log(name, "--model-dir is required for the model owner")
            return 2
        stage_weights(args.model_dir, cluster["weights_stage_dir"])
        log(name, "staged weights in %s" % cluster["weights_stage_dir"])

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf_encrypted  # noqa: F401  loads TFE's custom kernels (SecureSeed, ...) into this worker

    spec = tf.train.ClusterSpec({cluster["job_name"]: [a for _, a in cluster["players"]]})
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=2)
    server = tf.distribute.Server(spec, job_name=cluster["job_name"], task_index=cl.task_index(name),
                                  config=config, start=True)
    ready_dir = os.path.join(cluster["run_dir"], "ready")
    os.makedirs(ready_dir, exist_ok=True)
    with open(os.path.join(ready_dir, name), "w") as f:
        f.write("%d\n" % os.getpid())
    log(name, "listening at %s" % cl.address(cluster, name))

    peers = [p for p in cl.SERVICE_PLAYERS if p != name]
    first_bad = {}
    started = time.monotonic()
    while True:
        time.sleep(args.poll)
        if os.getppid() != parent:
            log(name, "launcher (pid %d) is gone, exiting" % parent)
            os._exit(0)
        down = set(cl.unreachable(cluster, peers, timeout=0.5))
        now = time.monotonic()
        for p in peers:
            if p in down:
                first_bad.setdefault(p, now)
            else:
                first_bad.pop(p, None)
        lost = []
        for p, t in first_bad.items():
            # A peer that has announced readiness gets peer_grace; one still starting gets a long window.
            was_ready = os.path.exists(os.path.join(ready_dir, p))
            if now - t >= (args.peer_grace if was_ready else max(args.peer_grace, 180.0 - (t - started))):
                lost.append(p)
        if lost:
            log(name, "peer(s) %s unreachable for %.1fs: shutting down" % (", ".join(sorted(lost)), args.peer_grace))
            os._exit(EXIT_PEER_LOST)
    del server  # unreachable


if __name__ == "__main__":
    sys.exit(main())
