"""A run's privacy arguments (``privtrain run`` flags, shared by every trainer kind), typed and validated once.

:class:`PrivacyOptions` is what the planner and the run session use. At the edges (the TFX Trainer's
``custom_config`` JSON, ``RunConfig.privacy``, ``plan_for``/``plan_run``/``run_private_training``,
``federated.simulate``'s ``privacy=``) a plain mapping is accepted and converted once with
:meth:`PrivacyOptions.from_mapping`; :meth:`PrivacyOptions.to_mapping` gives it back (JSON-ready). A bad value is
one :class:`PlanError` naming the argument and the fix, like ``dp_training.contract``'s ``KindConfig`` does for a
trainer kind's arguments.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from dp_training import accountants

DEFAULT_TARGET_EPSILON = 3.0
PREPROCESSING_SHARE = 0.1      # default preprocessing epsilon: this share of the run's target
DEFAULT_PREPROCESSING_EPSILON = 0.3   # when the kind's noise is given instead of a target
DEFAULT_MIN_SLICE_SIZE = 30


class PlanError(ValueError):
    """The run cannot be planned from its public inputs (the message names the fix)."""


def _number(key: str, value: Any, example: str) -> float:
    """A real number (an int, a float or a numeric string, e.g. from TOML or JSON); a bool is refused."""
    if isinstance(value, bool):
        raise PlanError(f"{key} must be a number, got {value!r}; pass e.g. {example}")
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise PlanError(f"{key} must be a number, got {value!r}; pass e.g. {example}") from None


def _positive_finite(key: str, value: Any, example: str) -> float:
    v = _number(key, value, example)
    if not (v > 0 and math.isfinite(v)):
        raise PlanError(f"{key} must be a finite number > 0, got {value!r}; pass e.g. {example}")
    return v


def _unit_interval(key: str, value: Any, example: str) -> float:
    v = _number(key, value, example)
    if not 0 < v < 1:
        raise PlanError(f"{key} must be in (0, 1), got {value!r}; pass e.g. {example}")
    return v


def _whole(key: str, value: Any, minimum: int, example: str) -> int:
    try:
        v = _number(key, value, example)
    except PlanError:
        v = None
    if v is None or not math.isfinite(v) or not float(v).is_integer() or v < minimum:
        raise PlanError(f"{key} must be a whole number >= {minimum}, got {value!r}; pass e.g. {example}")
    return int(v)


def _flag(key: str, value: Any) -> bool:
    """A bool (or ``"true"``/``"false"``); a truthy string such as ``"no"`` is refused, never read as True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise PlanError(f"{key} must be true or false, got {value!r}")


@dataclasses.dataclass(frozen=True)
class PrivacyOptions:
    """The run-level privacy arguments. ``None`` means "not given": the plan decides (e.g. delta = 1/(10 n)).

    target_epsilon: the run's total epsilon (None: the kind's default, or its explicitly given noise).
    delta: the run's delta (None: 1/(10 x the public planning size)).
    accountant: the accountant the guarantee is computed with (``dp_training.accountants``).
    preprocessing_epsilon: the DP preprocessing's share (None: a tenth of the target).
    budget_epsilon / budget_delta: the source's budget, created by this run when the source has none.
    ledger: the budget ledger's path (None: ``dp_training.ledger.resolve_ledger_path``).
    allow_non_private: non-private training on a source that has a budget (the spend becomes infinite).
    audit_canaries: the one-run audit's canaries (0: no audit).
    min_slice_size: slices with fewer rows are suppressed in the published metrics.
    label: recorded with the run's ledger entry (e.g. a study's point).
    ledger_must_exist / ledger_anchor: exported pipelines (``pipeline/export.py``): the ledger must already exist
      where the workers run (a missing shared volume must not start a fresh ledger), and must contain the
      receipt ``"SEQ:HASH"`` seen at export.
    anchors: receipts ``(SEQ, HASH[, where])`` recorded in the run's workdir (ML Metadata, privacy.json files):
      the ledger must contain them (``pipeline/receipts.py`` collects them at pre-flight and in the Trainer).
    new_source: the reason this data is a new source although the ledger knows its content under another id.
    """

    target_epsilon: Optional[float] = None
    delta: Optional[float] = None
    accountant: str = accountants.DEFAULT
    preprocessing_epsilon: Optional[float] = None
    budget_epsilon: Optional[float] = None
    budget_delta: Optional[float] = None
    ledger: Optional[str] = None
    allow_non_private: bool = False
    audit_canaries: int = 0
    min_slice_size: int = DEFAULT_MIN_SLICE_SIZE
    label: Optional[str] = None
    ledger_must_exist: bool = False
    ledger_anchor: Optional[str] = None
    anchors: Tuple[Tuple[Any, ...], ...] = ()
    new_source: Optional[str] = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.target_epsilon is not None:
            put("target_epsilon", _positive_finite("target epsilon", self.target_epsilon, "--target-epsilon 3"))
        if self.delta is not None:
            put("delta", _unit_interval("delta", self.delta, "--delta 1e-5"))
        try:
            accountants.get(self.accountant)
        except ValueError as e:
            raise PlanError(str(e)) from None
        if self.preprocessing_epsilon is not None:
            put("preprocessing_epsilon", _positive_finite("preprocessing epsilon", self.preprocessing_epsilon,
                                                          "--preprocessing-epsilon 0.3"))
        if self.budget_epsilon is not None:
            put("budget_epsilon", _positive_finite("budget epsilon", self.budget_epsilon, "--budget-epsilon 8"))
        if self.budget_delta is not None:
            put("budget_delta", _unit_interval("budget delta", self.budget_delta, "1e-5"))
        if self.ledger is not None:
            if not isinstance(self.ledger, (str, os.PathLike)) or not str(self.ledger).strip():
                raise PlanError(f"ledger must be a file path, got {self.ledger!r}; pass e.g. --ledger ~/ledger.sqlite")
            put("ledger", os.fspath(self.ledger))
        put("allow_non_private", _flag("allow_non_private", self.allow_non_private))
        put("audit_canaries", _whole("audit_canaries", self.audit_canaries, 0, "--audit-canaries 1000"))
        put("min_slice_size", _whole("min_slice_size", self.min_slice_size, 0, "--min-slice-size 30"))
        if self.label is not None:
            put("label", str(self.label))
        put("ledger_must_exist", _flag("ledger_must_exist", self.ledger_must_exist))
        if self.ledger_anchor is not None:
            seq, sep, head = str(self.ledger_anchor).partition(":")
            if not (sep and seq.strip().isdigit() and head):
                raise PlanError(f"ledger_anchor must be a receipt SEQ:HASH (an entry number and its hash), got "
                                f"{self.ledger_anchor!r}; export the pipeline again (privtrain export)")
            put("ledger_anchor", str(self.ledger_anchor))
        anchors = []
        for a in self.anchors or ():
            if isinstance(a, (str, bytes)) or not hasattr(a, "__len__") or len(a) not in (2, 3):
                raise PlanError(f"each anchor is a receipt (SEQ, HASH[, where]), got {a!r}")
            anchors.append(tuple(a))
        put("anchors", tuple(anchors))
        if self.new_source is not None:
            put("new_source", str(self.new_source))

    @classmethod
    def from_mapping(cls, args: "Union[Mapping[str, Any], PrivacyOptions, None]" = None) -> "PrivacyOptions":
        """Options from a plain mapping (``None`` values mean "not given"); unknown keys are refused."""
        if isinstance(args, cls):
            return args
        raw = dict(args or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(raw) - set(names)
        if unknown:
            raise PlanError(f"unknown privacy arguments {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: v for k, v in raw.items() if v is not None})

    def to_mapping(self) -> Dict[str, Any]:
        """Every option as a plain dict (JSON-ready: what a pipeline's custom config carries)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


__all__ = ["PrivacyOptions", "PlanError", "DEFAULT_TARGET_EPSILON", "PREPROCESSING_SHARE",
           "DEFAULT_PREPROCESSING_EPSILON", "DEFAULT_MIN_SLICE_SIZE"]
