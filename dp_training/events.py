"""Differential-privacy events: what a mechanism releases, as frozen, serialisable values.

The platform describes every release with dp_accounting's ``DpEvent`` classes (frozen ``attrs`` objects,
composed by an accountant). This module is the one place that turns them into JSON and back (the ledger
stores them, ``privacy.json`` and ML Metadata publish them) and names the neighbouring relations.

    to_json(event) -> dict          from_json(dict) -> event          canonical(event) -> str
    compose(*events) -> event       is_non_private(event) -> bool       describe(event) -> str

Only dp_accounting's own event classes, plus this module's :class:`ReplaceAdjacencyDpEvent`, are accepted
(``from_json`` refuses any other name), so a ledger or a file cannot make the platform import arbitrary code.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, List

import attr
import dp_accounting
from dp_accounting import dp_event as _dp_event

# Neighbouring relations, in the words the platform states them; values are dp_accounting's names.
ADD_OR_REMOVE_ONE = "add_or_remove_one"
REPLACE_ONE = "replace_one"
RELATIONS = (ADD_OR_REMOVE_ONE, REPLACE_ONE)
RELATION_TEXT = {
    ADD_OR_REMOVE_ONE: "add or remove one {unit}",
    REPLACE_ONE: "replace one {unit} (the number of {unit}s is public)",
}


class EventError(ValueError):
    """A serialised event is malformed or names a class that is not a dp_accounting event."""


def _event_classes() -> Dict[str, type]:
    out = {}
    for name in dir(_dp_event):
        obj = getattr(_dp_event, name)
        if isinstance(obj, type) and issubclass(obj, _dp_event.DpEvent) and obj is not _dp_event.DpEvent:
            out[name] = obj
    return out


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ReplaceAdjacencyDpEvent(_dp_event.DpEvent):
    """One unit's change replaces one element of the wrapped mechanism's input.

    A mechanism that runs on derived elements (e.g. DP-FedAvg on clients built from rows) may see a change of
    one privacy unit as the *replacement* of one of its elements, whatever the data source's relation: with a
    row-stable partition, adding or removing one row changes exactly one client's data, so one client's clipped
    update moves by up to twice the clip norm while the number of clients stays fixed. The accountants
    (``dp_training.accountants``) analyse ``event`` under the replace-one relation (noise multipliers relative
    to one element's norm bound, so a replacement moves the sum by up to 2 of them, as dp_accounting's PLD
    does) and compose the result with the rest of a run's events, analysed under the source's relation. Both
    analyses bound the same unit-level neighbouring pairs, so the composition is valid.
    """

    event: _dp_event.DpEvent


_CLASSES = _event_classes()
_CLASSES[ReplaceAdjacencyDpEvent.__name__] = ReplaceAdjacencyDpEvent   # the one class of our own


def to_json(event: dp_accounting.DpEvent) -> Dict[str, Any]:
    """A plain-JSON dict: ``{"type": "PoissonSampledDpEvent", "sampling_probability": ..., "event": {...}}``."""
    if not isinstance(event, _dp_event.DpEvent) or type(event).__name__ not in _CLASSES:
        raise EventError(f"not a dp_accounting event: {event!r}")
    out: Dict[str, Any] = {"type": type(event).__name__}
    for field in attr.fields(type(event)):
        value = getattr(event, field.name)
        if isinstance(value, _dp_event.DpEvent):
            value = to_json(value)
        elif isinstance(value, (list, tuple)):
            value = [to_json(v) if isinstance(v, _dp_event.DpEvent) else _plain(v) for v in value]
        else:
            value = _plain(value)
        out[field.name] = value
    return out


def _plain(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) or hasattr(value, "__float__"):
        v = float(value)
        if not math.isfinite(v):
            raise EventError(f"event parameter {value!r} is not finite")
        return v
    raise EventError(f"event parameter {value!r} of type {type(value).__name__} cannot be serialised")


def from_json(data: Dict[str, Any]) -> dp_accounting.DpEvent:
    if not isinstance(data, dict) or "type" not in data:
        raise EventError(f"a serialised event is a dict with a 'type', got {data!r:.80}")
    cls = _CLASSES.get(data["type"])
    if cls is None:
        raise EventError(f"unknown event type {data['type']!r}; known: {', '.join(sorted(_CLASSES))}")
    kwargs = {}
    names = {f.name for f in attr.fields(cls)}
    for key, value in data.items():
        if key == "type":
            continue
        if key not in names:
            raise EventError(f"{data['type']} has no parameter {key!r}")
        if isinstance(value, dict):
            value = from_json(value)
        elif isinstance(value, list):
            value = [from_json(v) if isinstance(v, dict) else v for v in value]
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise EventError(f"invalid {data['type']}: {e}") from None


def canonical(event: dp_accounting.DpEvent) -> str:
    """Canonical JSON text of an event (sorted keys, no spaces): what the ledger hashes."""
    return json.dumps(to_json(event), sort_keys=True, separators=(",", ":"))


def _flatten(events: Iterable[dp_accounting.DpEvent]) -> List[dp_accounting.DpEvent]:
    out: List[dp_accounting.DpEvent] = []
    for e in events:
        if isinstance(e, dp_accounting.NoOpDpEvent):
            continue
        if isinstance(e, dp_accounting.ComposedDpEvent):
            out.extend(_flatten(e.events))
        else:
            out.append(e)
    return out


def compose(*events: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """The composition of ``events`` (nested compositions flattened, no-ops dropped)."""
    flat = _flatten(events)
    if not flat:
        return dp_accounting.NoOpDpEvent()
    if len(flat) == 1:
        return flat[0]
    return dp_accounting.ComposedDpEvent(flat)


def is_non_private(event: dp_accounting.DpEvent) -> bool:
    """True when the event contains a release without any DP guarantee (epsilon is infinite)."""
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
        return True
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return event.noise_multiplier <= 0
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return any(is_non_private(e) for e in event.events)
    if isinstance(event, ReplaceAdjacencyDpEvent):
        return is_non_private(event.event)
    inner = getattr(event, "event", None)
    if isinstance(inner, _dp_event.DpEvent):
        return is_non_private(inner)
    return False


def describe(event: dp_accounting.DpEvent) -> str:
    """One line a person can read, e.g. ``Gaussian(σ=12) + 1272 × PoissonSampled(q=0.0157, Gaussian(σ=1.1))``."""
    if isinstance(event, dp_accounting.NoOpDpEvent):
        return "nothing released"
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
        return "non-private release"
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return f"Gaussian(σ={event.noise_multiplier:.4g})"
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return f"PoissonSampled(q={event.sampling_probability:.4g}, {describe(event.event)})"
    if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
        return (f"SampledWithoutReplacement({event.sample_size} of {event.source_dataset_size}, "
                f"{describe(event.event)})")
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return f"{event.count} × {describe(event.event)}"
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return " + ".join(describe(e) for e in event.events)
    if isinstance(event, ReplaceAdjacencyDpEvent):
        return f"ReplaceOneElement[{describe(event.event)}]"
    if isinstance(event, dp_accounting.ZCDpEvent):   # e.g. the distributed discrete Gaussian (federated.secagg)
        return f"zCDP(ρ={event.rho:.4g}" + (f", ξ={event.xi:.3g})" if event.xi else ")")
    return type(event).__name__


__all__ = ["ADD_OR_REMOVE_ONE", "REPLACE_ONE", "RELATIONS", "RELATION_TEXT", "EventError", "ReplaceAdjacencyDpEvent",
           "to_json",
           "from_json", "canonical", "compose", "is_non_private", "describe"]
