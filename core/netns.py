"""A private network namespace for local training tasks: only they can reach each other's ports.

TensorFlow's gRPC servers (MultiWorkerMirroredStrategy's tasks) listen on every interface and accept any
client; a client that reaches a task's port can run operations on it (read the private rows' copy, read or
change the weights). The tasks of a local cluster therefore run inside one new user + network namespace
(``unshare``/``nsenter`` from util-linux, ``ip`` from iproute2) whose only interface is its own loopback:
nothing outside the namespace — not even another process of this machine — can connect to them. The tasks
talk to the executor through files only.

When the namespace cannot be made (no user namespaces, tools missing), ``PrivateNetwork.reason`` says why and
the caller decides (the multi-worker trainer prints a warning that the task ports are open)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import List, Optional


class PrivateNetwork:
    """``with PrivateNetwork() as net: Popen(net.prefix + argv)`` runs argv in the shared private namespace;
    ``net.prefix`` is empty (and ``net.reason`` set) when isolation is unavailable."""

    def __init__(self, timeout: float = 10.0):
        self._timeout = timeout
        self._holder: Optional[subprocess.Popen] = None
        self.reason: Optional[str] = None
        self.prefix: List[str] = []

    def __enter__(self) -> "PrivateNetwork":
        missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
        if missing:
            self.reason = f"{', '.join(missing)} not found (install util-linux and iproute2)"
            return self
        self._holder = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--net", "sh", "-c",
             "ip link set lo up && echo up && exec sleep 2147483647"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
        line = self._holder.stdout.readline().strip()  # "up" once the loopback is up, "" if unshare failed
        if line != "up":
            err = (self._holder.stderr.read() or "").strip().splitlines()
            self.__exit__()
            self.reason = f"unshare failed: {err[-1] if err else 'no user/network namespaces here'}"
            return self
        self.prefix = ["nsenter", f"--target={self._holder.pid}", "--user", "--net", "--preserve-credentials"]
        return self

    @property
    def isolated(self) -> bool:
        return bool(self.prefix)

    def __exit__(self, *exc) -> None:
        holder, self._holder, self.prefix = self._holder, None, []
        if holder is None or holder.poll() is not None:
            return
        try:
            os.killpg(holder.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.time() + self._timeout
        while holder.poll() is None and time.time() < deadline:
            time.sleep(0.05)


__all__ = ["PrivateNetwork"]
