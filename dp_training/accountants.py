"""Privacy accountants: small classes behind one interface, in one registry (as Opacus' accountants).

    get("pld").epsilon(event, delta, relation)     -> float (inf for a non-private event)
    get("rdp").supports(event, relation)            -> bool
    check_supported(name, event, relation)          -> raises UnsupportedRelationError with the fix

Both wrap dp_accounting (0.6): ``pld`` (privacy loss distributions, tightest; supports add/remove-one
and replace-one for Gaussian, Poisson-sampled Gaussian and their compositions) and ``rdp`` (Rényi DP;
in dp_accounting 0.6 it does not support replace-one for Poisson-sampled events, and only replace-one
for sampling without replacement). Whether an accountant supports an event under a relation is asked of
dp_accounting itself, never assumed here.

Events wrapped in ``events.ReplaceAdjacencyDpEvent`` (one unit's change replaces one element of the wrapped
mechanism's input, e.g. one client of DP-FedAvg on a row-stable partition) are analysed under replace-one and
composed with the rest of the run, analysed under the source's relation: PLD composes the two privacy loss
distributions, RDP adds the two RDP curves. Both bound the same unit-level neighbouring pairs, so either
composition is a valid bound. Convention: dp_accounting's PLD takes a Gaussian's noise multiplier relative to
one element's norm bound (a replacement moves the sum by up to twice that); its RDP takes it relative to the
replace-one sensitivity (``_compute_rdp_sample_wor_gaussian``: "noise to l2-sensitivity"). For wrapped events
the RDP side therefore halves every Gaussian noise multiplier, so both accountants state the same mechanism.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

import dp_accounting
from dp_accounting import pld as _pld
from dp_accounting import rdp as _rdp

from dp_training import events as ev
from dp_training import accounting_memo as _memo

DEFAULT = "pld"
# PLD discretisation: dp_accounting's default; any value gives a valid (pessimistic) upper bound.
PLD_VALUE_DISCRETIZATION = 1e-4

_RELATIONS = {
    ev.ADD_OR_REMOVE_ONE: dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    ev.REPLACE_ONE: dp_accounting.NeighboringRelation.REPLACE_ONE,
}


class UnsupportedRelationError(ValueError):
    """The accountant cannot account for this event under this neighbouring relation."""


def _relation(relation: str) -> dp_accounting.NeighboringRelation:
    if relation not in _RELATIONS:
        raise UnsupportedRelationError(
            f"unknown neighbouring relation {relation!r}; use one of {', '.join(ev.RELATIONS)}")
    return _RELATIONS[relation]


class Accountant:
    """One accountant kind. Subclasses say how to make dp_accounting's accountant."""

    name = ""
    description = ""

    def make(self, relation: str, **options) -> dp_accounting.PrivacyAccountant:
        """A fresh accountant under ``relation`` that also accounts ``ReplaceAdjacencyDpEvent``s."""
        return _SplitAccountant(self, relation, options)

    def _make_plain(self, relation: str, **options) -> dp_accounting.PrivacyAccountant:
        raise NotImplementedError

    def supports(self, event: dp_accounting.DpEvent, relation: str) -> bool:
        try:
            return bool(self.make(relation).supports(event))
        except (ValueError, TypeError):
            return False

    def epsilon(self, event: dp_accounting.DpEvent, delta: float, relation: str = ev.ADD_OR_REMOVE_ONE,
                **options) -> float:
        """Epsilon at ``delta`` of ``event`` under ``relation`` (inf for a non-private event)."""
        if not 0 < float(delta) < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}; pass e.g. 1e-5")
        if isinstance(event, dp_accounting.NoOpDpEvent):
            return 0.0
        if ev.is_non_private(event):
            return math.inf
        acc = self.make(relation, **options)
        if not acc.supports(event):
            raise UnsupportedRelationError(self._unsupported(event, relation))
        return _memo.epsilon(self, relation, options, event, float(delta))

    def _unsupported(self, event, relation) -> str:
        others = [a for a in REGISTRY if a != self.name and REGISTRY[a].supports(event, relation)]
        fix = (f"use --accountant {others[0]}" if others else
               "use a sampling scheme or relation that an accountant supports")
        return (f"the {self.name} accountant cannot account for {ev.describe(event)} under the "
                f"{relation} neighbouring relation; {fix}")


class PLD(Accountant):
    name = "pld"
    description = "privacy loss distributions (dp_accounting PLDAccountant)"

    def _make_plain(self, relation: str, value_discretization_interval: Optional[float] = None, **_):
        return _pld.PLDAccountant(neighboring_relation=_relation(relation),
                                  value_discretization_interval=value_discretization_interval
                                  or PLD_VALUE_DISCRETIZATION)


class RDP(Accountant):
    name = "rdp"
    description = "Rényi DP (dp_accounting RdpAccountant)"

    def _make_plain(self, relation: str, **_):
        return _rdp.RdpAccountant(neighboring_relation=_relation(relation))


# ------------------------------------------------------------------------------------------------
# ReplaceAdjacencyDpEvent: the wrapped events under replace-one, composed with the rest
# ------------------------------------------------------------------------------------------------
class _SplitError(ValueError):
    pass


def split_replace_adjacency(event: dp_accounting.DpEvent) -> Tuple[dp_accounting.DpEvent, dp_accounting.DpEvent]:
    """(rest, wrapped): ``event`` = rest composed with ReplaceAdjacency(wrapped). Compositions and
    self-compositions are walked; a ReplaceAdjacencyDpEvent inside any other event (e.g. sampled) raises."""
    rest: List[dp_accounting.DpEvent] = []
    wrapped: List[dp_accounting.DpEvent] = []

    def times(e, count):
        return e if count == 1 else dp_accounting.SelfComposedDpEvent(e, count)

    def walk(e, count, inside_replace):
        if isinstance(e, ev.ReplaceAdjacencyDpEvent):
            walk(e.event, count, True)   # a replacement of a replacement is a replacement
        elif isinstance(e, dp_accounting.ComposedDpEvent):
            for x in e.events:
                walk(x, count, inside_replace)
        elif isinstance(e, dp_accounting.SelfComposedDpEvent):
            walk(e.event, count * int(e.count), inside_replace)
        elif isinstance(e, dp_accounting.NoOpDpEvent):
            pass
        else:
            if _contains_replace(e):
                raise _SplitError(f"{ev.describe(e)}: a ReplaceAdjacencyDpEvent may only be composed, not nested "
                                  "inside another mechanism")
            (wrapped if inside_replace else rest).append(times(e, count))

    walk(event, 1, False)
    return ev.compose(*rest), ev.compose(*wrapped)


def _contains_replace(e) -> bool:
    if isinstance(e, ev.ReplaceAdjacencyDpEvent):
        return True
    inner = getattr(e, "event", None)
    if isinstance(inner, dp_accounting.DpEvent) and _contains_replace(inner):
        return True
    return any(_contains_replace(x) for x in getattr(e, "events", None) or ())


def _halve_gaussians(e: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """The same mechanism in dp_accounting's RDP replace-one convention (noise relative to 2 x the bound)."""
    if isinstance(e, dp_accounting.GaussianDpEvent):
        return dp_accounting.GaussianDpEvent(e.noise_multiplier / 2.0)
    if isinstance(e, dp_accounting.ComposedDpEvent):
        return dp_accounting.ComposedDpEvent([_halve_gaussians(x) for x in e.events])
    if isinstance(e, dp_accounting.SelfComposedDpEvent):
        return dp_accounting.SelfComposedDpEvent(_halve_gaussians(e.event), e.count)
    if isinstance(e, dp_accounting.PoissonSampledDpEvent):
        return dp_accounting.PoissonSampledDpEvent(e.sampling_probability, _halve_gaussians(e.event))
    if isinstance(e, dp_accounting.SampledWithoutReplacementDpEvent):
        return dp_accounting.SampledWithoutReplacementDpEvent(e.source_dataset_size, e.sample_size,
                                                              _halve_gaussians(e.event))
    return e


class _SplitAccountant(dp_accounting.PrivacyAccountant):
    """A registry accountant under the source's relation, plus one under replace-one for the events wrapped in
    ``ReplaceAdjacencyDpEvent``; ``get_epsilon`` composes the two (PLD: the distributions; RDP: the curves).
    Without wrapped events it is exactly the plain dp_accounting accountant."""

    def __init__(self, kind: "Accountant", relation: str, options):
        super().__init__(_relation(relation))
        self._kind = kind
        self._relation_name = relation
        self._main = kind._make_plain(relation, **options)
        self._replace = kind._make_plain(ev.REPLACE_ONE, **options)
        self._wrapped = False

    def _maybe_compose(self, event, count, do_compose):
        try:
            rest, wrapped = split_replace_adjacency(event)
        except _SplitError as e:
            return self.CompositionErrorDetails(invalid_event=event, error_message=str(e))
        if isinstance(self._main, _rdp.RdpAccountant):
            wrapped = _halve_gaussians(wrapped)
            if self._relation_name == ev.REPLACE_ONE:
                # dp_accounting 0.6's RDP accountant takes a Gaussian's noise relative to the replace-one
                # sensitivity (2 x the per-element bound) and ignores the relation for plain Gaussians: state
                # the platform's events (noise relative to the bound) in its convention, as for wrapped events.
                rest = _halve_gaussians(rest)
        for acc, part in ((self._main, rest), (self._replace, wrapped)):
            if isinstance(part, dp_accounting.NoOpDpEvent):
                continue
            err = acc._maybe_compose(part, count, do_compose)   # pylint: disable=protected-access
            if err is not None:
                return err
        if do_compose and not isinstance(wrapped, dp_accounting.NoOpDpEvent):
            self._wrapped = True
        return None

    def get_epsilon(self, target_delta: float) -> float:
        if not self._wrapped:
            return self._main.get_epsilon(target_delta)
        if isinstance(self._main, _pld.PLDAccountant):
            if self._main._contains_non_dp_event or self._replace._contains_non_dp_event:  # noqa: SLF001
                return math.inf
            return float(self._main._pld.compose(self._replace._pld).get_epsilon_for_delta(target_delta))
        rdp = np.asarray(self._main._rdp) + np.asarray(self._replace._rdp)   # noqa: SLF001
        return float(_rdp.compute_epsilon(self._main._orders, rdp, target_delta)[0])

    def get_delta(self, target_epsilon: float) -> float:
        if not self._wrapped:
            return self._main.get_delta(target_epsilon)
        if isinstance(self._main, _pld.PLDAccountant):
            if self._main._contains_non_dp_event or self._replace._contains_non_dp_event:  # noqa: SLF001
                return 1.0
            return float(self._main._pld.compose(self._replace._pld).get_delta_for_epsilon(target_epsilon))
        rdp = np.asarray(self._main._rdp) + np.asarray(self._replace._rdp)   # noqa: SLF001
        return float(_rdp.compute_delta(self._main._orders, rdp, target_epsilon)[0])


REGISTRY: Dict[str, Accountant] = {a.name: a for a in (PLD(), RDP())}
NAMES = tuple(REGISTRY)


def get(name: str) -> Accountant:
    if name not in REGISTRY:
        raise ValueError(f"unknown accountant {name!r}; use one of {', '.join(NAMES)} "
                         f"({DEFAULT} is the tightest)")
    return REGISTRY[name]


def check_supported(name: str, event: dp_accounting.DpEvent, relation: str) -> None:
    """Raises UnsupportedRelationError (naming the fix) unless ``name`` can account ``event`` under ``relation``."""
    acc = get(name)
    _relation(relation)
    if isinstance(event, dp_accounting.NoOpDpEvent) or ev.is_non_private(event):
        return
    if not acc.supports(event, relation):
        raise UnsupportedRelationError(acc._unsupported(event, relation))


def epsilon(event: dp_accounting.DpEvent, delta: float, accountant: str = DEFAULT,
            relation: str = ev.ADD_OR_REMOVE_ONE, **options) -> float:
    return get(accountant).epsilon(event, delta, relation, **options)


__all__ = ["Accountant", "PLD", "RDP", "REGISTRY", "NAMES", "DEFAULT", "get", "check_supported", "epsilon",
           "UnsupportedRelationError", "split_replace_adjacency"]
