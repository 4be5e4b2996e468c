"""Latency (p50/p99) and throughput of REST and gRPC predict against the built-in server, next to an
in-process call of the same SavedModel signature, at batch 1 and 100, in one run.

    PYTHONPATH=. python simulations/bench_serving.py [--iters 300] [--json out.json]

The server runs in its own process (``python -m serving.server``) so client and server do
not share a GIL; clients reuse one keep-alive HTTP connection / one gRPC channel. Client-side work
(JSON / proto encoding and decoding) is included in the REST and gRPC figures, as a real client pays it.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def timed(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def concurrent_throughput(make_fn, threads, seconds):
    counts = [0] * threads
    stop = threading.Event()

    def worker(i):
        fn = make_fn()
        while not stop.is_set():
            fn()
            counts[i] += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) / seconds


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=4, help="client threads for the concurrent run")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.testing import export_demo_model, make_example, random_rows

    tmp = tempfile.TemporaryDirectory(prefix="bench-serving-")
    path = export_demo_model(os.path.join(tmp.name, "adult", "1"))
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--serving-dir", tmp.name,
                             "--rest-port", "0", "--grpc-port", "0", "--backend", "builtin",
                             "--poll-interval", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    results = {"rows": []}
    try:
        line = ""
        while not line.startswith("READY"):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise SystemExit("server failed to start")
        rest_port, grpc_port = (int(x.split("=")[1]) for x in line.split()[1:3])
        model = tf.saved_model.load(path)
        sig = model.signatures["serving_default"]
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        for batch in (1, 100):
            examples = [make_example(*r) for r in random_rows(batch, seed=batch)]
            body = json.dumps({"instances": [{"b64": base64.b64encode(e).decode()} for e in examples]})

            def inproc():
                out = sig(examples=tf.constant(examples))
                return {k: v.numpy() for k, v in out.items()}

            def make_rest():
                conn = http.client.HTTPConnection("127.0.0.1", rest_port)

                def rest():
                    conn.request("POST", "/v1/models/adult:predict", body,
                                 {"Content-Type": "application/json"})
                    r = conn.getresponse()
                    data = r.read()
                    assert r.status == 200, data
                    return json.loads(data)
                return rest

            req = predict_pb2.PredictRequest()
            req.model_spec.name = "adult"
            req.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples))

            def make_grpc():
                def call():
                    resp = stub.Predict(req, timeout=30)
                    return {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}
                return call

            ref = inproc()
            got = make_rest()()
            np.testing.assert_allclose([p["logits"] for p in got["predictions"]], ref["logits"], rtol=1e-5)
            np.testing.assert_allclose(make_grpc()()["logits"], ref["logits"], rtol=1e-6)

            iters = a.iters if batch == 1 else max(50, a.iters // 3)
            lat = {"in-process": timed(inproc, iters, a.warmup), "REST": timed(make_rest(), iters, a.warmup),
                   "gRPC": timed(make_grpc(), iters, a.warmup)}
            base = statistics.median(lat["in-process"])
            for kind, xs in lat.items():
                p50 = statistics.median(xs)
                row = {"path": kind, "batch": batch, "p50_ms": p50, "p99_ms": pct(xs, 99),
                       "seq_req_per_s": 1e3 / statistics.mean(xs),
                       "p50_overhead_ms": p50 - base, "p50_ratio": p50 / base}
                if kind != "in-process":
                    maker = make_rest if kind == "REST" else make_grpc
                    row["conc_req_per_s"] = concurrent_throughput(maker, a.threads, a.seconds)
                else:
                    row["conc_req_per_s"] = concurrent_throughput(lambda: inproc, a.threads, a.seconds)
                row["conc_rows_per_s"] = row["conc_req_per_s"] * batch
                results["rows"].append(row)
        channel.close()
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()

    results["cpu_count"] = os.cpu_count()
    results["load_avg"] = os.getloadavg()
    hdr = (f"{'path':<11}{'batch':>6}{'p50 ms':>9}{'p99 ms':>9}{'p50 +ms':>9}{'x in-proc':>10}"
           f"{'seq req/s':>11}{f'{a.threads}-thr req/s':>13}{'rows/s':>10}")
    print(hdr)
    for r in results["rows"]:
        print(f"{r['path']:<11}{r['batch']:>6}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['p50_overhead_ms']:>9.2f}{r['p50_ratio']:>10.2f}{r['seq_req_per_s']:>11.0f}"
              f"{r['conc_req_per_s']:>13.0f}{r['conc_rows_per_s']:>10.0f}")
    print(f"cpus={results['cpu_count']} loadavg={tuple(round(x, 2) for x in results['load_avg'])}")
    b1 = {r["path"]: r for r in results["rows"] if r["batch"] == 1}
    for k in ("REST", "gRPC"):
        ok = b1[k]["p50_overhead_ms"] <= 2.0
        print(f"goal p50 overhead <= 2 ms at batch 1, {k}: {b1[k]['p50_overhead_ms']:.2f} ms -> "
              f"{'met' if ok else 'NOT met'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
