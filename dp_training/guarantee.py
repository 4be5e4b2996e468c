"""The run's privacy guarantee: one frozen object, serialised one way, published everywhere.

The Trainer executor builds it after training from the composed event of everything the run released and
the ledger's receipt; ``privacy.json`` beside the pushed model, the ML Metadata property
``privacy_guarantee`` (plus a few scalar copies for queries), the run summary and the reports are all this
object (``to_json`` / ``from_json`` / ``statement``). Its epsilon is always stated with its neighbouring
relation and privacy unit.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, Mapping, Optional, Tuple

from dp_training import events as ev

FORMAT = "privtrain.guarantee/1"


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """One release the guarantee covers (e.g. the DP normalisation, DP-SGD)."""

    name: str
    covers: str                       # what it released
    event: Mapping[str, Any]          # events.to_json
    epsilon_alone: Optional[float]    # this release alone, at the run's delta (for reading; not additive)

    def to_json(self) -> dict:
        return {"name": self.name, "covers": self.covers, "event": dict(self.event),
                "epsilon_alone": _num(self.epsilon_alone)}


@dataclasses.dataclass(frozen=True)
class Guarantee:
    private: bool
    epsilon: float                    # inf when not private
    delta: float
    accountant: str
    relation: str                     # add_or_remove_one | replace_one
    unit: str                         # row | column:NAME
    source_id: str
    dataset: str
    trainer: str
    mechanisms: Tuple[Mechanism, ...]
    event: Mapping[str, Any]          # the composed event of the whole run
    parameters: Mapping[str, Any]     # the public run parameters
    target_epsilon: Optional[float] = None
    ledger: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    audit: Optional[Mapping[str, Any]] = None
    not_covered: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()
    # A simulation setting (``contract.SimulationSetting``): {"label", "deployment_epsilon", "deployment_event",
    # "deployment", "covers", "does_not_cover"}; None for an ordinary run.
    simulation: Optional[Mapping[str, Any]] = None

    # -- reading ------------------------------------------------------------------------------------
    @property
    def relation_text(self) -> str:
        unit = self.unit.split(":", 1)[1] if self.unit.startswith("column:") else self.unit
        return ev.RELATION_TEXT[self.relation].format(unit=unit)

    def statement(self) -> str:
        if not self.private:
            return (f"no differential privacy guarantee (non-private {self.trainer} training on source "
                    f"{self.source_id!r}); recorded in the budget ledger as an unbounded spend")
        own = (f"({self.epsilon:.4g}, {self.delta:.3g})-differential privacy for {self.relation_text} of source "
               f"{self.source_id!r} ({self.accountant} accountant), covering "
               + " and ".join(m.covers for m in self.mechanisms))
        if not self.simulation:
            return own
        s = self.simulation
        return (f"{s['label']}. The noise corresponds to ({_fmt(s['deployment_epsilon'])}, {self.delta:.3g})-"
                f"differential privacy ({self.accountant} accountant, {self.relation_text}) for the stated deployment "
                f"only ({s['covers']}); that figure does NOT cover the data used here. This simulation itself, as it ran, "
                f"gives {own}")

    # -- serialisation ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT, "private": self.private, "epsilon": _num(self.epsilon), "delta": self.delta,
            "accountant": self.accountant, "neighbouring_relation": self.relation, "privacy_unit": self.unit,
            "source_id": self.source_id, "dataset": self.dataset, "trainer": self.trainer,
            "statement": self.statement(),
            "mechanisms": [m.to_json() for m in self.mechanisms], "event": dict(self.event),
            "parameters": dict(self.parameters), "target_epsilon": _num(self.target_epsilon),
            "ledger": dict(self.ledger), "audit": None if self.audit is None else dict(self.audit),
            "not_covered": list(self.not_covered), "notes": list(self.notes),
            **({"simulation_setting": _simulation_json(self.simulation)} if self.simulation else {}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Guarantee":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a privtrain guarantee (format {d.get('format')!r}, expected {FORMAT!r})")
        return cls(
            private=bool(d["private"]), epsilon=_from_num(d["epsilon"]), delta=float(d["delta"]),
            accountant=d["accountant"], relation=d["neighbouring_relation"], unit=d["privacy_unit"],
            source_id=d["source_id"], dataset=d["dataset"], trainer=d["trainer"],
            mechanisms=tuple(Mechanism(m["name"], m["covers"], m["event"], _from_num(m["epsilon_alone"]))
                             for m in d["mechanisms"]),
            event=d["event"], parameters=d["parameters"], target_epsilon=_from_num(d.get("target_epsilon")),
            ledger=d.get("ledger") or {}, audit=d.get("audit"), not_covered=tuple(d.get("not_covered", ())),
            notes=tuple(d.get("notes", ())), simulation=_simulation_from_json(d.get("simulation_setting")))

    @classmethod
    def loads(cls, text: str) -> "Guarantee":
        return cls.from_json(json.loads(text))

    def with_audit(self, audit: Optional[Mapping[str, Any]]) -> "Guarantee":
        return dataclasses.replace(self, audit=audit)


def _num(x: Optional[float]):
    if x is None:
        return None
    x = float(x)
    return "inf" if math.isinf(x) else x


def _fmt(x) -> str:
    x = _from_num(x)
    return "inf" if x is None or math.isinf(x) else f"{x:.4g}"


def _simulation_json(s: Mapping[str, Any]) -> dict:
    out = dict(s)
    out["deployment_epsilon"] = _num(out.get("deployment_epsilon"))
    return out


def _simulation_from_json(s) -> Optional[Mapping[str, Any]]:
    if not s:
        return None
    out = dict(s)
    out["deployment_epsilon"] = _from_num(out.get("deployment_epsilon"))
    return out


def _from_num(x) -> Optional[float]:
    if x is None:
        return None
    return math.inf if x == "inf" else float(x)


__all__ = ["Guarantee", "Mechanism", "FORMAT"]
