"""SecAgg+ clients in their own processes (``--secure-aggregation --worker-processes N``).

``ProcessClients(ids, processes=N)`` starts N Python processes (``python -m federated.secagg.processes``, no TF),
each hosting a share of the clients: it generates their long-term Ed25519 keys itself (only the public halves
leave it) and, per round, runs their side of the protocol. Each process gets the run configuration it trusts (the
``protocol.Policy``: degree, threshold rule, noise floor) on its command line at start, and checks every round's
parameters against it. The driver passes protocol messages and the clients' encoded inputs as data-only frames
(``wire``: tagged JSON, never pickle, validated on receipt) over the child's stdin/stdout; the server object in
the driver process sees the same messages as in-process. The processes are always stopped (context
manager: on exit, on an exception, and at interpreter exit).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Mapping

import numpy as np

from federated.secagg.wire import WireError, recv as _recv, send as _send

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ("advertise", "reveal", "share_keys", "masked_input", "consistency", "unmask")


class ProcessClients:
    def __init__(self, ids: Iterable[int], processes: int, policy=None):
        from federated.secagg.protocol import Policy

        policy = policy or Policy()
        ids = sorted(int(i) for i in ids)
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.procs: List[subprocess.Popen] = []
        self.owner: Dict[int, int] = {i: k % processes for k, i in enumerate(ids)}
        env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        atexit.register(self.close)
        try:
            for _ in range(processes):
                self.procs.append(subprocess.Popen([sys.executable, "-m", "federated.secagg.processes",
                                                    json.dumps(dataclasses.asdict(policy))],
                                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                                   cwd=_ROOT))
            from cryptography.hazmat.primitives.asymmetric import ed25519

            raw: Dict[int, bytes] = {}
            for k, p in enumerate(self.procs):
                _send(p.stdin, ("keys", [i for i in ids if self.owner[i] == k]))
            for p in self.procs:
                raw.update(self._answer(p))
            self._directory = {i: ed25519.Ed25519PublicKey.from_public_bytes(b) for i, b in raw.items()}
            for p in self.procs:   # the PKI: every client's verification key, to every process
                _send(p.stdin, ("directory", raw))
            for p in self.procs:
                self._answer(p)
        except BaseException:
            self.close()
            raise
        self._bytes: Dict[int, int] = {}

    @property
    def directory(self):
        return dict(self._directory)

    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def _answer(self, p):
        return self._check(_recv(p.stdout))

    @staticmethod
    def _check(frame):
        from federated.secagg.protocol import ProtocolAbort

        kind, value = frame
        if kind == "abort":
            raise ProtocolAbort(value)
        if kind == "error":
            raise RuntimeError(f"secure aggregation client process failed: {value}")
        return value

    def start(self, params) -> None:
        for p in self.procs:
            _send(p.stdin, ("start", params))
        for p in self.procs:
            self._answer(p)

    def call(self, method: str, args: Mapping[int, tuple]):
        parts: Dict[int, Dict[int, tuple]] = {}
        for i, a in args.items():
            parts.setdefault(self.owner[i], {})[i] = a
        for k, part in parts.items():   # every process works at once
            _send(self.procs[k].stdin, ("call", method, part))
        frames = [_recv(self.procs[k].stdout) for k in parts]   # read every answer before raising one
        out = {}
        for f in frames:
            out.update(self._check(f))
        return out, None

    def bytes_per_client(self, ids) -> float:
        ids = list(ids)
        totals = {}
        for k in {self.owner[i] for i in ids}:
            _send(self.procs[k].stdin, ("bytes", [i for i in ids if self.owner[i] == k]))
            totals.update(self._answer(self.procs[k]))
        return float(np.mean([totals[i] for i in ids]))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    _send(p.stdin, ("stop",))
                except (BrokenPipeError, OSError, ValueError):
                    pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for s in (p.stdin, p.stdout):
                try:
                    s.close()
                except (OSError, ValueError):
                    pass
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve(policy_json: str) -> None:   # the client process
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from federated.secagg.protocol import Client, Params, Policy, ProtocolAbort

    policy = Policy(**json.loads(policy_json))   # the trusted run configuration, from the command line

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # nothing but frames on the pipe
    keys: Dict[int, ed25519.Ed25519PrivateKey] = {}
    directory: Dict[int, ed25519.Ed25519PublicKey] = {}
    clients: Dict[int, Client] = {}
    while True:
        try:
            msg = _recv(stdin)
        except EOFError:
            return
        except WireError as e:   # answered, never executed; the pipe stays in step (the length was read)
            _send(stdout, ("abort", f"client process: refused a frame: {e}"))
            continue
        try:
            if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
                raise ProtocolAbort("client process: a frame must be a list starting with a command name")
            if msg[0] == "stop":
                return
            if msg[0] == "keys":
                keys = {int(i): ed25519.Ed25519PrivateKey.generate() for i in msg[1]}
                out = {i: k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                       for i, k in keys.items()}
                _send(stdout, ("ok", out))
            elif msg[0] == "directory":
                directory = {i: ed25519.Ed25519PublicKey.from_public_bytes(b) for i, b in msg[1].items()}
                _send(stdout, ("ok", None))
            elif msg[0] == "start":
                params = msg[1]
                if not isinstance(params, Params):
                    raise ProtocolAbort("client process: round parameters expected")
                try:
                    policy.check(params)
                except ValueError as e:
                    raise ProtocolAbort(f"client process: refused the round parameters: {e}") from None
                clients = {i: Client(i, keys[i], directory, params, policy) for i in params.clients if i in keys}
                _send(stdout, ("ok", None))
            elif msg[0] == "call":
                _, method, part = msg
                if method not in METHODS or not isinstance(part, dict):
                    raise ProtocolAbort(f"client process: unknown protocol step {method!r}")
                _send(stdout, ("ok", {i: getattr(clients[i], method)(*a) for i, a in part.items()}))
            elif msg[0] == "bytes":
                _send(stdout, ("ok", {i: clients[i].bytes_sent + clients[i].bytes_received for i in msg[1]}))
        except ProtocolAbort as e:
            _send(stdout, ("abort", str(e)))
        except Exception as e:   # noqa: BLE001 - reported to the driver, which raises it
            _send(stdout, ("error", f"{type(e).__name__}: {e}"))


if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else "{}")
