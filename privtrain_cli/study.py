"""``privtrain study``: a privacy-utility study (simulations/study, docs/studies.md)."""
from __future__ import annotations


def add_parser(sub) -> None:
    from simulations.study.cli import add_parser as add_study_parser

    add_study_parser(sub)


def run(args) -> int:
    from simulations.study.cli import run as run_study

    return run_study(args)
