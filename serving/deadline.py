"""Per-request compute timeout (TF Serving's ``--rest_api_timeout_in_ms``; gRPC: the client's deadline as
well): a model call that runs past it is *cancelled* inside TensorFlow (its kernels stop, the worker is
free again) and the request fails with DEADLINE_EXCEEDED.

TensorFlow's eager runtime cancels a function call through a ``CancellationManager`` it looks up with
``tensorflow.python.eager.cancellation.context()``, a process-wide global meant for one caller at a time.
The server computes on several threads, so :func:`cancellable` installs a per-thread lookup (falling
back to TensorFlow's own global, so its own uses keep working) and one watchdog thread fires the
cancellations at their deadlines (no thread per request); the server owns it and stops it.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import grpc

from .errors import ServingError

_local = threading.local()
_installed = False
_install_lock = threading.Lock()


def _install() -> bool:
    """Make TensorFlow's cancellation lookup per thread (once). False if this TensorFlow lacks it."""
    global _installed
    if _installed:
        return True
    with _install_lock:
        if _installed:
            return True
        try:
            from tensorflow.python.eager import cancellation
        except ImportError:
            return False
        original = getattr(cancellation, "context", None)
        if original is None or not hasattr(cancellation, "CancellationManager"):
            return False

        def context():
            cm = getattr(_local, "cm", None)
            return cm if cm is not None else original()

        cancellation.context = context
        _installed = True
        return True


class Watchdog:
    """One thread (started on first use, ended by :meth:`stop`) that calls ``start_cancel()`` on
    managers whose deadline has passed."""

    def __init__(self):
        self._heap = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            t, self._thread = self._thread, None
            self._cond.notify_all()
        if t is not None:
            t.join()

    def add(self, deadline: float, cm) -> list:
        entry = [deadline, next(self._seq), cm]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="privtrain-deadline", daemon=True)
                self._thread.start()
            if self._heap[0] is entry:    # earlier than what the thread sleeps for (rare: one timeout for all)
                self._cond.notify()
        return entry

    @staticmethod
    def remove(entry: list) -> None:
        entry[2] = None            # lazily dropped when it reaches the top

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                entry = heapq.heappop(self._heap)
            cm = entry[2]
            if cm is not None:
                entry[2] = None
                cm.start_cancel()


def timeout_error(timeout_s: float) -> ServingError:
    return ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"Request timed out: the model computation ran longer than {timeout_s:g} s and was "
                        "cancelled (privtrain serve --request-timeout, or the client's deadline); send smaller "
                        "batches")


@contextmanager
def cancellable(timeout_s: Optional[float], watchdog: Optional[Watchdog]) -> Iterator[Optional[object]]:
    """TensorFlow function calls made in this block on this thread are cancelled after ``timeout_s``
    (by ``watchdog``). Yields the CancellationManager (None without a timeout); ``cm.is_cancelled``
    tells afterwards."""
    if not timeout_s or timeout_s <= 0 or watchdog is None or not _install():
        yield None
        return
    from tensorflow.python.eager.cancellation import CancellationManager

    cm = CancellationManager()
    previous = getattr(_local, "cm", None)
    _local.cm = cm
    entry = watchdog.add(time.monotonic() + timeout_s, cm)
    try:
        yield cm
    finally:
        watchdog.remove(entry)
        _local.cm = previous
