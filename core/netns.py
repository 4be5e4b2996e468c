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

import shutil
import signal
import subprocess
from typing import List, Optional

from core.processes import start_group, stop_group


class PrivateNetwork:
    """``with PrivateNetwork() as net: Popen(net.prefix + argv)`` runs argv in the shared private namespace;
    ``net.prefix`` is empty (and ``net.reason`` set) when isolation is unavailable."""

    def __init__(self):
        self._holder: Optional[subprocess.Popen] = None
        self.reason: Optional[str] = None
        self.prefix: List[str] = []

    def __enter__(self) -> "PrivateNetwork":
        missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
        if missing:
            self.reason = f"{', '.join(missing)} not found (install util-linux and iproute2)"
            return self
        self._holder = start_group(
            ["unshare", "--user", "--map-root-user", "--net", "sh", "-c",
             "ip link set lo up && echo up && exec sleep 2147483647"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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

    @property
    def namespace_file(self) -> Optional[str]:
        """The namespace's file (``/proc/<holder>/ns/net``): a process is inside iff its own
        ``/proc/<pid>/ns/net`` has the same inode (how a peer's side checks it); None without isolation."""
        return f"/proc/{self._holder.pid}/ns/net" if self.prefix else None

    def __exit__(self, *exc) -> None:
        holder, self._holder, self.prefix = self._holder, None, []
        if holder is not None:
            stop_group(holder, grace=0.0, first_signal=signal.SIGKILL)
            for stream in (holder.stdout, holder.stderr):
                if stream is not None:
                    stream.close()


__all__ = ["PrivateNetwork"]
