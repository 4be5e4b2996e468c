"""Privacy accountants: small classes behind one interface, in one registry (as Opacus' accountants).

    get("pld").epsilon(event, delta, relation)     -> float (inf for a non-private event)
    get("rdp").supports(event, relation)            -> bool
    check_supported(name, event, relation)          -> raises UnsupportedRelationError with the fix

Both wrap dp_accounting (0.6): ``pld`` (privacy loss distributions, tightest; supports add/remove-one
and replace-one for Gaussian, Poisson-sampled Gaussian and their compositions) and ``rdp`` (Rényi DP;
in dp_accounting 0.6 it does not support replace-one for Poisson-sampled events, and only replace-one
for sampling without replacement). Whether an accountant supports an event under a relation is asked of
dp_accounting itself, never assumed here.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import dp_accounting
from dp_accounting import pld as _pld
from dp_accounting import rdp as _rdp

from dp_training import events as ev

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
        acc.compose(event)
        return max(0.0, float(acc.get_epsilon(float(delta))))

    def _unsupported(self, event, relation) -> str:
        others = [a for a in REGISTRY if a != self.name and REGISTRY[a].supports(event, relation)]
        fix = (f"use --accountant {others[0]}" if others else
               "use a sampling scheme or relation that an accountant supports")
        return (f"the {self.name} accountant cannot account for {ev.describe(event)} under the "
                f"{relation} neighbouring relation; {fix}")


class PLD(Accountant):
    name = "pld"
    description = "privacy loss distributions (dp_accounting PLDAccountant)"

    def make(self, relation: str, value_discretization_interval: Optional[float] = None, **_):
        return _pld.PLDAccountant(neighboring_relation=_relation(relation),
                                  value_discretization_interval=value_discretization_interval
                                  or PLD_VALUE_DISCRETIZATION)


class RDP(Accountant):
    name = "rdp"
    description = "Rényi DP (dp_accounting RdpAccountant)"

    def make(self, relation: str, **_):
        return _rdp.RdpAccountant(neighboring_relation=_relation(relation))


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
           "UnsupportedRelationError"]
