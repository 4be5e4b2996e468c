"""Owning TFF's C++ ``worker_binary`` subprocess.

TFF's local C++ execution context starts ``worker_binary`` lazily on the first computation and only
stops it from a ``__del__`` that fails at interpreter exit, so the process outlives Python.
:func:`tff_runtime` installs a fresh execution context, and on exit (normal, exception, Ctrl-C,
SIGTERM, or interpreter exit via atexit) kills every ``worker_binary`` child of this process.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from typing import Iterator, List

import psutil

WORKER_NAME = "worker_binary"
_lock = threading.Lock()
_depth = 0
_handlers_installed = False


def worker_processes(pid: int | None = None) -> List[psutil.Process]:
    """``worker_binary`` processes that are descendants of ``pid`` (default: this process)."""
    try:
        me = psutil.Process(pid or os.getpid())
        out = []
        for p in me.children(recursive=True):
            try:
                if p.name() == WORKER_NAME or WORKER_NAME in " ".join(p.cmdline()[:1]):
                    out.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out
    except psutil.NoSuchProcess:
        return []


def kill_workers(timeout: float = 5.0) -> int:
    """SIGINT (what TFF itself sends), then SIGKILL after ``timeout``; reaps them. Returns how many."""
    procs = worker_processes()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGINT)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return len(procs)


_current_context = None


def _service_manager(context):
    """TFF's ServiceManager (owner of the worker Popen) inside a local C++ context, or None."""
    try:
        fn = context._executor_factory._executor_stack_fn  # pylint: disable=protected-access
        for cell in fn.__closure__ or ():
            if hasattr(cell.cell_contents, "get_stub") and hasattr(cell.cell_contents, "_process"):
                return cell.cell_contents
    except (AttributeError, ValueError):
        pass
    return None


def _stop_context_worker(context, timeout: float) -> None:
    """Stops the worker the way TFF does (SIGINT + wait) and forgets it, so TFF's __del__ is a no-op."""
    sm = _service_manager(context) if context is not None else None
    proc = getattr(sm, "_process", None)
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, OSError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
        with contextlib.suppress(ProcessLookupError, OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=timeout)
    sm._process = None  # pylint: disable=protected-access
    sm._stub = None  # pylint: disable=protected-access


def auto_concurrency() -> int:
    """Default cap on concurrent client computations in the worker: 2 x usable cores.

    Unlimited (TFF's default) runs every sampled client's graph at once; with 100 clients per round on
    2 cores that thrashed (Adult, 100 clients/round: 3.3-5.3 s unlimited vs 1.4-2.0 s with a cap of 4)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(2, 2 * cores)


def _reset_context(max_concurrent_computation_calls: int = 0) -> None:
    """0 -> :func:`auto_concurrency`; negative -> unlimited (TFF's default)."""
    global _current_context
    if max_concurrent_computation_calls == 0:
        max_concurrent_computation_calls = auto_concurrency()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the worker inherits it: no per-op INFO spam
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    ctx = tff.backends.native.create_sync_local_cpp_execution_context(
        max_concurrent_computation_calls=max_concurrent_computation_calls)
    # the import-time default context never started a worker in this process unless someone used TFF
    # outside tff_runtime; stop that one too
    _stop_context_worker(context_stack_impl.context_stack.current, 5.0)
    context_stack_impl.context_stack.set_default_context(ctx)
    _current_context = ctx


def stop_workers(timeout: float = 5.0) -> int:
    """Stops the worker of the context we installed, then any other worker_binary child left."""
    _stop_context_worker(_current_context, timeout)
    return kill_workers(timeout)


def _retire_context() -> None:
    """Replaces TFF's default context by one that starts nothing, so its ServiceManager is collected
    while ``subprocess`` still exists (avoids the noisy __del__ error at exit)."""
    import gc
    import sys

    if "tensorflow_federated" not in sys.modules:
        return
    with contextlib.suppress(Exception):
        from tensorflow_federated.python.core.impl.context_stack import context_stack_impl, runtime_error_context

        context_stack_impl.context_stack.set_default_context(runtime_error_context.RuntimeErrorContext())
        gc.collect()


def _atexit() -> None:
    stop_workers(timeout=2.0)
    _retire_context()


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_atexit)
    if threading.current_thread() is threading.main_thread():
        prev = signal.getsignal(signal.SIGTERM)
        if prev in (signal.SIG_DFL, None):
            def on_term(signum, frame):  # turn SIGTERM into SystemExit so finally-blocks run
                raise SystemExit(128 + signum)
            signal.signal(signal.SIGTERM, on_term)


def _install_remote(addresses, worker_processes: int, max_concurrent_computation_calls: int):
    """Starts ``worker_processes`` local workers (if any) and installs the context spreading clients over them
    and ``addresses``. Returns what :func:`_remove_remote` releases."""
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    from federated import workers

    if max_concurrent_computation_calls == 0:
        max_concurrent_computation_calls = auto_concurrency()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    def warn(message):
        import sys
        print(f"privtrain: {message}", file=sys.stderr)

    local = (workers.start_local_workers(worker_processes, max_concurrent_computation_calls, log=warn)
             if worker_processes else [])
    try:
        remote = workers.create_remote_context(list(addresses) + [p.address for p in local])
    except BaseException:
        workers.stop_local_workers(local)
        raise
    _stop_context_worker(context_stack_impl.context_stack.current, 5.0)
    context_stack_impl.context_stack.set_default_context(remote.context)
    return remote, local


def _remove_remote(held) -> None:
    from federated import workers

    remote, local = held
    remote.close()
    workers.stop_local_workers(local)


@contextlib.contextmanager
def tff_runtime(max_concurrent_computation_calls: int = 0, workers=None, worker_processes: int = 0) -> Iterator[None]:
    """Context in which TFF computations run on a worker this process owns and always stops, or, with
    ``workers`` (``HOST:PORT`` addresses) and/or ``worker_processes`` (local workers started here), across
    those workers (``federated.workers``: each round's clients are split between them).

    Re-entrant: nested uses share the outer runtime; the outermost exit kills the workers it started
    (KeyboardInterrupt and exceptions included).
    """
    global _depth
    _install_handlers()
    with _lock:
        _depth += 1
        outer = _depth == 1
    held = None
    try:
        if outer:
            if workers or worker_processes:
                held = _install_remote(workers or [], int(worker_processes or 0), max_concurrent_computation_calls)
            else:
                _reset_context(max_concurrent_computation_calls)
        yield
    finally:
        with _lock:
            _depth -= 1
            last = _depth == 0
        if held is not None:
            _remove_remote(held)
        if last:
            stop_workers()
            # a fresh context: its worker starts only if something runs TFF again
            with contextlib.suppress(Exception):
                _reset_context(max_concurrent_computation_calls)
