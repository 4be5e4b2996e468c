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
Served-design scenarios (issue 19's speed goals): batch 1 back-to-back; batch 1 *isolated* (random gaps of
0.3-1.5 s between calls, so the service is idle when a request arrives); batch 1000; and 1 / 4 / 16 concurrent
clients (one certificate each, batch-1 requests back-to-back for --concurrent-s seconds): requests/s and latency.

``--compare-with DIR`` first runs this same script against the code tree DIR (e.g. a ``git archive`` of the
previous commit) in a subprocess, then against this tree, and prints both tables side by side with the load.
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


def isolated(fn, reps, seed=2):
    """Calls separated by random gaps of 0.3-1.5 s (the service idles in between)."""
    rng = np.random.default_rng(seed)
    fn()
    ts, out = [], None
    for _ in range(reps):
        time.sleep(float(rng.uniform(0.3, 1.5)))
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return {"first_s": 0.0, "median_s": round(float(np.median(ts)), 5), "p90_s": round(float(np.percentile(ts, 90)), 5),
            "min_s": round(min(ts), 5), "reps": reps}, out


def concurrent(gsvc, names, x, seconds):
    """len(names) clients (one certificate each, own connections), batch-1 requests back-to-back for `seconds`."""
    import threading
    from encrypted_serving import share_client
    clients = [share_client.ShareClient(gsvc.client_json(n), timeout_s=120) for n in names]
    for c in clients:
        c.info()
        c.predict_logits(x[:1])                       # connections up before the clock starts
    lat, outs, errors = [], [], []
    stop_at = [0.0]
    start = threading.Barrier(len(clients) + 1)

    def run(i, c):
        start.wait()
        row = i % len(x)
        while time.perf_counter() < stop_at[0]:
            t = time.perf_counter()
            try:
                z = c.predict_logits(x[row:row + 1])
            except Exception as e:  # noqa: BLE001
                errors.append(str(e)[:200])
                return
            lat.append(time.perf_counter() - t)
            outs.append((row, z))

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join(seconds + 120)
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError("concurrent clients failed: %s" % errors[0])
    return {"first_s": 0.0, "median_s": round(float(np.median(lat)), 5), "p90_s": round(float(np.percentile(lat, 90)), 5),
            "min_s": round(min(lat), 5), "reps": len(lat), "requests_per_s": round(len(lat) / wall, 1)}, outs


def table(runs, labels=None):
    """One table; with several runs (e.g. before / after) their columns side by side."""
    labels = labels or [""] * len(runs)
    head = "%-62s %6s" % ("path", "batch") + "".join(
        " | %-8s %9s %9s %7s" % (lab[:8], "median ms", "p90 ms", "req/s") for lab in labels)
    lines = [head]
    keys = []
    for r in runs:
        for row in r["rows"]:
            if (row["path"], row["batch"]) not in keys:
                keys.append((row["path"], row["batch"]))
    for path, batch in keys:
        line = "%-62s %6d" % (path[:62], batch)
        for r in runs:
            row = next((w for w in r["rows"] if (w["path"], w["batch"]) == (path, batch)), None)
            if row is None:
                line += " | %-8s %9s %9s %7s" % ("", "-", "-", "-")
            else:
                line += " | %-8s %9.2f %9.2f %7s" % ("", 1000 * row["median_s"], 1000 * row["p90_s"],
                                                      row.get("requests_per_s", ""))
        lines.append(line)
    for lab, r in zip(labels, runs):
        lines.append("%sload average start/end: %s / %s on %s CPUs; service start %s s; max |logit err| %s" % (
            (lab + ": ") if lab else "", r.get("loadavg_start"), r.get("loadavg_end"), r.get("cpus"),
            r.get("new_start_s"), max([w.get("max_abs_logit_err", 0.0) for w in r["rows"]] or [0.0])))
    return "\n".join(lines)


def compare(args, argv):
    """Run the code tree --compare-with (its copy of this script), then this tree, in one go; print side by side."""
    import shutil
    import subprocess
    rest, skip = [], False
    for a in (sys.argv[1:] if argv is None else argv):
        if skip:
            skip = False
            continue
        if a == "--compare-with":
            skip = True
            continue
        if a.startswith("--compare-with=") or a.startswith("--json"):
            continue
        rest.append(a)
    rest = [a for a in rest if a != args.json]
    other = os.path.abspath(args.compare_with)
    shutil.copyfile(os.path.abspath(__file__), os.path.join(other, "simulations", "bench_encrypted.py"))
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        for label, tree in (("before", other), ("after", REPO)):
            out = os.path.join(tmp, label + ".json")
            cmd = [sys.executable, os.path.join(tree, "simulations", "bench_encrypted.py"), "--json", out] + rest
            print("== %s: %s" % (label, tree), flush=True)
            rc = subprocess.call(cmd, env=dict(os.environ, PYTHONPATH=tree), cwd=tree)
            if rc:
                sys.exit(rc)
            with open(out) as f:
                runs.append(json.load(f))
    print()
    print(table(runs, ["before", "after"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"before": runs[0], "after": runs[1]}, f, indent=2)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--reps-large", type=int, default=5, help="reps for batch 1000")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--output", help="directory: write bench_encrypted.json there (make bench)")
    ap.add_argument("--isolated", type=int, default=10, help="isolated batch-1 calls (gaps of 0.3-1.5 s)")
    ap.add_argument("--concurrent-s", type=float, default=6.0, help="seconds per concurrent-clients scenario")
    ap.add_argument("--clients", default="1,4,16", help="concurrent client counts")
    ap.add_argument("--served-only", action="store_true", help="skip the plaintext rows")
    ap.add_argument("--keep-logs", help="copy the service's logs (driver: per-run times and merged sizes) here")
    ap.add_argument("--compare-with", help="code tree to measure first (its copy of this script), side by side")
    args = ap.parse_args(argv)
    if args.compare_with:
        return compare(args, argv)
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
    for b in (() if args.served_only else (1, 1000)):
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

    for b in (() if args.served_only else (1, 1000)):
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
            counts = [int(c) for c in args.clients.split(",") if c]
            names = ("client",) + tuple("client%d" % i for i in range(1, max(counts + [1])))
            t = time.perf_counter()
            with service.GatewayService(model_dir, run_dir=os.path.join(tmp, "new"), python=sys.executable,
                                        isolation="netns", batch_sizes=(1, 1000), rate_limit=(10 ** 6, 10 ** 6),
                                        rows_per_day=10 ** 9, request_timeout_s=120, clients=names,
                                        min_rows_per_request=1) as gsvc:
                results["new_start_s"] = round(time.perf_counter() - t, 1)
                results["new_upload_model_s"] = round(gsvc.upload_seconds, 3)
                results["new_isolation"] = "netns"
                with share_client.ShareClient(gsvc.client_json(), timeout_s=120) as client:
                    client.info()
                    served = "served: gateways + mTLS, numpy client (netns)"
                    for b in (1, 1000):
                        st, z = timeit(lambda: client.predict_logits(x[:b]), args.reps if b == 1 else args.reps_large)
                        record(served + (" back-to-back" if b == 1 else ""), b, st, z)
                    st, z = isolated(lambda: client.predict_logits(x[:1]), args.isolated)
                    record(served + " isolated (0.3-1.5 s gaps)", 1, st, z)
                for k in counts:
                    st, outs = concurrent(gsvc, names[:k], x, args.concurrent_s)
                    row = {"path": "served: %d concurrent clients, batch 1" % k, "batch": 1, **st}
                    row["max_abs_logit_err"] = max(float(np.abs(z - ref[i:i + 1]).max()) for i, z in outs)
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
                if args.keep_logs:
                    import shutil
                    shutil.copytree(os.path.join(gsvc.run_dir, "logs"), args.keep_logs, dirs_exist_ok=True)
    results["loadavg_end"] = os.getloadavg()
    print()
    print(table([results]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    sys.stdout.flush()
    os._exit(0)   # skip TF's remote-context teardown


if __name__ == "__main__":
    main()
