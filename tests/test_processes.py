"""core/processes.py: every stop path takes the whole process group down, whatever its leader did.

The helper child below leads its group and starts a grandchild that ignores SIGTERM and SIGINT; on either the leader
exits at once. The old stop paths (multi-worker training's ``stop``, the federated workers') sent SIGKILL only
when the leader outlived the grace period, so the grandchild (a TF server holding the rows, in real life)
kept running. Each stop path is checked here, with no process left behind even when an assertion fails."""
import os
import signal
import subprocess
import sys
import time

import pytest

from core.processes import free_ports, start_group, stop_group

CHILD = r"""
import os, signal, subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE, text=True)
g.stdout.readline()
print(g.pid, flush=True)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
signal.signal(signal.SIGINT, lambda *_: os._exit(0))
time.sleep(600)
"""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def group():
    proc = start_group([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    grandchild = int(proc.stdout.readline())
    yield proc, grandchild
    stop_group(proc, grace=0.0, first_signal=signal.SIGKILL)   # whatever the test did: nothing left


def _gone(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_stop_group_kills_a_grandchild_that_ignores_sigterm(group):
    proc, grandchild = group
    assert os.getpgid(grandchild) == proc.pid != os.getpgid(0)
    stop_group(proc, grace=1.0)
    assert proc.returncode is not None
    assert _gone(grandchild), "the grandchild outlived its group's stop"


def test_multiworker_stop_takes_the_whole_task_group_down(group):
    from pipeline.trainers.multiworker import stop

    proc, grandchild = group
    stop([("worker 0", proc)], grace=1.0)
    assert _gone(grandchild), "a training task's child outlived stop()"


def test_federated_stop_takes_the_whole_worker_group_down(group):
    from federated.workers import stop_local_workers

    proc, grandchild = group
    stop_local_workers([proc], timeout=1.0)
    assert _gone(grandchild), "a TFF worker's child outlived stop_local_workers()"


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = free_ports(5)
    assert len(set(ports)) == 5
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
