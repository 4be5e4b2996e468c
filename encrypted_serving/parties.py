"""``parties.json`` (operators) and ``client.json`` (clients, the model owner): pure Python, both environments.

parties.json (one file shared by the operators; paths relative to the file)::

    {"format": "privtrain-encrypted-parties/1",
     "protocol": "aby3",
     "public_dir": "public",                   # model.json + preprocessing.json: no weights
     "ca": "certs/ca.pem",
     "registry": "certs/registry.json",        # certificates the gateways answer (python -m encrypted_serving.certs)
     "tf": {"server0": "10.0.0.1:7100", "server1": "10.0.0.2:7100", "server2": "10.0.0.3:7100",
            "driver": "10.0.0.1:7101"},        # the private TF cluster: never given to clients
     "parties": {"server0": {"gateway": "0.0.0.0:8443", "cert": "certs/server0.pem",
                             "key": "certs/server0.key", "dir": "parties/server0",
                             "budget": "budget/server0.json"}, ...},   # optional; default <dir>/budget.json
     "driver": {"dir": "driver"},
     "netns": null,                            # local mode: the TF cluster's namespace file (/proc/<pid>/ns/net)
     "output": "logit",                        # or "label"
     "rate_limit": {"rows_per_second": 1000, "burst_rows": 2000, "min_rows_per_request": 100},  # per identity
     "query_budget": {"rows_per_day": 10000},  # per registered identity, per UTC day (each party's ledger)
     "in_flight": {"requests": 2, "bytes": 8388608},   # per identity: requests / share bytes not yet answered
     "threads": {"workers": 64, "reserve": 8},  # gateway threads; calls waiting for results may use all but reserve
     "max_batch": 1000, "batch_sizes": [1, 1000],   # the programs the driver instantiates; clients pad
     "merge_rows": 16,                         # cross-request batching: concurrent small requests (of any
                                               # certificates) share one program run of up to this many rows
     "request_timeout_s": 30}

client.json (what a client or the model owner holds)::

    {"format": "privtrain-encrypted-client/1", "ca": "ca.pem", "cert": "client.pem", "key": "client.key",
     "gateways": [["server0", "127.0.0.1:8443"], ["server1", ...], ["server2", ...]]}
"""
from __future__ import annotations

import json
import os
from typing import Dict

PARTIES_FORMAT = "privtrain-encrypted-parties/1"
CLIENT_FORMAT = "privtrain-encrypted-client/1"
PARTY_NAMES = ("server0", "server1", "server2")
DRIVER = "driver"
OUTPUTS = ("logit", "label")
PROTOCOLS = ("aby3",)


class ConfigError(RuntimeError):
    """parties.json / client.json is missing or invalid; the message names the field and the fix."""


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ConfigError("cannot read %s: %s" % (path, e.strerror)) from e
    except ValueError as e:
        raise ConfigError("%s is not valid JSON: %s" % (path, e)) from e


def _abs(base: str, p):
    return p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def save(obj: dict, path: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
    return path


def load_parties(path: str) -> dict:
    c = _read(path)
    if c.get("format") != PARTIES_FORMAT:
        raise ConfigError("%s: 'format' must be %r" % (path, PARTIES_FORMAT))
    base = os.path.dirname(os.path.abspath(path))
    for key in ("public_dir", "ca", "tf", "parties"):
        if key not in c:
            raise ConfigError("%s: missing %r" % (path, key))
    if "registry" not in c:
        raise ConfigError("%s: missing 'registry' (the certificates the gateways answer; create it with "
                          "python -m encrypted_serving.certs register REGISTRY CERT)" % path)
    c["registry"] = _abs(base, c["registry"])
    if c.get("protocol", "aby3") not in PROTOCOLS:
        raise ConfigError("%s: protocol must be one of %s (Pond was dropped: its ReLU is 0.4 off)" % (path, PROTOCOLS))
    if c.get("output", "logit") not in OUTPUTS:
        raise ConfigError("%s: output must be one of %s" % (path, OUTPUTS))
    missing = [n for n in PARTY_NAMES + (DRIVER,) if n not in c["tf"]]
    if missing:
        raise ConfigError("%s: 'tf' needs an address for %s" % (path, ", ".join(missing)))
    c["public_dir"] = _abs(base, c["public_dir"])
    c["ca"] = _abs(base, c["ca"])
    for name in PARTY_NAMES:
        p = c["parties"].get(name)
        if not isinstance(p, dict) or not all(k in p for k in ("gateway", "cert", "key", "dir")):
            raise ConfigError("%s: parties.%s needs gateway, cert, key and dir" % (path, name))
        for k in ("cert", "key", "dir", "budget"):
            if k in p:
                p[k] = _abs(base, p[k])
    c.setdefault("driver", {})
    c["driver"]["dir"] = _abs(base, c["driver"].get("dir", "driver"))
    c.setdefault("protocol", "aby3")
    c.setdefault("output", "logit")
    c.setdefault("netns", None)
    c.setdefault("max_batch", 1000)
    c.setdefault("batch_sizes", [1, c["max_batch"]])
    if not all(isinstance(n, int) and 1 <= n <= c["max_batch"] for n in c["batch_sizes"]):
        raise ConfigError("%s: batch_sizes must be integers in 1..max_batch" % path)
    c.setdefault("merge_rows", min(16, c["max_batch"]))
    if not isinstance(c["merge_rows"], int) or isinstance(c["merge_rows"], bool) or not 0 <= c["merge_rows"] <= c["max_batch"]:
        raise ConfigError("%s: merge_rows must be an integer in 0..max_batch (0 or 1: no cross-request batching)" % path)
    _limits(c, path)
    c.setdefault("request_timeout_s", 30)
    c["path"] = os.path.abspath(path)
    return c


DEFAULT_LIMITS = {"rate_limit": {"rows_per_second": 1000, "burst_rows": 2000, "min_rows_per_request": 100},
                  "query_budget": {"rows_per_day": 10000},
                  "in_flight": {"requests": 2, "bytes": 8 << 20},
                  "threads": {"workers": 64, "reserve": 8}}


def _limits(c: dict, path: str) -> None:
    rl = c.get("rate_limit") or {}
    if ("per_second" in rl or "burst" in rl) and "rows_per_second" not in rl:
        raise ConfigError("%s: rate_limit now counts rows: give rows_per_second, burst_rows and min_rows_per_request "
                          "instead of per_second/burst" % path)
    for key, default in DEFAULT_LIMITS.items():
        c[key] = dict(default, **(c.get(key) or {}))
        bad = [k for k, v in c[key].items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0]
        if bad:
            raise ConfigError("%s: %s.%s must be a positive number" % (path, key, bad[0]))
    if c["threads"]["reserve"] >= c["threads"]["workers"]:
        raise ConfigError("%s: threads.reserve must be below threads.workers" % path)
    if c["rate_limit"]["burst_rows"] < c["max_batch"]:
        raise ConfigError("%s: rate_limit.burst_rows (%s) must be at least max_batch (%d), or a full batch is never "
                          "admitted" % (path, c["rate_limit"]["burst_rows"], c["max_batch"]))


def load_client(path: str) -> dict:
    c = _read(path)
    if c.get("format") != CLIENT_FORMAT:
        raise ConfigError("%s: 'format' must be %r" % (path, CLIENT_FORMAT))
    base = os.path.dirname(os.path.abspath(path))
    for key in ("ca", "cert", "key", "gateways"):
        if key not in c:
            raise ConfigError("%s: missing %r" % (path, key))
        if key != "gateways":
            c[key] = _abs(base, c[key])
    names = [g[0] for g in c["gateways"]]
    if tuple(names) != PARTY_NAMES:
        raise ConfigError("%s: gateways must be %s in that order, got %s" % (path, PARTY_NAMES, names))
    return c


def tf_task_index(name: str) -> int:
    return (PARTY_NAMES + (DRIVER,)).index(name)


def tf_addresses(c: dict) -> Dict[str, str]:
    return {n: c["tf"][n] for n in PARTY_NAMES + (DRIVER,)}


def budget_ledger(c: dict, party: str) -> str:
    """The party's query-budget ledger: parties.<party>.budget, else budget.json in the party's directory.
    Keep it where nothing wipes it: a lost ledger resets every client's daily budget."""
    p = c["parties"][party]
    return p.get("budget") or os.path.join(p["dir"], "budget.json")


def backend_socket(c: dict, party: str) -> str:
    """The party's gateway <-> compute-worker Unix socket (same host, in the party's private dir)."""
    return os.path.join(c["parties"][party]["dir"], "backend.sock")
