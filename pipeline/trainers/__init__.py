"""Trainer kinds, by name. Each entry is ``"module:Class"``; the module may also define
``add_arguments(parser)`` and ``trainer_args(namespace)`` for its command-line flags.
Modules are imported lazily so that, e.g., TFF is only loaded when the federated trainer runs."""
from __future__ import annotations

import importlib

from dp_training.contract import TrainerContext, TrainerKind, TrainingOutcome  # noqa: F401

TRAINER_KINDS = {
    "standard": "pipeline.trainers.standard:StandardTrainer",
    "dp_sgd": "dp_training.trainer:DPSGDTrainer",
    "federated": "federated.trainer:FederatedTrainer",
}
PRIVATE_KINDS = ("dp_sgd", "federated")


def trainer_module(kind: str):
    if kind not in TRAINER_KINDS:
        raise ValueError(f"unknown trainer {kind!r}; choose one of {', '.join(TRAINER_KINDS)}")
    return importlib.import_module(TRAINER_KINDS[kind].split(":")[0])


def is_private(kind: str, trainer_args) -> bool:
    """Whether a run of this kind with these arguments is differentially private (a kind may decide by its
    arguments through a module-level ``is_private(args)``; e.g. FedAvg is private only with DP noise)."""
    module = trainer_module(kind)
    if hasattr(module, "is_private"):
        return bool(module.is_private(trainer_args))
    return kind in PRIVATE_KINDS


def get_trainer(kind: str) -> TrainerKind:
    module = trainer_module(kind)
    return getattr(module, TRAINER_KINDS[kind].split(":")[1])()
