"""Giving memory back after large requests: ``malloc_trim(0)`` (glibc) on a worker thread, at most one
pending at a time, so the server shrinks back instead of keeping a large request's peak. Used by the
REST server and the gRPC service alike."""
from __future__ import annotations

import ctypes
import ctypes.util

TRIM_BYTES = 1 << 20          # trim the C heap after requests / responses larger than this


class Trimmer:
    """``malloc_trim(0)`` on a worker thread, at most one pending at a time (no-op without glibc)."""

    def __init__(self):
        self._fn = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._fn = libc.malloc_trim
            self._fn.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            pass
        self._pending = False

    def schedule(self, executor) -> None:
        if self._fn is None or self._pending:
            return
        self._pending = True
        try:
            executor.submit(self._run)
        except RuntimeError:      # executor shut down
            self._pending = False

    def _run(self) -> None:
        try:
            import gc
            gc.collect()
            self._fn(0)
        finally:
            self._pending = False
