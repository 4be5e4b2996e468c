"""Trainer kinds, by name: a small registry (Opacus' accountant registry is the model). Each entry is
``"module:Class"`` (imported lazily so that, e.g., TFF is only loaded when the federated trainer runs) or a
:class:`dp_training.contract.TrainerKind` subclass; ``register(name, target)`` adds one. A kind's class holds
its typed ``Config`` (parsed and validated once), its flags (``add_arguments`` / ``from_arguments``), ``plan``,
``train`` and ``summary_lines``; whether a run is private is its config's ``private``, which its plan states."""
from __future__ import annotations

import importlib
from typing import Dict, Union

from dp_training.contract import TrainerContext, TrainerKind, TrainingOutcome  # noqa: F401

TRAINER_KINDS: Dict[str, Union[str, type]] = {
    "standard": "pipeline.trainers.standard:StandardTrainer",
    "dp_sgd": "dp_training.trainer:DPSGDTrainer",
    "federated": "federated.trainer:FederatedTrainer",
}


def register(name: str, target: Union[str, type], replace: bool = False) -> None:
    """Registers trainer kind ``name``: a ``"module:Class"`` path or a TrainerKind subclass."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a trainer kind's name is an identifier, got {name!r}")
    if name in TRAINER_KINDS and not replace:
        raise ValueError(f"trainer kind {name!r} is already registered (pass replace=True to replace it)")
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"register({name!r}, {target!r}): give 'module:Class'")
    if not isinstance(target, str) and not (isinstance(target, type) and issubclass(target, TrainerKind)):
        raise ValueError(f"register({name!r}, ...): a trainer kind derives from dp_training.contract.TrainerKind")
    TRAINER_KINDS[name] = target


def _check(kind: str) -> None:
    if kind not in TRAINER_KINDS:
        raise ValueError(f"unknown trainer {kind!r}; choose one of {', '.join(TRAINER_KINDS)}")


def trainer_module(kind: str):
    """The module defining kind ``kind`` (its command-line helpers live there too)."""
    _check(kind)
    target = TRAINER_KINDS[kind]
    if isinstance(target, str):
        return importlib.import_module(target.split(":")[0])
    return importlib.import_module(target.__module__)


def trainer_class(kind: str) -> type:
    _check(kind)
    target = TRAINER_KINDS[kind]
    if isinstance(target, str):
        return getattr(trainer_module(kind), target.split(":")[1])
    return target


def get_trainer(kind: str) -> TrainerKind:
    return trainer_class(kind)()
