"""Process-wide memo of the accountants' work (``dp_training.accountants``): the same numbers, computed once.

A study (``privtrain study``) asks the accountants for the same figures again and again: every point's pre-flight
and Trainer plan the same calibrated event, the ledger composes every run on the source at each reservation, and
the study states its ledger charge after every point — the composition of 1, 2, ..., k runs, whose PLD cost
grows with k (15 DP-SGD runs on full Adult: ~12 s per statement). Accounting is a pure function of its inputs,
so this module remembers, per accountant kind, relation and options:

- ``epsilon``: the epsilon of an event at a delta (keyed by the event's canonical JSON, ``events.canonical``);
- the accountant's *state* after composing a composition's first k events (keyed by a hash chain over their
  canonical JSON). dp_accounting composes a ``ComposedDpEvent`` one event after the other into the same state,
  so composing the remaining events onto a copy of the state of a longer prefix performs exactly the operations
  of a fresh composition, in the same order: the result is the same float
  (``tests/test_accounting_memo.py`` checks equality, not closeness, for PLD and RDP, both relations and
  replace-adjacency-wrapped events).

Bounded (least recently used first out); ``clear()`` empties it. Nothing here is persisted.
"""
from __future__ import annotations

import collections
import copy
import hashlib
import threading
from typing import Any, List, Mapping, Optional, Tuple

import dp_accounting

from dp_training import events as ev

MAX_EPSILONS = 4096
MAX_STATES = 16   # a PLD state can hold a few MB
MIN_PARTS = 3     # states are remembered for compositions of several runs (the ledger's), not for one run's event

_lock = threading.Lock()
_epsilons: "collections.OrderedDict[tuple, float]" = collections.OrderedDict()
_states: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
stats = {"epsilon_hits": 0, "epsilon_misses": 0, "prefix_events_reused": 0, "events_composed": 0}


def clear() -> None:
    with _lock:
        _epsilons.clear()
        _states.clear()
        for k in stats:
            stats[k] = 0


def _options_key(options: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def _chain(events: List[dp_accounting.DpEvent]) -> List[str]:
    """h_k = sha256(h_{k-1} || canonical(event_k)): one key per prefix."""
    out, h = [], b""
    for e in events:
        h = hashlib.sha256(h + b"\x00" + ev.canonical(e).encode("utf-8")).digest()
        out.append(h.hex())
    return out


def _get(cache: "collections.OrderedDict", key) -> Optional[Any]:
    with _lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    return None


def _put(cache: "collections.OrderedDict", key, value, limit: int) -> None:
    with _lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)


def epsilon(kind, relation: str, options: Mapping[str, Any], event: dp_accounting.DpEvent, delta: float) -> float:
    """``kind``'s epsilon of ``event`` (already checked as supported and private) at ``delta`` under
    ``relation``: remembered, or composed from the longest remembered prefix of the composition."""
    base = (kind.name, relation, _options_key(options))
    parts = list(event.events) if isinstance(event, dp_accounting.ComposedDpEvent) else [event]
    keys = _chain(parts)
    eps_key = base + (keys[-1], float(delta))
    cached = _get(_epsilons, eps_key)
    if cached is not None:
        stats["epsilon_hits"] += 1
        return cached
    stats["epsilon_misses"] += 1
    start, acc = 0, None
    for k in range(len(parts), 0, -1):
        state = _get(_states, base + (keys[k - 1],))
        if state is not None:
            start, acc = k, copy.deepcopy(state)
            break
    if acc is None:
        acc = kind.make(relation, **options)
    rest = parts[start:]
    if rest:
        # the same sequence of compositions as a fresh accountant composing the whole event
        acc.compose(rest[0] if len(rest) == 1 and not isinstance(event, dp_accounting.ComposedDpEvent)
                    else dp_accounting.ComposedDpEvent(rest))
        if len(parts) >= MIN_PARTS:
            _put(_states, base + (keys[-1],), copy.deepcopy(acc), MAX_STATES)
    stats["prefix_events_reused"] += start
    stats["events_composed"] += len(rest)
    value = max(0.0, float(acc.get_epsilon(float(delta))))
    _put(_epsilons, eps_key, value, MAX_EPSILONS)
    return value


__all__ = ["epsilon", "clear", "stats", "MAX_EPSILONS", "MAX_STATES", "MIN_PARTS"]
