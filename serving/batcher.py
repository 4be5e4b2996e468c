"""A small request batcher: concurrent predict calls on the same (model, version, signature) are
merged along dimension 0, run once, and split again. Off by default (``ModelServer(batching=...)``).

The first request to arrive becomes the batch leader: it waits up to ``timeout_s`` for others (or
until ``max_batch_size`` rows are queued), runs the merged batch and hands every caller its slice.
Requests whose inputs are not batch-major (rank 0, or inputs with different leading sizes) run alone.
"""
from __future__ import annotations

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
    def __init__(self, max_batch_size: int = 64, timeout_s: float = 0.002):
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self._queues: Dict[Hashable, _Queue] = {}
        self._lock = threading.Lock()
        self.batches_run = 0      # merged batches (more than one request), for tests / benchmark
        self.requests_merged = 0

    @staticmethod
    def _rows(inputs: Mapping[str, np.ndarray]) -> Optional[int]:
        sizes = {v.shape[0] if v.ndim else None for v in inputs.values()}
        if len(sizes) != 1 or None in sizes:
            return None
        return sizes.pop()

    def run(self, key: Hashable, fn: Callable[[Mapping[str, np.ndarray]], Dict[str, np.ndarray]],
            inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        rows = self._rows(inputs)
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
        if len(batch) == 1:
            r = batch[0]
            try:
                r.result = fn(r.inputs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                r.error = e
            return
        self.batches_run += 1
        self.requests_merged += len(batch)
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
