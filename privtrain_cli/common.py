"""Small pieces several commands share (no heavy imports)."""
from __future__ import annotations

import os

DEFAULT_WORKDIR_NAME = "privtrain-work"
REFUSALS = ("PlanError", "UnsupportedRelationError", "CalibrationError")  # the privacy layer's refusals


def default_workdir() -> str:
    return os.path.join(os.getcwd(), DEFAULT_WORKDIR_NAME)


def workdir_flag(p, help_text: str = "work directory of earlier runs (default ./privtrain-work)") -> None:
    p.add_argument("--workdir", default=default_workdir(), help=help_text)


def serving_dir(workdir: str) -> str:
    from pipeline.config import RunConfig

    return RunConfig(workdir=os.path.abspath(workdir)).serving_dir


def is_refusal(exc: BaseException) -> bool:
    """A refusal of the privacy layer (nothing trained): printed as one line."""
    return type(exc).__name__ in REFUSALS
