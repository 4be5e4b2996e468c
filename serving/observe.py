"""Operations: Prometheus metrics and the access log of one server (REST and gRPC alike).

Metrics use ``prometheus_client`` (already pinned in env/platform.lock.txt) with a registry of this
server's own (two servers in one process do not mix), served as the text exposition format at
``/monitoring/prometheus/metrics`` on the REST port (TF Serving's default path; same TLS and bearer
token as the API). Label values are bounded: the model label is a served model's name or ``other``
(a client cannot grow the registry by inventing names), the verb is one of a fixed set.

The access log is one JSON object per line: time, API, client address, method / path (REST) or RPC
name (gRPC), model, status, bytes in and out, milliseconds. Never bodies, inputs, outputs or tokens.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Callable, Iterable, Optional

VERBS = ("predict", "classify", "regress", "status", "metadata", "metrics", "other")
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _ModelCollector:
    """``privtrain_serving_model_versions{model, state}``: versions per state, read at scrape time."""

    def __init__(self, repo_fn: Callable[[], object]):
        self.repo_fn = repo_fn

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("privtrain_serving_model_versions", "Model versions known to the server, by state",
                              labels=["model", "state"])
        repo = self.repo_fn()
        if repo is not None:
            counts = {}
            for name in repo.model_names_known():
                try:
                    rows = repo.status(name, None, None)
                except Exception:  # noqa: BLE001 - a model disappearing while scraped
                    continue
                for _, state, _, _ in rows:
                    counts[(name, state)] = counts.get((name, state), 0) + 1
            for (name, state), n in sorted(counts.items()):
                g.add_metric([name, state], n)
        yield g


class Observer:
    """Counts, times and logs every request of one server. ``repo_fn`` returns the model repository
    (for the model label and the per-version gauge)."""

    def __init__(self, metrics: bool = True, access_log: Optional[str] = None,
                 repo_fn: Callable[[], object] = lambda: None):
        self.repo_fn = repo_fn
        self.registry = None
        if metrics:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

            r = self.registry = CollectorRegistry()
            self.requests = Counter("privtrain_serving_requests", "Requests answered, by API, verb, model and "
                                    "status code", ["api", "verb", "model", "code"], registry=r)
            self.latency = Histogram("privtrain_serving_request_latency_seconds", "Time from a request's headers "
                                     "(gRPC: its arrival) to its answer", ["api", "verb"], buckets=_BUCKETS,
                                     registry=r)
            self.connections = Gauge("privtrain_serving_rest_connections", "Open REST connections", registry=r)
            self.refused = Counter("privtrain_serving_rest_connections_refused", "REST connections refused or "
                                   "closed by a limit", ["reason"], registry=r)
            self.in_flight = Gauge("privtrain_serving_requests_in_flight", "Requests being computed", ["api"],
                                   registry=r)
            r.register(_ModelCollector(repo_fn))
        self._children = {}      # (api, verb, model, code) -> (counter child, histogram child): labels() is slow
        self._log = None
        if access_log:
            log = logging.Logger("privtrain.serving.access")   # not in the global hierarchy: one per server
            handler = (logging.StreamHandler(sys.stderr) if access_log == "-"
                       else logging.FileHandler(access_log, encoding="utf-8"))
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            self._log = log

    # ---- recording -------------------------------------------------------------------------------
    def model_label(self, name: Optional[str]) -> str:
        if not name:
            return ""
        repo = self.repo_fn()
        return name if repo is not None and repo.knows(name) else "other"

    def record(self, api: str, verb: str, model: Optional[str], code, seconds: float, *, client: str = "",
               method: str = "", path: str = "", bytes_in: int = 0, bytes_out: int = 0) -> None:
        verb = verb if verb in VERBS else "other"
        code = str(code)
        model = self.model_label(model)
        if self.registry is not None:
            key = (api, verb, model, code)
            children = self._children.get(key)
            if children is None:      # bounded: verbs, served model names and codes are finite sets
                children = self._children[key] = (self.requests.labels(*key), self.latency.labels(api, verb))
            children[0].inc()
            children[1].observe(seconds)
        if self._log is not None:
            entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "api": api,
                     "client": client, "method": method, "path": path[:200], "model": model, "status": code,
                     "bytes_in": bytes_in, "bytes_out": bytes_out, "ms": round(seconds * 1000, 3)}
            self._log.info(json.dumps(entry))

    def rest_in_flight(self, fn: Callable[[], float]) -> None:
        """The REST server's count of requests being computed, read at scrape time."""
        if self.registry is not None:
            self.in_flight.labels("rest").set_function(fn)

    def grpc_call(self, delta: int) -> None:
        if self.registry is not None:
            self.in_flight.labels("grpc").inc(delta)

    def refused_connection(self, reason: str) -> None:
        if self.registry is not None:
            self.refused.labels(reason).inc()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def close(self) -> None:
        if self._log is not None:
            for h in list(self._log.handlers):
                h.close()
                self._log.removeHandler(h)


def client_host(peer: str) -> str:
    """gRPC's ``ipv4:127.0.0.1:5555`` / ``ipv6:[::1]:5555`` as an address."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return host.strip("[]")
    return peer


def rest_verb(path: str, verbs: Iterable[str] = ("predict", "classify", "regress")) -> str:
    if not path.lower().startswith("/v1/"):
        return "other"
    tail = path.rsplit(":", 1)[-1].lower() if ":" in path.rsplit("/", 1)[-1] else ""
    if tail in verbs:
        return tail
    if path.lower().endswith("/metadata"):
        return "metadata"
    return "status"
