"""Helpers shared by the serving tests."""
from __future__ import annotations

import os
import shutil
import threading


def push_version(serving_dir, model_templates, name, version, template):
    """Copy a template into ``<serving_dir>/<name>/<version>`` the way a push would (temp + rename)."""
    model_dir = os.path.join(str(serving_dir), name)
    os.makedirs(model_dir, exist_ok=True)
    tmp = os.path.join(model_dir, f".tmp-{version}")
    shutil.copytree(model_templates[template], tmp)
    os.replace(tmp, os.path.join(model_dir, str(version)))


def privtrain_threads():
    return [t for t in threading.enumerate() if t.name.startswith("privtrain") and t.is_alive()]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def raw_http(port, data: bytes, timeout=30.0, host="127.0.0.1"):
    """Send raw bytes on a fresh connection and read until the server closes it: the bytes received."""
    import socket

    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def split_responses(raw: bytes):
    """``[(status, headers dict (lower-case), body bytes)]`` of HTTP/1.1 responses back to back."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:n]))
        raw = rest[n:]
    return out


def start_server_process(serving_dir, *args, env_extra=None):
    """``python -m serving.server`` on free ports: (Popen, rest_port, grpc_port). The caller stops it."""
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="3", **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", "serving.server", "--serving-dir", str(serving_dir),
                             "--rest-port", "0", "--grpc-port", "0", "--poll-interval", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = ""
    t0 = time.monotonic()
    while not line.startswith("READY") and time.monotonic() - t0 < 180:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    if not line.startswith("READY"):
        stop_process(proc)
        raise AssertionError(f"server did not start (rc={proc.poll()})")
    rest, grpc_port = (int(x.split("=")[1]) for x in line.split()[1:3])
    return proc, rest, grpc_port


def stop_process(proc, timeout=30):
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()
