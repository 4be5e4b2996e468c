"""Gateway client for prediction clients and the model owner: plain numpy + grpcio, no TF (both environments).

A client holds ``client.json`` (gateway addresses, the service CA, its own certificate and key) and nothing
else: no TF cluster address, no party access. It encodes its features with TFE's fixed-point encoding,
splits them into three additive ring shares with the OS CSPRNG, sends party i only its replicated pair
``(s_i, s_{i+1})`` over mutual TLS, fetches one output share from each party and adds them up locally.

    c = ShareClient("client.json"); c.predict_logits(x)      # x: [n, input_dim] preprocessed floats
    c.predict_rows(rows)                                      # raw rows -> dict(logits/probabilities/labels)
    upload_model("model-owner.json", encrypted_model_dir)    # the model owner, once per model

    python -m encrypted_serving.share_client predict --client client.json --input FILE [--limit N]
    python -m encrypted_serving.share_client upload --client model-owner.json --model DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Dict, List, Optional

import grpc
import numpy as np

from encrypted_serving import certs
from encrypted_serving import parties as pc
from encrypted_serving import ring

SERVICE = "/privtrain.ShareGateway/"
MAX_MSG = 64 * 1024 * 1024


class ShareClientError(RuntimeError):
    """A gateway refused or failed a request, or could not be reached; the message names party and cause."""

    def __init__(self, message, code=None, party=None):
        super().__init__(message)
        self.code, self.party = code, party


def _ident(x):
    return x


def _tcp_open(addr: str) -> bool:
    import socket
    host, port = addr.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
        return True
    except (OSError, ValueError):
        return False


def explain(party: str, addr: str, err: grpc.RpcError) -> ShareClientError:
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else str(err)) or ""
    low = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        listening = _tcp_open(addr)
        if not listening or any(k in low for k in ("connection refused", "connection reset", "broken pipe")):
            msg = ("gateway of party %s at %s is unreachable (%s): is the service running, or is the gateway "
                   "restarting?" % (party, addr, "nothing listens there" if not listening else
                                    details.splitlines()[0][:120]))
        elif any(k in low for k in ("ssl", "handshake", "certificate", "tls", "socket closed")):
            msg = ("TLS handshake with the gateway of party %s (%s) failed: it rejected this client's certificate "
                   "(expired, revoked or not issued by the service CA) or its own certificate is not trusted" % (party, addr))
        else:
            msg = "gateway of party %s at %s is unavailable: %s" % (party, addr, details.splitlines()[0][:300])
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and ("deadline exceeded" == low.strip() or not low.strip()):
        msg = "gateway of party %s at %s did not answer in time (party stopped or overloaded)" % (party, addr)
    else:
        msg = details.splitlines()[0][:500] if details else str(code)
    return ShareClientError(msg, code, party)


class ShareClient:
    def __init__(self, client_json: str, timeout_s: float = 60.0):
        self.cfg = pc.load_client(client_json)
        certs.check_valid(self.cfg["cert"], "client certificate")
        with open(self.cfg["ca"], "rb") as f:
            ca = f.read()
        with open(self.cfg["key"], "rb") as f:
            key = f.read()
        with open(self.cfg["cert"], "rb") as f:
            cert = f.read()
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        self.timeout = float(timeout_s)
        self.gateways = [(name, addr) for name, addr in self.cfg["gateways"]]
        self.channels, self.calls = [], []
        for name, addr in self.gateways:
            ch = grpc.secure_channel(addr, creds, options=[
                # the gateway must hold *that* party's certificate: a party-role name that only certificates
                # issued for a gateway carry (serverAuth only; a client certificate called server0 does not match)
                ("grpc.ssl_target_name_override", certs.tls_name(name, "party")),
                ("grpc.max_receive_message_length", MAX_MSG), ("grpc.max_send_message_length", MAX_MSG)])
            self.channels.append(ch)
            self.calls.append({m: ch.unary_unary(SERVICE + m, request_serializer=_ident, response_deserializer=_ident)
                               for m in ("Info", "Submit", "Fetch", "Predict")})
        self._info = None

    def close(self):
        for ch in self.channels:
            ch.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ RPC helpers
    def _all(self, method: str, payloads: List[bytes], timeout: float) -> List[bytes]:
        """The same call at the three gateways in parallel; the first failure cancels the others at once."""
        import threading
        futs = [self.calls[i][method].future(payloads[i], timeout=timeout) for i in range(3)]
        changed = threading.Event()
        for f in futs:
            f.add_done_callback(lambda _f: changed.set())
        while True:
            done = [f.done() for f in futs]
            failed = [i for i, f in enumerate(futs) if f.done() and f.exception() is not None]
            if failed or all(done):
                break
            changed.wait(0.5)
            changed.clear()
        errors = []
        for i, f in enumerate(futs):
            if not f.done():
                f.cancel()
            elif f.exception() is not None:
                errors.append(explain(self.gateways[i][0], self.gateways[i][1], f.exception()))
        if errors:
            # the most specific message: one that names a party's problem beats a generic one
            errors.sort(key=lambda e: (e.code == grpc.StatusCode.DEADLINE_EXCEEDED, "service stopped" not in str(e)))
            raise errors[0]
        return [f.result() for f in futs]

    def info(self) -> dict:
        if self._info is None:
            infos = [json.loads(r.decode()) for r in self._all("Info", [b"{}"] * 3, min(self.timeout, 15.0))]
            if any(i["model"] != infos[0]["model"] for i in infos):
                raise ShareClientError("the three gateways describe different models: ask the operator")
            self._info = infos[0]
        return self._info

    def _roundtrip(self, kind: str, per_party: List[Dict[str, np.ndarray]], extra=None) -> List[tuple]:
        """Predict (= Submit + Fetch on one call) at the three gateways in parallel."""
        rid = uuid.uuid4().hex
        frames = [ring.pack(dict({"kind": kind, "request_id": rid}, **(extra or {})), per_party[i]) for i in range(3)]
        replies = self._all("Predict", frames, self.timeout)
        return [ring.unpack(r) for r in replies]

    # ------------------------------------------------------------------ predictions
    def predict_shares(self, x: np.ndarray):
        """One batch (n must be an allowed batch size): ([output share per party], output kind)."""
        pairs = ring.share_for_parties(x)
        out = self._roundtrip("predict", [{"a": a, "b": b} for a, b in pairs])
        return [arrays["share"] for _, arrays in out], out[0][0].get("output", "logit")

    def predict(self, x: np.ndarray) -> dict:
        """Preprocessed features [n, input_dim] -> {"logits": ... or "labels": ...} (padded to allowed sizes)."""
        info = self.info()
        x = np.asarray(x, dtype=np.float64)
        d = info["model"]["input_dim"]
        if x.ndim != 2 or x.shape[1] != d:
            raise ShareClientError("features must have shape [n, %d], got %s" % (d, list(x.shape)))
        sizes = sorted(info["batch_sizes"])
        values, kind = [], info["output"]
        i = 0
        while i < len(x):
            chunk = x[i:i + sizes[-1]]
            size = next(s for s in sizes if s >= len(chunk))
            pad = np.zeros((size, d)) if size != len(chunk) else None
            if pad is not None:
                pad[:len(chunk)] = chunk
            shares, kind = self.predict_shares(chunk if pad is None else pad)
            if kind == "label":
                values.append(1 - ring.combine_bits(shares)[:len(chunk)])     # msb set <=> logit < 0
            else:
                values.append(ring.decode(ring.combine(shares))[:len(chunk)])
            i += len(chunk)
        v = np.concatenate(values) if values else np.zeros((0,))
        if kind == "label":
            return {"output": "label", "labels_predicted": v.astype(int)}
        return {"output": "logit", "logits": v, "probabilities": 1.0 / (1.0 + np.exp(-v))}

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        r = self.predict(x)
        if r["output"] != "logit":
            raise ShareClientError("this service returns labels only (output policy 'label')")
        return r["logits"]

    def predict_rows(self, rows) -> dict:
        from encrypted_serving import preprocessing as pp
        info = self.info()
        spec = pp.validate_spec(info["preprocessing"], expected_dim=info["model"]["input_dim"])
        return self.predict(pp.transform(rows, spec))

    # ------------------------------------------------------------------ the model owner
    def upload_weights(self, weights: Dict[str, np.ndarray]) -> float:
        t0 = time.perf_counter()
        per_party = [{}, {}, {}]
        for key, w in weights.items():
            for i, (a, b) in enumerate(ring.share_for_parties(w)):
                per_party[i][key + "/a"], per_party[i][key + "/b"] = a, b
        self._roundtrip("model", per_party)
        return time.perf_counter() - t0


def upload_model(client_json: str, model_dir: str, timeout_s: float = 300.0) -> float:
    """The model owner: read its own encrypted_model dir, share every weight array, upload. Returns seconds."""
    from encrypted_serving import model_format as mf
    config = mf.load_config(model_dir)
    weights = mf.load_weights(model_dir, config)
    with ShareClient(client_json, timeout_s) as c:
        return c.upload_weights(weights)


def predict_file(client_json: str, input_file: str, dataset: str, limit: Optional[int] = None,
                 timeout_s: float = 60.0) -> dict:
    from encrypted_serving import preprocessing as pp
    desc = pp.load_dataset_description(dataset)
    rows, labels = pp.read_raw_rows(input_file, desc, limit=limit)
    if not rows:
        raise pp.PreprocessingError("%s holds no rows" % input_file)
    t0 = time.perf_counter()
    with ShareClient(client_json, timeout_s) as c:
        r = c.predict_rows(rows)
    out = {"n": len(rows), "protocol": "aby3", "output": r["output"], "labels": labels,
           "seconds": round(time.perf_counter() - t0, 4)}
    if r["output"] == "logit":
        out["logits"] = [float(v) for v in r["logits"]]
        out["probabilities"] = [float(v) for v in r["probabilities"]]
    else:
        out["predicted_labels"] = [int(v) for v in r["labels_predicted"]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="privtrain encrypted-serving gateway client")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict")
    p.add_argument("--client", required=True, help="client.json")
    p.add_argument("--input", required=True)
    p.add_argument("--dataset", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "data", "adult"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("upload")
    p.add_argument("--client", required=True, help="the model owner's client.json")
    p.add_argument("--model", required=True, help="encrypted_model directory")
    args = ap.parse_args(argv)
    from encrypted_serving import model_format as mf, preprocessing as pp
    try:
        if args.cmd == "predict":
            print(json.dumps(predict_file(args.client, args.input, args.dataset, args.limit, args.timeout)))
        else:
            print(json.dumps({"uploaded": args.model, "seconds": upload_model(args.client, args.model)}))
    except (ShareClientError, certs.CertError, pc.ConfigError, pp.PreprocessingError, mf.ModelFormatError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 3 if isinstance(e, ShareClientError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
