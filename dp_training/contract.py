"""The trainer plug-in contract, free of TFX (the pipeline, ``dp_training`` and ``federated`` all import it).

A trainer kind is a small class with a ``name`` and two methods:

``plan(PlanInputs) -> TrainingPlan``
    Public information only (the data source's privacy declaration, the public planning size, the run's
    arguments, the event already planned for preprocessing): returns the DP event the kind *will* release
    (``NonPrivateDpEvent`` for non-private training) and the public parameters it will run with. Called
    before any private row is read; the executor reserves the event in the budget ledger (or refuses).
``train(TrainerContext) -> TrainingOutcome``
    Runs on the private rows and returns the model, the event it *actually* released (fewer steps if it
    stopped early), the public details (declared public: code path, optimizer...) and the private details
    (timings, losses, counts: they stay in the workdir). A kind that fails after releasing part of its plan
    raises :class:`TrainingInterrupted` carrying the released event; any other exception is charged the whole
    planned event.

Kinds never open the ledger, never write files outside their private scratch directory, and never compute
the run's final guarantee: the executor composes, charges and records it (``dp_training.guarantee``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple

import dp_accounting
import numpy as np

from dp_training.dataset import PrivacyDeclaration


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """What a kind may plan with: public by construction.

    Attributes:
      kind: the trainer kind's name.
      dataset_name: e.g. ``"adult"``.
      source: the data set's privacy declaration (source id, unit, relation, public splits).
      planning_rows: the public planning size of the training split: ``public_row_estimate`` under
        add/remove-one, the exact count under replace-one (public under that relation).
      args: the kind's arguments (public hyper-parameters).
      accountant: the accountant the run's guarantee is computed with.
      delta: the run's delta.
      base_event: what the run releases besides training (DP preprocessing); a kind calibrating to a
        target epsilon calibrates the composition of ``base_event`` and its own event.
      target_epsilon: the run's total target (None: the kind's noise is given explicitly).
    """

    kind: str
    dataset_name: str
    source: PrivacyDeclaration
    planning_rows: int
    args: Mapping[str, Any]
    accountant: str
    delta: float
    base_event: dp_accounting.DpEvent
    target_epsilon: Optional[float] = None

    @property
    def relation(self) -> str:
        return self.source.relation


@dataclasses.dataclass(frozen=True)
class SimulationSetting:
    """A simulation whose noise is calibrated for a stated deployment it does not run (pfl-research's
    ``noise_cohort_size``): ``label`` is printed with every output; ``deployment_event`` is what the stated
    deployment would release (its epsilon is computed by the protocol, for reading only: it never covers the
    simulated data, whose release is the plan's ``event``); ``parameters`` describe the deployment (public)."""

    label: str
    deployment_event: dp_accounting.DpEvent
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """A kind's plan. ``event`` is what it will release; ``public`` its public run parameters (printed,
    recorded in ML Metadata and privacy.json); ``internal`` anything it needs at train time (not published)."""

    event: dp_accounting.DpEvent
    private: bool
    mechanism: str                     # e.g. "DP-SGD (Poisson-sampled Gaussian)" / "none (non-private)"
    public: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    internal: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    notes: Tuple[str, ...] = ()
    simulation: Optional[SimulationSetting] = None   # set only by a simulation setting (see SimulationSetting)


@dataclasses.dataclass(frozen=True)
class TrainerContext:
    """Everything a kind needs to train, independent of TFX. Given only after the ledger reserved the plan.

    ``train_features`` / ``eval_features``: model inputs as numpy arrays ``{name: [n, 1]}``; labels float32
    ``[n]``. ``build_model()`` returns a fresh, uncompiled Keras model (its DP normalisation already set).
    ``scratch_dir``: private per-run directory inside the workdir for checkpoints and logs.
    """

    dataset_name: str
    train_features: Mapping[str, np.ndarray]
    train_labels: np.ndarray
    eval_features: Mapping[str, np.ndarray]
    eval_labels: np.ndarray
    build_model: Callable[[], Any]
    args: Mapping[str, Any]
    plan: TrainingPlan
    scratch_dir: str
    source: Optional[PrivacyDeclaration] = None
    log: Callable[[str], None] = print
    raw_train_rows: Optional[Callable[[], Any]] = None   # raw rows (e.g. for a unit column), private

    @property
    def num_train_rows(self) -> int:
        return int(self.train_labels.shape[0])


@dataclasses.dataclass
class TrainingOutcome:
    model: Any
    released_event: dp_accounting.DpEvent
    public_details: Dict[str, Any] = dataclasses.field(default_factory=dict)
    private_details: Dict[str, Any] = dataclasses.field(default_factory=dict)


class TrainingInterrupted(Exception):
    """Raised by a kind that stopped after releasing ``released_event`` (a part of its plan)."""

    def __init__(self, released_event: dp_accounting.DpEvent, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.released_event = released_event
        self.cause = cause


class TrainerKind(Protocol):
    name: str

    def plan(self, inputs: PlanInputs) -> TrainingPlan:
        ...

    def train(self, context: TrainerContext) -> TrainingOutcome:
        ...


__all__ = ["PlanInputs", "SimulationSetting", "TrainingPlan", "TrainerContext", "TrainingOutcome",
           "TrainingInterrupted",
           "TrainerKind"]
