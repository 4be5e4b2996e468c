"""Request batching: concurrent predict calls on the same (model, version, signature) are merged
along dimension 0, run once, and split again. Off by default (``ModelServer(batching=...)``).

No request waits for company by default (``timeout_s=0``): an idle signature runs a request at once;
requests arriving while a batch is being computed queue up and run together as the next batch
(up to ``max_batch_size`` rows). So batching costs no latency to a lone client and, under load, turns
many small TensorFlow calls into few larger ones. ``timeout_s > 0`` additionally lets a batch wait
that long for more requests (TF Serving's ``batch_timeout_micros``).

Two front ends share the rules: :class:`Batcher` for threads (gRPC) and :class:`AsyncBatcher` for the
REST server's event loop (the batch runs on an executor thread while the loop keeps parsing requests).
Requests whose inputs are not batch-major (rank 0, or inputs with different leading sizes) run alone;
if a merged batch fails, each request is re-run alone so one bad request cannot fail others.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable, Dict, Hashable, List, Mapping, Optional

import numpy as np


class _Req:
    __slots__ = ("inputs", "rows", "finished", "result", "error")

    def __init__(self, inputs, rows):
        self.inputs, self.rows = inputs, rows
        self.finished = False
        self.result = None
        self.error: Optional[BaseException] = None


class _Queue:
    def __init__(self):
        self.cond = threading.Condition()
        self.pending: List[_Req] = []
        self.leader_active = False


class Batcher:
    def __init__(self, max_batch_size: int = 64, timeout_s: float = 0.0):
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self._queues: Dict[Hashable, _Queue] = {}
        self._lock = threading.Lock()
        self.batches_run = 0      # merged batches (more than one request), for tests / benchmark
        self.requests_merged = 0

    def run(self, key: Hashable, fn: Callable[[Mapping[str, np.ndarray]], Dict[str, np.ndarray]],
            inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        rows = _rows_of(inputs)
        if rows is None or rows >= self.max_batch_size:
            return fn(inputs)
        with self._lock:
            q = self._queues.setdefault(key, _Queue())
        req = _Req(inputs, rows)
        with q.cond:
            q.pending.append(req)
            q.cond.notify_all()
        while True:
            with q.cond:
                while not req.finished and q.leader_active:
                    q.cond.wait()
                if req.finished:
                    break
                q.leader_active = True
                # Leader: wait briefly for company, then take a batch from the front.
                deadline = time.monotonic() + self.timeout_s
                while sum(r.rows for r in q.pending) < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    q.cond.wait(left)
                batch, total = [], 0
                for r in q.pending:
                    if batch and total + r.rows > self.max_batch_size:
                        break
                    batch.append(r)
                    total += r.rows
                del q.pending[:len(batch)]
            try:
                self._execute(fn, batch, total)
            finally:
                with q.cond:
                    for r in batch:
                        r.finished = True
                    q.leader_active = False
                    q.cond.notify_all()
        if req.error is not None:
            raise req.error
        return req.result

    def _execute(self, fn, batch: List[_Req], total: int) -> None:
        if len(batch) > 1:
            self.batches_run += 1
            self.requests_merged += len(batch)
        execute_batch(fn, batch, total)


def _rows_of(inputs: Mapping[str, np.ndarray]) -> Optional[int]:
    sizes = {v.shape[0] if v.ndim else None for v in inputs.values()}
    if len(sizes) != 1 or None in sizes:
        return None
    return sizes.pop()


def execute_batch(fn, batch, total: int) -> None:
    """Run ``batch`` (objects with ``inputs``, ``rows``, ``result``, ``error``) as one call of ``fn``."""
    if len(batch) == 1:
        r = batch[0]
        try:
            r.result = fn(r.inputs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            r.error = e
        return
    try:
        keys = set(batch[0].inputs)
        if any(set(r.inputs) != keys for r in batch):
            raise ValueError("different input names")
        merged = {k: np.concatenate([r.inputs[k] for r in batch], axis=0) for k in keys}
        out = fn(merged)
        if any(v.ndim == 0 or v.shape[0] != total for v in out.values()):
            raise ValueError("outputs not batch-major")
    except BaseException:  # noqa: BLE001 - fall back to running each request alone
        for r in batch:
            try:
                r.result = fn(r.inputs)
            except BaseException as e:  # noqa: BLE001
                r.error = e
        return
    start = 0
    for r in batch:
        r.result = {k: v[start:start + r.rows] for k, v in out.items()}
        start += r.rows


class _AsyncReq:
    __slots__ = ("inputs", "rows", "callback", "result", "error")

    def __init__(self, inputs, rows, callback):
        self.inputs, self.rows, self.callback = inputs, rows, callback
        self.result = None
        self.error: Optional[BaseException] = None


class AsyncBatcher:
    """The batcher for an asyncio event loop: at most one batch per key is computing at a time;
    requests that arrive meanwhile form the next one. Batches are computed on the loop itself
    (``inline``, no thread hand-offs) or on ``executor``. Must be used from the loop's thread."""

    def __init__(self, executor, max_batch_size: int = 64, timeout_s: float = 0.0, inline: bool = True):
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self.inline = inline
        self._pending: Dict[Hashable, List[_AsyncReq]] = {}
        self._busy: Dict[Hashable, bool] = {}
        self.batches_run = 0
        self.requests_merged = 0

    def submit(self, key: Hashable, fn: Callable[[Mapping[str, np.ndarray]], Dict[str, np.ndarray]],
               inputs: Mapping[str, np.ndarray], callback: Callable[[Optional[dict], Optional[BaseException]], None]
               ) -> None:
        """Compute ``fn(inputs)`` (merged with others); ``callback(result, error)`` runs on the loop."""
        loop = asyncio.get_running_loop()
        rows = _rows_of(inputs)
        req = _AsyncReq(inputs, rows, callback)
        if rows is None or rows >= self.max_batch_size:
            cf = self.executor.submit(execute_batch, fn, [req], rows or 0)
            cf.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._deliver, req))
            return
        self._pending.setdefault(key, []).append(req)
        if not self._busy.get(key):
            self._busy[key] = True
            if self.timeout_s > 0:
                loop.call_later(self.timeout_s, self._dispatch, loop, key, fn)
            else:   # after the callbacks already due (requests already read join this batch)
                loop.call_soon(self._dispatch, loop, key, fn)

    async def run(self, key: Hashable, fn, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        fut = asyncio.get_running_loop().create_future()

        def done(result, error):
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)

        self.submit(key, fn, inputs, done)
        return await fut

    @staticmethod
    def _deliver(req: _AsyncReq) -> None:
        try:
            req.callback(req.result, req.error)
        except Exception:  # noqa: BLE001 - a callback must not stop the others
            pass

    def _dispatch(self, loop, key, fn) -> None:
        pending = self._pending.get(key) or []
        if not pending:
            self._busy[key] = False
            return
        batch, total = [], 0
        for r in pending:
            if batch and total + r.rows > self.max_batch_size:
                break
            batch.append(r)
            total += r.rows
        del pending[:len(batch)]
        if len(batch) > 1:
            self.batches_run += 1
            self.requests_merged += len(batch)
        if self.inline:
            execute_batch(fn, batch, total)
            self._finished(loop, key, fn, batch)
            return
        cf = self.executor.submit(execute_batch, fn, batch, total)
        cf.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._finished, loop, key, fn, batch))

    def _finished(self, loop, key, fn, batch) -> None:
        for r in batch:
            self._deliver(r)
        if self._pending.get(key):
            loop.call_soon(self._dispatch, loop, key, fn)
        else:
            self._busy[key] = False
