"""Encrypted vs plaintext prediction latency, side by side in one run (encrypted env).

    EPY=$(scripts/setup_env.sh encrypted)/bin/python
    PYTHONPATH=. $EPY simulations/bench_encrypted.py [--reps 20] [--reps-large 5] [--json out.json]

For a 100-64-64-1 ReLU MLP with random weights, at batch 1 and batch 1000, as seen by the client
(features in, logits out):

* plaintext numpy, and plaintext TF (tf.function on the same weights), in this process: no server at all;
* the served design: parties + driver in a private network namespace run the fixed program; this process is a
  numpy client (fixed-point encode, ring shares, mutual-TLS gRPC to the three gateways, output shares combined).

The legacy client-driven cluster is deliberately not benchmarked: it listens on 127.0.0.1 without any
authentication, and a run as root let a local process read /etc/shadow through it (issue 19, item 5). The
served design runs only with its TF cluster in a private network namespace (core/netns.py: user namespaces,
no root); where none can be made only the plaintext rows are measured.

Latency: median and p90 over --reps (batch 1) / --reps-large (batch 1000) calls after one warm-up call.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encrypted_serving import model_format as mf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model(d, seed=0):
    rng = np.random.default_rng(seed)
    layers = [{"units": 64, "activation": "relu"}, {"units": 64, "activation": "relu"},
              {"units": 1, "activation": "linear"}]
    config = mf.make_config(d, layers)
    weights, fan = {}, d
    for i, l in enumerate(layers):
        weights[mf.kernel_key(i)] = rng.normal(0, 1 / np.sqrt(fan), (fan, l["units"])).astype(np.float32)
        weights[mf.bias_key(i)] = rng.normal(0, 0.1, (l["units"],)).astype(np.float32)
        fan = l["units"]
    spec = [{"name": "f%d" % i, "kind": "numeric", "mean": 0.0, "std": 1.0, "log1p": False} for i in range(d)]
    return config, weights, spec


def timeit(fn, reps):
    t = time.perf_counter()
    first_out = fn()
    first = time.perf_counter() - t
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"first_s": round(first, 4), "median_s": round(float(np.median(ts)), 5),
            "p90_s": round(float(np.percentile(ts, 90)), 5), "min_s": round(min(ts), 5), "reps": reps}, first_out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--reps-large", type=int, default=5, help="reps for batch 1000")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--output", help="directory: write bench_encrypted.json there (make bench)")
    args = ap.parse_args(argv)
    try:
        import tf_encrypted  # noqa: F401
    except ImportError:
        # Started from the platform env (e.g. `make bench`): re-run this script in the encrypted env.
        import subprocess
        from encrypted_serving.service import encrypted_python
        cmd = [encrypted_python(), os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None else argv)
        env = dict(os.environ, PYTHONPATH=REPO)
        sys.exit(subprocess.call(cmd, env=env))
    if args.output and not args.json:
        os.makedirs(args.output, exist_ok=True)
        args.json = os.path.join(args.output, "bench_encrypted.json")

    d = 100
    config, weights, spec = make_model(d)
    x = np.random.default_rng(1).normal(size=(1000, d)).astype(np.float32)
    ref = mf.forward_logits(config, weights, x)
    results = {"model": "100-64-64-1 ReLU MLP", "protocol": "aby3", "cpus": os.cpu_count(),
               "loadavg_start": os.getloadavg(), "rows": []}

    def record(path, batch, stats, logits=None):
        row = {"path": path, "batch": batch, **stats}
        if logits is not None:
            row["max_abs_logit_err"] = float(np.abs(np.asarray(logits) - ref[:batch]).max())
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    # Plaintext paths.
    for b in (1, 1000):
        st, out = timeit(lambda: mf.sigmoid(mf.forward_logits(config, weights, x[:b])), args.reps)
        record("plaintext-numpy", b, st)
    import tensorflow as tf
    tw = [(tf.constant(weights[mf.kernel_key(i)]), tf.constant(weights[mf.bias_key(i)]), l["activation"])
          for i, l in enumerate(config["layers"])]

    @tf.function
    def tf_forward(v):
        h = v
        for k, bias, act in tw:
            h = tf.matmul(h, k) + bias
            if act == "relu":
                h = tf.nn.relu(h)
        return tf.sigmoid(h)

    for b in (1, 1000):
        xb = tf.constant(x[:b])
        st, _ = timeit(lambda: tf_forward(xb).numpy(), args.reps)
        record("plaintext-tf", b, st)

    from encrypted_serving import service
    try:   # the served design runs only with its TF cluster in a private network namespace (core/netns.py)
        service.private_network().__exit__()
        no_namespace = None
    except service.EncryptedServiceError as e:
        no_namespace = str(e)
    if no_namespace:
        results["served_design"] = "skipped: %s" % no_namespace
        print("note: %s" % results["served_design"], flush=True)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-encrypted-") as tmp:
            model_dir = mf.save_model(os.path.join(tmp, "model"), config, weights, spec)
            # The served design: parties + driver in a private network namespace, this process is a plain numpy
            # client talking mutual TLS to the three gateways. Limits raised so that they do not bind here.
            from encrypted_serving import service, share_client
            t = time.perf_counter()
            with service.GatewayService(model_dir, run_dir=os.path.join(tmp, "new"), python=sys.executable,
                                        isolation="netns", batch_sizes=(1, 1000), rate_limit=(10 ** 6, 10 ** 6),
                                        rows_per_day=10 ** 9, request_timeout_s=120) as gsvc:
                results["new_start_s"] = round(time.perf_counter() - t, 1)
                results["new_upload_model_s"] = round(gsvc.upload_seconds, 3)
                results["new_isolation"] = "netns"
                with share_client.ShareClient(gsvc.client_json(), timeout_s=120) as client:
                    client.info()
                    for b in (1, 1000):
                        st, z = timeit(lambda: client.predict_logits(x[:b]), args.reps if b == 1 else args.reps_large)
                        record("served: gateways + mTLS, numpy client (netns)", b, st, z)
    results["loadavg_end"] = os.getloadavg()
    print("\n%-52s %6s %12s %12s %10s" % ("path", "batch", "median [ms]", "p90 [ms]", "first [s]"))
    for r in results["rows"]:
        print("%-52s %6d %12.2f %12.2f %10.2f" % (r["path"], r["batch"], 1000 * r["median_s"], 1000 * r["p90_s"],
                                                  r["first_s"]))
    print("load average start/end: %s / %s on %s CPUs" % (results["loadavg_start"], results["loadavg_end"],
                                                           results["cpus"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    sys.stdout.flush()
    os._exit(0)   # skip TF's remote-context teardown


if __name__ == "__main__":
    main()
