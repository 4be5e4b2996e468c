"""TFF worker processes and the execution context that spreads a round's clients across them.

TFF 0.87 ships one C++ ``worker_binary`` (flags ``--port``, ``--max_concurrent_computation_calls``,
``--grpc_max_message_length_megabytes``) and no ready-made multi-worker context. Its own way to split the
CLIENTS-placed work of a computation across several runtimes is the *mergeable computation* context
(``tff.backends.native.create_mergeable_comp_execution_context``): it compiles a computation to
``up_to_merge`` (clients' work up to the aggregation) / ``merge`` / ``after_merge`` (the server part), hands
each async context a contiguous slice of the clients, merges the partial aggregates and runs the server part
once. Here each async context is a ``RemoteExecutor`` on one worker's gRPC stub. For DP-FedAvg the noise is
added in the server part, once per round (``tests/federated/test_fed_workers.py`` measures it).

A worker that stops answering is reported as :class:`WorkerLost` naming its address, instead of TFF's
behaviour (its async context retries UNAVAILABLE forever, i.e. hangs).

:func:`start_local_workers` starts ``worker_binary`` processes in their own process groups;
:func:`stop_local_workers` stops them (SIGINT as TFF does, SIGKILL after a grace period). :func:`serve` is
``privtrain federated-worker``: one worker in the foreground, stopped cleanly on SIGINT/SIGTERM.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from typing import List, Optional, Sequence

from core.processes import free_ports, start_group, stop_groups

WORKER_NAME = "worker_binary"
READY_TIMEOUT_S = 30.0
_GRPC_MAX = 2 * 1000 * 1000 * 1000
_GRPC_OPTIONS = [("grpc.max_message_length", _GRPC_MAX), ("grpc.max_receive_message_length", _GRPC_MAX),
                 ("grpc.max_send_message_length", _GRPC_MAX)]


class WorkerError(RuntimeError):
    """A worker could not be started or reached (the message names it and the fix)."""


class WorkerLost(WorkerError):
    """A worker stopped answering while a computation ran on it."""

    def __init__(self, address: str, detail: str):
        super().__init__(f"TFF worker {address} stopped answering ({detail})")
        self.address = address
        self.detail = detail


def worker_binary_path() -> str:
    import tensorflow_federated as tff

    path = os.path.join(os.path.dirname(tff.__file__), "data", WORKER_NAME)
    if not os.path.isfile(path):
        raise WorkerError(f"TFF's {WORKER_NAME} is missing at {path}; reinstall tensorflow-federated from "
                          "env/platform.lock.txt (scripts/setup_env.sh platform)")
    return path


def parse_addresses(text: Optional[str]) -> List[str]:
    """``"host:port,host:port"`` -> ``["host:port", ...]`` (ValueError naming the bad entry); ``unix:/PATH``
    entries (local workers' sockets) are accepted too."""
    if not text:
        return []
    out = []
    for item in str(text).split(","):
        item = item.strip()
        host, sep, port = item.rpartition(":")
        if item.startswith("unix:/") and item not in out:  # a local worker's socket (start_local_workers)
            out.append(item)
            continue
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--workers entry {item!r} is not HOST:PORT (e.g. --workers 10.0.0.5:8000,"
                             "10.0.0.6:8000)")
        if item in out:
            raise ValueError(f"--workers names {item} twice; name each worker once")
        out.append(item)
    return out


# ------------------------------------------------------------------------------------- local processes
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def worker_command(port: int, max_concurrent: int = -1) -> List[str]:
    return [worker_binary_path(), f"--port={int(port)}", f"--max_concurrent_computation_calls={int(max_concurrent)}"]


def wait_ready(address: str, timeout: float = READY_TIMEOUT_S, proc: Optional[subprocess.Popen] = None) -> None:
    """Blocks until ``address`` accepts gRPC calls (WorkerError after ``timeout`` or if ``proc`` exits)."""
    import grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address, _GRPC_OPTIONS) as channel:
        while True:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                pass
            if proc is not None and proc.poll() is not None:
                raise WorkerError(f"TFF worker for {address} exited with code {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise WorkerError(f"no TFF worker answers at {address} within {timeout:g} s; start one there with "
                                  "`privtrain federated-worker --port PORT` or fix --workers")


def start_local_workers(n: int, max_concurrent: int = -1, log=None) -> List[subprocess.Popen]:
    """Starts ``n`` workers, each in its own process group; returns them once ready (``proc.address``).

    TFF's ``worker_binary`` listens on every interface and runs whatever computation a client sends (it has no
    bind address and no authentication), and a worker holds its clients' rows. The workers therefore run in
    one private network namespace (``core/netns.py``) whose only interface is its own loopback; each is
    reached through a Unix socket in a 0700 directory (``federated/unix_forward.py`` inside the namespace), so
    ``proc.address`` is ``unix:/tmp/privtrain-fed-.../worker-I.sock`` and no other user, host or container can
    connect. Where no namespace can be made, workers listen on ``localhost:PORT`` and ``log`` gets a warning
    that their ports are open. On any failure the ones already started are stopped."""
    import tempfile

    from core.netns import PrivateNetwork

    if n < 1:
        raise ValueError(f"--worker-processes must be >= 1, got {n}")
    network = PrivateNetwork().__enter__()
    if not network.isolated and log is not None:
        log(f"warning: local TFF workers listen on every interface of this machine without authentication while "
            f"they hold client rows (no private network namespace: {network.reason}); run only on a trusted host")
    sockets = tempfile.mkdtemp(prefix="privtrain-fed-") if network.isolated else None
    procs: List[subprocess.Popen] = []
    try:
        for i in range(n):
            port = 10000 + i if network.isolated else free_ports(1)[0]  # a fresh namespace: every port is free
            env = dict(os.environ)
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            proc = start_group(network.prefix + worker_command(port, max_concurrent),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            proc.companions = []  # type: ignore[attr-defined]
            procs.append(proc)
            if network.isolated:
                path = os.path.join(sockets, f"worker-{i}.sock")
                forward = start_group(
                    network.prefix + [sys.executable, os.path.join(os.path.dirname(__file__), "unix_forward.py"),
                                      path, str(port)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                proc.companions.append(forward)  # type: ignore[attr-defined]
                if forward.stdout.readline().strip() != "ready":
                    raise WorkerError(f"the Unix-socket bridge to local TFF worker {i} did not start")
                proc.address = f"unix:{path}"  # type: ignore[attr-defined]
            else:
                proc.address = f"localhost:{port}"  # type: ignore[attr-defined]
        if procs:
            procs[0].network = network  # type: ignore[attr-defined]
            procs[0].socket_dir = sockets  # type: ignore[attr-defined]
        for proc in procs:
            wait_ready(proc.address, proc=proc)  # type: ignore[attr-defined]
    except BaseException:
        stop_local_workers(procs)
        network.__exit__()
        raise
    return procs


def stop_local_workers(procs: Sequence[subprocess.Popen], timeout: float = 5.0) -> None:
    """SIGINT to each worker's process group, SIGKILL after ``timeout``; reaps them, their socket bridges and
    their private network namespace."""
    import shutil

    stop_groups(procs, grace=timeout, first_signal=signal.SIGINT)
    stop_groups([c for p in procs for c in getattr(p, "companions", ())], grace=0.0, first_signal=signal.SIGKILL)
    for p in procs:
        network = getattr(p, "network", None)
        if network is not None:
            network.__exit__()
        if getattr(p, "socket_dir", None):
            shutil.rmtree(p.socket_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------- TFF context
def _guarded_stub(address: str):
    """TFF's gRPC stub for ``address``, raising :class:`WorkerLost` (never retried) on any gRPC failure."""
    import grpc
    from tensorflow_federated.python.core.impl.executors import executors_errors, remote_executor_grpc_stub

    base = remote_executor_grpc_stub.RemoteExecutorGrpcStub

    class GuardedStub(base):
        pass

    def wrap(name):
        method = getattr(base, name)

        def call(self, request):
            try:
                return method(self, request)
            except executors_errors.RetryableGRPCError as e:
                raise WorkerLost(address, _grpc_detail(e.__cause__ or e)) from None
            except grpc.RpcError as e:
                if _grpc_code(e) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                     grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise WorkerLost(address, _grpc_detail(e)) from None
                raise
        return call

    for name in ("get_executor", "create_value", "create_struct", "create_call", "create_selection", "compute",
                 "dispose", "dispose_executor"):
        setattr(GuardedStub, name, wrap(name))
    channel = grpc.insecure_channel(address, _GRPC_OPTIONS)
    return GuardedStub(channel), channel


def _grpc_code(e):
    try:
        return e.code()
    except Exception:  # noqa: BLE001 - not a grpc.Call
        return None


def _grpc_detail(e) -> str:
    code = _grpc_code(e)
    try:
        details = e.details()
    except Exception:  # noqa: BLE001
        details = str(e)
    return f"{getattr(code, 'name', code)}: {details}" if code is not None else str(details)


def _async_context(address: str):
    from tensorflow_federated.python.core.backends.native import compiler
    from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
    from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
    from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
    from tensorflow_federated.python.core.impl.executors import remote_executor
    from tensorflow_federated.python.core.impl.types import placements

    stub, channel = _guarded_stub(address)

    def stack_fn(cardinalities):
        if cardinalities.get(placements.CLIENTS) is None:
            cardinalities[placements.CLIENTS] = 0
        ex = remote_executor.RemoteExecutor(stub)
        ex.set_cardinalities(cardinalities)
        return ex

    ctx = async_execution_context.AsyncExecutionContext(
        executor_fn=python_executor_stacks.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn),
        compiler_fn=compiler.desugar_and_transform_to_native,
        transform_args=tensorflow_computation.transform_args,
        transform_result=tensorflow_computation.transform_result)
    return ctx, channel


@dataclasses.dataclass
class RemoteContext:
    """The installed multi-worker context and what it holds open."""

    context: object
    addresses: List[str]
    channels: list

    def close(self) -> None:
        for ch in self.channels:
            with contextlib.suppress(Exception):
                ch.close()


def create_remote_context(addresses: Sequence[str], ready_timeout: Optional[float] = None) -> RemoteContext:
    """A sync context running each computation's clients in ``len(addresses)`` slices, one per worker.
    Waits up to ``ready_timeout`` seconds (default ``$PRIVTRAIN_WORKER_READY_TIMEOUT``, else 30) per worker."""
    from tensorflow_federated.python.core.backends.native import execution_contexts
    from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation

    if ready_timeout is None:
        ready_timeout = float(os.environ.get("PRIVTRAIN_WORKER_READY_TIMEOUT", READY_TIMEOUT_S))
    for address in addresses:
        wait_ready(address, ready_timeout)
    pairs = [_async_context(a) for a in addresses]
    ctx = execution_contexts.create_mergeable_comp_execution_context([c for c, _ in pairs])
    # as the local C++ context: numpy in, numpy out (tf.data datasets and tensors are converted)
    ctx._transform_args = tensorflow_computation.transform_args  # pylint: disable=protected-access
    ctx._transform_result = tensorflow_computation.transform_result  # pylint: disable=protected-access
    return RemoteContext(ctx, list(addresses), [ch for _, ch in pairs])


def find_lost_worker(exc: BaseException) -> Optional[WorkerLost]:
    """The :class:`WorkerLost` in ``exc``'s cause/context chain, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, WorkerLost):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# ------------------------------------------------------------------------------- privtrain federated-worker
def serve(port: int, max_concurrent: int = -1, log=print) -> int:
    """Runs one worker in the foreground until SIGINT/SIGTERM (then stops it and returns 0) or until it exits."""
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if not _port_free(port):
        raise WorkerError(f"port {port} is already in use on this machine; pick another with --port")
    proc = start_group(worker_command(port, max_concurrent), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            wait_ready(f"localhost:{port}", proc=proc)
        except WorkerError:
            if stopping["signal"] is None:
                raise
        if stopping["signal"] is None:
            log(f"TFF worker listening on port {port} (pid {proc.pid}, max concurrent computation calls "
                f"{max_concurrent if max_concurrent > 0 else 'unlimited'}); Ctrl-C stops it")
        while stopping["signal"] is None and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None and stopping["signal"] is None:
            print(f"privtrain federated-worker: the worker on port {port} exited with code {proc.returncode}",
                  file=sys.stderr)
            return 1
        log(f"TFF worker on port {port} stopped")
        return 0
    finally:
        stop_local_workers([proc])
        for s, h in old.items():
            signal.signal(s, h)


def add_worker_arguments(parser) -> None:
    parser.add_argument("--port", type=int, required=True, help="port the worker serves TFF's executor service on")
    parser.add_argument("--max-concurrent", type=int, default=-1,
                        help="cap on concurrent client computations in this worker (default: unlimited)")


def run_worker(ns) -> int:
    try:
        return serve(ns.port, ns.max_concurrent)
    except (WorkerError, ValueError) as e:
        print(f"privtrain federated-worker: {e}", file=sys.stderr)
        return 2


__all__ = ["WorkerError", "WorkerLost", "parse_addresses", "start_local_workers", "stop_local_workers",
           "create_remote_context", "find_lost_worker", "serve", "add_worker_arguments", "run_worker"]
