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
import math
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Tuple, Type

import dp_accounting
import numpy as np

from core.dataset import PrivacyDeclaration


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
      config: the kind's typed :class:`KindConfig` of ``args`` (parsed and validated once by the protocol).
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
    config: Optional["KindConfig"] = None

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


class ArgumentError(ValueError):
    """A trainer argument of the wrong type or value; the message names the argument and the fix."""


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def parse_number(kind: str, key: str, value, *, minimum: Optional[float] = None, above: Optional[float] = None,
                 finite: bool = True) -> float:
    """A real number (an int, a float or a numeric string such as ``"1.0"``, e.g. from a TOML file or a Python
    caller); a bool, NaN, a non-numeric string or a value out of range is one ArgumentError naming the key."""
    if isinstance(value, bool) or value is None:
        raise ArgumentError(f"{kind} argument {key} must be a number, got {value!r}; pass e.g. {_flag(key)} 1.0")
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ArgumentError(f"{kind} argument {key} must be a number, got {value!r}; pass e.g. {_flag(key)} 1.0"
                            ) from None
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ArgumentError(f"{kind} argument {key} must be a finite number, got {value!r}")
    if minimum is not None and v < minimum:
        raise ArgumentError(f"{kind} argument {key} must be >= {minimum:g}, got {value!r}")
    if above is not None and not v > above:
        raise ArgumentError(f"{kind} argument {key} must be > {above:g}, got {value!r}")
    return v


def parse_whole(kind: str, key: str, value, *, minimum: Optional[int] = None) -> int:
    """A whole number (an int, an integral float or a string of one); anything else is one ArgumentError."""
    try:
        v = parse_number(kind, key, value)
    except ArgumentError:
        v = None
    if v is None or not float(v).is_integer():
        raise ArgumentError(f"{kind} argument {key} must be a whole number, got {value!r}; pass e.g. "
                            f"{_flag(key)} 10")
    if minimum is not None and v < minimum:
        raise ArgumentError(f"{kind} argument {key} must be a whole number >= {minimum}, got {value!r}; pass "
                            f"{_flag(key)} N")
    return int(v)


def parse_bool(kind: str, key: str, value) -> bool:
    """A bool (or ``"true"``/``"false"``); a truthy string such as ``"no"`` is refused, never read as True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ArgumentError(f"{kind} argument {key} must be true or false, got {value!r}")


def parse_choice(kind: str, key: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{kind} argument {key} must be one of {', '.join(choices)}, got {value!r}; pass "
                            f"{_flag(key)} {choices[0]}")
    return value


def parse_text(kind: str, key: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ArgumentError(f"{kind} argument {key} must be a non-empty string, got {value!r}")
    return value.strip()


@dataclasses.dataclass(frozen=True)
class KindConfig:
    """A kind's arguments, typed and validated once (the CLI, a study's TOML and the Python API all come through
    :meth:`parse`). Subclasses are frozen dataclasses whose ``__post_init__`` converts each field with the
    ``parse_*`` helpers (``_set``); ``private`` says whether a run with this config is differentially private,
    and is what the kind's plan uses (``TrainingPlan.private``): there is no second place deciding it."""

    kind: ClassVar[str] = ""

    @classmethod
    def parse(cls, args: "Optional[Mapping[str, Any] | KindConfig]" = None) -> "KindConfig":
        if isinstance(args, cls):
            return args
        if isinstance(args, KindConfig):
            raise ArgumentError(f"a {args.kind} config was given to the {cls.kind} trainer")
        raw = dict(args or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ArgumentError(f"unknown {cls.kind} trainer argument(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in raw.items() if v is not None})

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    def to_args(self) -> Dict[str, Any]:
        """The typed arguments as a plain dict (JSON-ready: what a pipeline's custom config carries)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def private(self) -> bool:
        raise NotImplementedError

    @property
    def noise_given(self) -> bool:
        """True when the kind's noise is given explicitly (the run is then not calibrated to a target)."""
        return False


class TrainerKind:
    """Base of a trainer kind: a ``name``, its typed ``Config``, its command-line flags, ``plan`` (public inputs
    only) and ``train`` (the private rows). Register a kind with ``pipeline.trainers.register``.

    Studies (``simulations/study``) ask the kind, never name its keys: ``study_settings`` (what an arm may set),
    ``epsilon_axis`` (``"required"``: a grid over target epsilons unless the noise is given; ``"optional"``:
    without epsilons the arm runs non-private; ``"none"``: never private), ``partitioned`` (a grid over
    partitions) and ``study_args`` (the arguments a grid point runs with)."""

    name: ClassVar[str] = ""
    Config: ClassVar[Type[KindConfig]] = KindConfig
    epsilon_axis: ClassVar[str] = "none"
    partitioned: ClassVar[bool] = False
    # config fields a study never sets (a published seed would make the DP noise reproducible; run plumbing)
    study_hidden: ClassVar[Tuple[str, ...]] = ("seed",)
    # config fields never published (report.json, exported pipelines): a seed fixes the Poisson batches, and the
    # guarantee holds only while it stays secret
    secret_settings: ClassVar[Tuple[str, ...]] = ("seed",)

    def public_arguments(self, args: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """The run's arguments that may be published: the kind's config fields, less ``secret_settings``
        (an allow-list: an unknown key is left out too)."""
        fields = {f.name for f in dataclasses.fields(self.Config)}
        return {k: v for k, v in dict(args or {}).items() if k in fields and k not in self.secret_settings}

    def secret_arguments_set(self, args: Optional[Mapping[str, Any]]) -> Tuple[str, ...]:
        """The ``secret_settings`` this run sets (not None)."""
        return tuple(k for k in self.secret_settings if dict(args or {}).get(k) is not None)

    def study_settings(self) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.Config) if f.name not in self.study_hidden)

    def study_args(self, settings: Mapping[str, Any], target_epsilon: Optional[float] = None,
                   partition: Optional[str] = None, spec=None) -> Dict[str, Any]:
        """The arguments a study's grid point runs with (the arm's settings over the kind's study defaults)."""
        return dict(settings)

    def config(self, args: "Optional[Mapping[str, Any] | KindConfig]" = None) -> KindConfig:
        """``args`` parsed and validated into the kind's typed config (ArgumentError names a bad one)."""
        return self.Config.parse(args)

    def is_private(self, args: "Optional[Mapping[str, Any] | KindConfig]" = None) -> bool:
        """Whether a run with these arguments is private: the config's ``private``, which the plan states."""
        return self.config(args).private

    def add_arguments(self, parser) -> None:
        """Adds the kind's flags to an argparse parser (default: none)."""

    def from_arguments(self, namespace) -> KindConfig:
        """The kind's config from parsed flags."""
        return self.config({})

    def plan(self, inputs: PlanInputs) -> TrainingPlan:
        raise NotImplementedError

    def train(self, context: TrainerContext) -> TrainingOutcome:
        raise NotImplementedError

    def summary_lines(self, parameters: Mapping[str, Any]) -> List[str]:
        """Lines the run's summary prints about a private run's training, from the guarantee's public parameters
        (the plan's ``public`` plus the kind's public details). Default: none."""
        return []


__all__ = ["PlanInputs", "SimulationSetting", "TrainingPlan", "TrainerContext", "TrainingOutcome",
           "TrainingInterrupted", "TrainerKind", "KindConfig", "ArgumentError", "parse_number", "parse_whole",
           "parse_bool", "parse_choice", "parse_text"]
