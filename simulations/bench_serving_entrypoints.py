"""RSS growth of the server after a 50 MB REST request (1,000,000 rows, columnar ``predict_raw``) and then
after a 4 MB gRPC request of 2,000,000 empty strings, started as ``privtrain serve`` (mode ``cli``) or as
``python -m serving.server`` (mode ``module``), over the test exporter's demo model.

    PYTHONPATH=. python simulations/bench_serving_entrypoints.py cli|module [REPO]

REPO (default: this checkout) is the code the server runs, so two checkouts can be compared.
"""
import json, os, subprocess, sys, tempfile, time, socket
import numpy as np
mode = sys.argv[1]
repo = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
work = tempfile.mkdtemp(prefix="privtrain-bench-")
sys.path.insert(0, repo)
from serving.testing import export_demo_model  # noqa: E402
export_demo_model(os.path.join(work, "serving", "adult", "1"))
env = dict(os.environ, PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL="3")
env.pop("TF_ENABLE_ONEDNN_OPTS", None)
if mode == "cli":
    cmd = [sys.executable, "-m", "privtrain_cli", "serve", "--workdir", work, "--rest-port", "0", "--grpc-port", "0"]
else:
    cmd = [sys.executable, "-m", "serving.server", "--serving-dir", work + "/serving", "--rest-port", "0", "--grpc-port", "0",
           "--poll-interval", "0"]
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=repo)
import atexit  # noqa: E402
atexit.register(lambda: p.poll() is None and (p.terminate(), p.wait(60)))   # also when something fails
line = ""
while not line.startswith("READY"):
    line = p.stdout.readline()
    if not line and p.poll() is not None:
        sys.exit("no start")
rest, grpc_port = (int(x.split("=")[1]) for x in line.split()[1:3])
def rss():
    with open(f"/proc/{p.pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
def post(body, path="/v1/models/adult:predict"):
    s = socket.create_connection(("127.0.0.1", rest), timeout=300)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    out = b""
    while True:
        c = s.recv(1 << 20)
        if not c: break
        out += c
    s.close()
    return out[:12]
from serving.testing import make_example
import base64
small = json.dumps({"instances": [{"b64": base64.b64encode(make_example(39.0, 40.0, "Private")).decode()}]}).encode()
post(small)
time.sleep(2)
idle = rss()
n = 1_000_000
rng = np.random.default_rng(0)
big = json.dumps({"signature_name": "predict_raw", "inputs": {"age": rng.uniform(17, 90, n).tolist(),
      "hours": rng.uniform(1, 80, n).tolist(), "workclass": ["Self-emp"] * n}}).encode()
print(mode, "REST body MB", round(len(big) / 1e6, 1), post(big))
post(small); time.sleep(5)
after_rest = rss()
import grpc, tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
req = predict_pb2.PredictRequest(); req.model_spec.name = "adult"
t = req.inputs["examples"]; t.dtype = 7; t.tensor_shape.dim.add().size = 2_000_000
t.string_val.extend([b""] * 2_000_000)
print("grpc message MB", round(req.ByteSize() / 1e6, 1))
with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]) as ch:
    st = prediction_service_pb2_grpc.PredictionServiceStub(ch)
    r = st.Predict(req, timeout=300)
    time.sleep(5)
after_grpc = rss()
print(f"{mode}: idle {idle:.0f} MB, after 47MB REST +{after_rest - idle:.0f} MB, after 2M empty strings gRPC +{after_grpc - after_rest:.0f} MB")
p.terminate(); p.wait(60)
import shutil  # noqa: E402
shutil.rmtree(work, ignore_errors=True)
