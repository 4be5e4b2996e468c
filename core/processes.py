"""Child processes that are always stopped: each in its own process group, stopped as a whole group.

    proc = start_group([sys.executable, "-m", "x"], stdout=log)   # a new session: the child leads its group
    try:
        ...
    finally:
        stop_groups([proc])          # SIGTERM (or first_signal) -> wait up to grace -> SIGKILL of the group

``stop_groups`` also kills what is left of a group whose leader already exited (a grandchild that the leader
did not take down), resumes stopped groups before killing them, and reaps every leader. ``free_ports(n)``:
``n`` distinct TCP ports free right now (best effort: another process may take one before it is used).

Code of the TF-Encrypted environment (encrypted_serving's gateway, worker, driver, program) may not import
this module: that environment imports nothing of the platform's packages, core/ included
(tests/encrypted_serving/test_module_separation.py). Its processes are started and stopped from the platform
side (encrypted_serving/service.py), which does use it."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import Iterable, List, Sequence


def start_group(argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(argv, ...)`` in a new session (its own process group; stdin closed unless given)."""
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(list(argv), start_new_session=True, **popen_kwargs)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_groups(procs: Iterable[subprocess.Popen], grace: float = 5.0,
                first_signal: int = signal.SIGTERM) -> None:
    """Stop every process group: ``first_signal`` to the live ones, wait up to ``grace`` seconds in all, then
    SIGCONT + SIGKILL to each group (stragglers included) and reap the leaders. Never raises."""
    procs = [p for p in procs if p is not None]
    for p in procs:
        if p.poll() is None:
            _signal_group(p, first_signal)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        _signal_group(p, signal.SIGCONT)
        _signal_group(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5.0)


def stop_group(proc: subprocess.Popen, grace: float = 5.0, first_signal: int = signal.SIGTERM) -> None:
    stop_groups([proc], grace, first_signal)


def free_ports(n: int, host: str = "127.0.0.1") -> List[int]:
    """``n`` distinct TCP ports free on ``host`` now (held together while picked, so they differ)."""
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


__all__ = ["start_group", "stop_group", "stop_groups", "free_ports"]
