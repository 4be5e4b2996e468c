"""The serving goals, measured side by side in one run against the built-in server (``python -m
serving.server``, its own process, so client and server do not share a GIL):

  1. latency: p50/p99 of REST and gRPC predict at batch 1 and 100 next to an in-process call of the same
     SavedModel signature (one keep-alive connection / one channel, client encoding and decoding
     included). Goal: p50 overhead over in-process <= 1 ms at batch 1.
  2. throughput: 32 keep-alive REST clients (an event-loop load generator in its own process, each client
     sending its next request when its answer is in), for the server with and without --enable-batching.
     Goal: >= 2,000 req/s with p99 <= 50 ms.
  3. memory: the server's RSS when idle, during and after one 45 MB predict request. Goal: back within
     100 MB of idle.

    PYTHONPATH=. python simulations/bench_serving.py [--iters 300] [--clients 32] [--seconds 10] [--json F]

Everything runs on 127.0.0.1. The machine's load average is printed with the results (on a shared
machine other jobs take CPU from both the server and the load generator).
"""
from __future__ import annotations

import argparse
import asyncio
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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GOAL_OVERHEAD_MS = 1.0
GOAL_RPS = 2000.0
GOAL_P99_MS = 50.0
GOAL_RSS_MB = 100.0


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


def rss_mb(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# ---- load generator (runs in its own process: --loadgen) ----------------------------------------------
class _Client(asyncio.Protocol):
    def __init__(self, request: bytes, stats, stop_at: float, warm_until: float, done):
        self.request, self.stats, self.stop_at, self.warm_until, self.done = request, stats, stop_at, warm_until, done
        self.buf = b""
        self.t0 = 0.0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self._send()

    def _send(self):
        self.t0 = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            i = head.lower().find(b"content-length:")
            n = 0
            if i >= 0:
                j = head.find(b"\r\n", i)
                n = int(head[i + 15:j if j >= 0 else len(head)])
            if len(self.buf) < end + 4 + n:
                return
            status = head[9:12]
            self.buf = self.buf[end + 4 + n:]
            now = time.perf_counter()
            if now >= self.warm_until:
                self.stats["lat"].append((now - self.t0) * 1e3)
                if status != b"200":
                    self.stats["errors"] += 1
            if now >= self.stop_at:
                self.transport.close()
                return
            self._send()

    def connection_lost(self, exc):
        if not self.done.done():
            self.stats["closed"] += 1
        self.stats["open"] -= 1
        if self.stats["open"] == 0 and not self.done.done():
            self.done.set_result(None)


async def _loadgen(port: int, request: bytes, clients: int, seconds: float, warmup: float) -> dict:
    loop = asyncio.get_running_loop()
    stats = {"lat": [], "errors": 0, "closed": 0, "open": clients}
    start = time.perf_counter()
    warm_until, stop_at = start + warmup, start + warmup + seconds
    done = loop.create_future()
    for _ in range(clients):
        await loop.create_connection(lambda: _Client(request, stats, stop_at, warm_until, done), "127.0.0.1", port)
    await asyncio.wait_for(done, warmup + seconds + 60)
    lat = stats["lat"]
    return {"clients": clients, "seconds": seconds, "requests": len(lat), "req_per_s": len(lat) / seconds,
            "p50_ms": statistics.median(lat) if lat else None, "p99_ms": pct(lat, 99) if lat else None,
            "errors": stats["errors"]}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_loadgen(port: int, body: bytes, clients: int, seconds: float, warmup: float = 1.0,
                server_pid: int = None) -> dict:
    req = (f"POST /v1/models/adult:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with tempfile.NamedTemporaryFile(suffix=".req", delete=False) as f:
        f.write(req)
    c0 = cpu_s(server_pid) if server_pid else None
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--loadgen", str(port), f.name,
                              str(clients), str(seconds), str(warmup)], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if server_pid:   # server CPU per request: less sensitive to other jobs than req/s (warm-up included)
        r["server_cpu_us_per_req"] = (cpu_s(server_pid) - c0) / (r["req_per_s"] * (seconds + warmup)) * 1e6
    return r


# ---- server process ---------------------------------------------------------------------------------------
def start_server(serving_dir: str, *flags):
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--serving-dir", serving_dir, "--rest-port", "0",
                             "--grpc-port", "0", "--poll-interval", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path[1:])))
    line = ""
    while not line.startswith("READY"):
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise SystemExit("server failed to start")
    rest_port, grpc_port = (int(x.split("=")[1]) for x in line.split()[1:3])
    return proc, rest_port, grpc_port


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


def memory_after_big_request(proc, rest_port: int, small_body: bytes) -> dict:
    import numpy as np

    def post(body, timeout=300):
        c = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=timeout)
        try:
            c.request("POST", "/v1/models/adult:predict", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            return r.status, len(data)
        finally:
            c.close()

    post(small_body)
    idle = rss_mb(proc.pid)
    n = 1_000_000
    rng = np.random.default_rng(0)
    big = json.dumps({"signature_name": "predict_raw", "inputs": {
        "age": rng.uniform(17, 90, n).tolist(), "hours": rng.uniform(1, 80, n).tolist(),
        "workclass": ["Self-emp"] * n}}).encode()
    peak = [idle]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=watch)
    t.start()
    t0 = time.perf_counter()
    try:
        status, resp_len = post(big)
    finally:
        stop.set()
        t.join()
    secs = time.perf_counter() - t0
    for _ in range(5):      # a few ordinary requests, then let a trim finish
        post(small_body)
    time.sleep(2.0)
    after = rss_mb(proc.pid)
    return {"request_mb": len(big) / 1e6, "status": status, "response_mb": resp_len / 1e6, "seconds": secs,
            "idle_mb": idle, "peak_mb": peak[0], "after_mb": after, "growth_mb": after - idle}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--clients", type=int, default=32, help="keep-alive REST clients for the throughput run")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each throughput run")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.testing import export_demo_model, make_example, random_rows

    tmp = tempfile.TemporaryDirectory(prefix="bench-serving-")
    path = export_demo_model(os.path.join(tmp.name, "adult", "1"))
    results = {"latency": [], "throughput": [], "load_avg_start": os.getloadavg(), "cpu_count": os.cpu_count()}
    model = tf.saved_model.load(path)
    sig = model.signatures["serving_default"]
    one_body = json.dumps({"instances": [{"b64": base64.b64encode(make_example(*random_rows(1)[0])).decode()}]}).encode()

    proc, rest_port, grpc_port = start_server(tmp.name)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for batch in (1, 100):
            examples = [make_example(*r) for r in random_rows(batch, seed=batch)]
            body = json.dumps({"instances": [{"b64": base64.b64encode(e).decode()} for e in examples]})
            conn = http.client.HTTPConnection("127.0.0.1", rest_port)

            def inproc():
                out = sig(examples=tf.constant(examples))
                return {k: v.numpy() for k, v in out.items()}

            def rest():
                conn.request("POST", "/v1/models/adult:predict", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                assert r.status == 200, data
                return json.loads(data)

            req = predict_pb2.PredictRequest()
            req.model_spec.name = "adult"
            req.inputs["examples"].CopyFrom(tf.make_tensor_proto(examples))

            def grpc_call():
                resp = stub.Predict(req, timeout=30)
                return {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}

            ref = inproc()
            np.testing.assert_allclose([p["logits"] for p in rest()["predictions"]], ref["logits"], rtol=1e-5)
            np.testing.assert_allclose(grpc_call()["logits"], ref["logits"], rtol=1e-5)
            iters = a.iters if batch == 1 else max(50, a.iters // 3)
            # interleaved rounds, so a burst of load from other jobs hits all three paths alike
            lat = {"in-process": [], "REST": [], "gRPC": []}
            for _ in range(5):
                for kind, fn in (("in-process", inproc), ("REST", rest), ("gRPC", grpc_call)):
                    lat[kind] += timed(fn, iters // 5, a.warmup // 5)
            conn.close()
            base = statistics.median(lat["in-process"])
            for kind, xs in lat.items():
                p50 = statistics.median(xs)
                results["latency"].append({"path": kind, "batch": batch, "p50_ms": p50, "p99_ms": pct(xs, 99),
                                           "p50_overhead_ms": p50 - base, "seq_req_per_s": 1e3 / statistics.mean(xs)})
        channel.close()
        results["throughput"].append(dict(run_loadgen(rest_port, one_body, a.clients, a.seconds,
                                                       server_pid=proc.pid), batching=False))
        if not a.skip_memory:
            results["memory"] = memory_after_big_request(proc, rest_port, one_body)
    finally:
        stop_server(proc)
    proc, rest_port, _ = start_server(tmp.name, "--enable-batching")
    try:
        results["throughput"].append(dict(run_loadgen(rest_port, one_body, a.clients, a.seconds,
                                                       server_pid=proc.pid), batching=True))
    finally:
        stop_server(proc)
        tmp.cleanup()
    results["load_avg_end"] = os.getloadavg()

    print(f"{'path':<11}{'batch':>6}{'p50 ms':>9}{'p99 ms':>9}{'p50 +ms':>9}{'seq req/s':>11}")
    for r in results["latency"]:
        print(f"{r['path']:<11}{r['batch']:>6}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['p50_overhead_ms']:>9.2f}"
              f"{r['seq_req_per_s']:>11.0f}")
    print()
    print(f"{'REST, keep-alive clients':<28}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'server CPU us/req':>19}")
    for r in results["throughput"]:
        name = "batching on" if r["batching"] else "batching off (default)"
        print(f"{name:<28}{r['clients']:>8}{r['req_per_s']:>9.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['errors']:>8}{r.get('server_cpu_us_per_req', float('nan')):>19.0f}")
    if "memory" in results:
        m = results["memory"]
        print(f"\nmemory: {m['request_mb']:.1f} MB request (status {m['status']}, {m['seconds']:.1f} s): RSS idle "
              f"{m['idle_mb']:.0f} MB, peak {m['peak_mb']:.0f} MB, after {m['after_mb']:.0f} MB "
              f"(+{m['growth_mb']:.0f} MB)")
    la = results["load_avg_start"], results["load_avg_end"]
    print(f"\ncpus={results['cpu_count']} load average at start {tuple(round(x, 2) for x in la[0])}, "
          f"at end {tuple(round(x, 2) for x in la[1])}")
    b1 = {r["path"]: r for r in results["latency"] if r["batch"] == 1}
    goals = []
    for k in ("REST", "gRPC"):
        goals.append((f"p50 overhead at batch 1, {k} <= {GOAL_OVERHEAD_MS:g} ms",
                      f"{b1[k]['p50_overhead_ms']:.2f} ms", b1[k]["p50_overhead_ms"] <= GOAL_OVERHEAD_MS))
    for r in results["throughput"]:
        goals.append((f"{r['clients']} clients, batching {'on' if r['batching'] else 'off'}: >= {GOAL_RPS:.0f} "
                      f"req/s, p99 <= {GOAL_P99_MS:g} ms", f"{r['req_per_s']:.0f} req/s, p99 {r['p99_ms']:.1f} ms",
                      r["req_per_s"] >= GOAL_RPS and r["p99_ms"] <= GOAL_P99_MS and not r["errors"]))
    if "memory" in results:
        m = results["memory"]
        goals.append((f"RSS within {GOAL_RSS_MB:g} MB of idle after a 45 MB request", f"+{m['growth_mb']:.0f} MB",
                      m["status"] == 200 and m["growth_mb"] <= GOAL_RSS_MB))
    for what, got, ok in goals:
        print(f"goal {what}: {got} -> {'met' if ok else 'NOT met'}")
    results["goals"] = [{"goal": w, "measured": g, "met": ok} for w, g, ok in goals]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        _, _, port, req_file, clients, seconds, warmup = sys.argv
        with open(req_file, "rb") as f:
            request = f.read()
        print(json.dumps(asyncio.run(_loadgen(int(port), request, int(clients), float(seconds), float(warmup)))))
        sys.exit(0)
    sys.exit(main())
