"""Encrypted vs plaintext prediction latency (run in the encrypted env).

    EPY=$(scripts/setup_env.sh encrypted)/bin/python
    PYTHONPATH=. $EPY simulations/bench_encrypted.py [--reps 20] [--protocol aby3] [--json out.json]

Starts a real encrypted service (server0-2 + model owner as separate processes on 127.0.0.1) for a
100-64-64-1 ReLU MLP with random weights, then in this process (the prediction client) measures,
for batch 1 and batch 1000, in the same run:

* plaintext numpy forward pass, and plaintext TF (tf.function on the same weights);
* encrypted, "stock" path: TFE 0.9.1's own kernels, the weights secret-shared again inside every call;
* encrypted, serving path (what `privtrain predict --encrypted` uses): model shares resident in
  variables on the servers, fastops' vectorised BitSplitAndGather, one traced graph per batch size.
Both encrypted paths trace once per batch size and draw fresh masks per call.

Latency = wall time of one predict call as seen by the client (features in, probabilities out), median
and p90 over --reps calls after one warm-up call (which includes tracing; reported separately).
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

from encrypted_serving import launcher  # noqa: E402
from encrypted_serving import model_format as mf  # noqa: E402


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
    ap.add_argument("--protocol", default="aby3", choices=("aby3", "pond"))
    ap.add_argument("--skip-naive", action="store_true", help="skip the stock path")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--output", help="directory: write bench_encrypted.json there (make bench)")
    args = ap.parse_args(argv)
    try:
        import tf_encrypted  # noqa: F401
    except ImportError:
        # Started from the platform env (e.g. `make bench`): re-run this script in the encrypted env.
        import subprocess
        cmd = [launcher.encrypted_python(), os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None else argv)
        env = dict(os.environ, PYTHONPATH=launcher.REPO)
        sys.exit(subprocess.call(cmd, env=env))
    if args.output and not args.json:
        os.makedirs(args.output, exist_ok=True)
        args.json = os.path.join(args.output, "bench_encrypted.json")

    d = 100
    config, weights, spec = make_model(d)
    x = np.random.default_rng(1).normal(size=(1000, d)).astype(np.float32)
    ref = mf.forward_logits(config, weights, x)
    results = {"model": "100-64-64-1 ReLU MLP", "protocol": args.protocol, "cpus": os.cpu_count(),
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

    with tempfile.TemporaryDirectory(prefix="bench-encrypted-") as tmp:
        model_dir = mf.save_model(os.path.join(tmp, "model"), config, weights, spec)
        with launcher.EncryptedService(model_dir, run_dir=os.path.join(tmp, "run"), protocol=args.protocol,
                                       python=sys.executable) as svc:
            from encrypted_serving import engine, fastops
            t = time.perf_counter()
            # Stock path first (TFE's own kernels, weights re-shared inside every call), then the serving path.
            pred = engine.EncryptedPredictor(svc.cluster_json, timeout_s=120, resident_weights=False,
                                             fast_kernels=False)
            results["connect_s"] = round(time.perf_counter() - t, 3)
            if not args.skip_naive:
                for b in (1, 1000):
                    st, z = timeit(lambda: pred.predict_logits(x[:b]), args.reps if b == 1 else args.reps_large)
                    record("encrypted-stock (TFE kernels, re-share weights per call)", b, st, z)
            fastops.install()
            t = time.perf_counter()
            pred._weights = pred._guarded(pred._share_model, "secret-sharing the model")
            pred._fns = {}
            results["share_model_s"] = round(time.perf_counter() - t, 3)
            for b in (1, 1000):
                st, z = timeit(lambda: pred.predict_logits(x[:b]), args.reps if b == 1 else args.reps_large)
                record("encrypted-serving (resident shares, fast kernels)", b, st, z)
    results["loadavg_end"] = os.getloadavg()
    print("\n%-58s %6s %12s %12s %10s" % ("path", "batch", "median [ms]", "p90 [ms]", "first [s]"))
    for r in results["rows"]:
        print("%-58s %6d %12.2f %12.2f %10.2f" % (r["path"], r["batch"], 1000 * r["median_s"], 1000 * r["p90_s"],
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
