"""The cluster description shared by the launcher (platform env) and the players/client (encrypted env).

``cluster.json`` (written by ``launcher.EncryptedService`` into its run directory)::

    {"format": "privtrain-encrypted-cluster/1",
     "protocol": "aby3" | "pond",
     "job_name": "tfe",
     "players": [["server0", "127.0.0.1:P0"], ["server1", ...], ["server2", ...],
                 ["model-owner", ...], ["prediction-client", ...]],
     "public_dir": "<run_dir>/public",           # model.json + preprocessing.json (no weights)
     "weights_stage_dir": "<run_dir>/model-owner/weights",  # raw float32 files, read only by the model owner's TF worker
     "run_dir": "<run_dir>"}

The player order is the TF cluster's task order (task i of job ``tfe``). Pure Python; both environments.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Dict, List, Optional, Tuple

FORMAT = "privtrain-encrypted-cluster/1"
COMPUTE_PARTIES = ("server0", "server1", "server2")
MODEL_OWNER = "model-owner"
CLIENT = "prediction-client"
PLAYERS = COMPUTE_PARTIES + (MODEL_OWNER, CLIENT)
SERVICE_PLAYERS = COMPUTE_PARTIES + (MODEL_OWNER,)   # long-running processes started by the service
PROTOCOLS = ("aby3", "pond")
JOB_NAME = "tfe"
CLUSTER_JSON = "cluster.json"


class ClusterError(RuntimeError):
    pass


def make_cluster(ports: Dict[str, int], protocol: str, run_dir: str, host: str = "127.0.0.1") -> dict:
    if protocol not in PROTOCOLS:
        raise ClusterError("protocol must be one of %s, got %r" % (PROTOCOLS, protocol))
    missing = [p for p in PLAYERS if p not in ports]
    if missing:
        raise ClusterError("no port for %s" % missing)
    return {"format": FORMAT, "protocol": protocol, "job_name": JOB_NAME,
            "players": [[p, "%s:%d" % (host, int(ports[p]))] for p in PLAYERS],
            "public_dir": os.path.join(run_dir, "public"),
            "weights_stage_dir": os.path.join(run_dir, MODEL_OWNER, "weights"),
            "run_dir": run_dir}


def save(cluster: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cluster, f, indent=2)
    os.replace(tmp, path)


def load(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, CLUSTER_JSON)
    try:
        with open(path) as f:
            cluster = json.load(f)
    except OSError as e:
        raise ClusterError("cannot read cluster description %s (is the encrypted service running?): %s"
                           % (path, e)) from e
    if cluster.get("format") != FORMAT:
        raise ClusterError("%s: format must be %r" % (path, FORMAT))
    names = [p for p, _ in cluster["players"]]
    if tuple(names) != PLAYERS:
        raise ClusterError("%s: players must be %s in that order, got %s" % (path, PLAYERS, names))
    return cluster


def address(cluster: dict, name: str) -> str:
    return dict((p, a) for p, a in cluster["players"])[name]


def task_index(name: str) -> int:
    return PLAYERS.index(name)


def split_address(addr: str) -> Tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def port_open(addr: str, timeout: float = 0.5) -> bool:
    host, port = split_address(addr)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def answers(addr: str, timeout: float = 2.0) -> bool:
    """True if the gRPC server at addr answers an HTTP/2 preface within timeout.

    Unlike a TCP connect (which the kernel completes even for a stopped process), this needs the
    party's process to run: it tells a silent party (SIGSTOPped, wedged) from a live one.
    """
    host, port = split_address(addr)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(_H2_PREFACE)
            return len(s.recv(9)) > 0
    except OSError:
        return False


def silent(cluster: dict, names=SERVICE_PLAYERS, timeout: float = 2.0) -> List[str]:
    """Names of players whose port is open but whose process does not answer."""
    return [n for n in names if port_open(address(cluster, n), 0.5) and not answers(address(cluster, n), timeout)]


def unreachable(cluster: dict, names=SERVICE_PLAYERS, timeout: float = 0.5) -> List[str]:
    """Names of players (default: the service's) whose port does not accept a TCP connection."""
    return [n for n in names if not port_open(address(cluster, n), timeout)]


def free_ports(n: int, host: str = "127.0.0.1") -> List[int]:
    """n distinct currently-free TCP ports (best effort: another process may grab one before use)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports
