"""Privacy–utility studies: a grid of trainers × privacy budgets × replicates (× partitions) run as real pipeline
runs, with tables, plots and an HTML report (``privtrain study``, ``from simulations import Study``).

    spec.py     the grid, from the command line or a TOML study file, validated before anything runs
    plan.py     every point planned by the privacy layer; the study's total cost; the ledger's pre-flight
    runner.py   points as pipeline runs sharing the upstream cache; progress, Ctrl-C, --resume, --jobs
    results.py  the tidy table, what each column is w.r.t. the guarantee, mean ± 95% interval
    plots.py    PNGs;  report.py  the self-contained report.html
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Sequence

from simulations.study.spec import StudyError, StudySpec, from_options, from_toml


class Study:
    """``Study(data=..., output=..., trainers="dp_sgd,standard", epsilons=[1, 3], seeds=3).run()`` runs the grid
    (the same fields as ``privtrain study``; ``config="file.toml"`` for a study file) and returns the results
    (``.table``: one row per point, a pandas DataFrame; ``.summary``: mean and 95% interval per group).
    ``data_dir=`` / ``output_dir=`` are the same as ``data=`` / ``output=`` (the names ``SimulationConfig`` uses)."""

    def __init__(self, data: Optional[str] = None, output: Optional[str] = None, trainers: Any = "dp_sgd",
                 epsilons: Any = (1, 3), seeds: int = 3, partitions: Optional[Any] = None,
                 delta: Optional[float] = None, jobs: Optional[int] = None, settings: Optional[Dict[str, Any]] = None,
                 workdir: Optional[str] = None, name: Optional[str] = None, allow_non_private: bool = False,
                 config: Optional[str] = None, command: str = "", *, data_dir: Optional[str] = None,
                 output_dir: Optional[str] = None):
        data = _one_of("data", data, "data_dir", data_dir)
        output = _one_of("output", output, "output_dir", output_dir)
        if config is not None:
            self.spec = from_toml(config, output=output, workdir=workdir, jobs=jobs, command=command, data=data)
        else:
            items = [f"{k}={v if not isinstance(v, (list, tuple)) else ','.join(map(str, v))}"
                     for k, v in (settings or {}).items()]
            self.spec = from_options(data, output, trainers=trainers,
                                     epsilons=list(epsilons) if not isinstance(epsilons, str) else epsilons,
                                     seeds=seeds, partitions=partitions, delta=delta, jobs=jobs or 1, settings=items,
                                     workdir=workdir, name=name, allow_non_private=allow_non_private, command=command)

    def points(self):
        return self.spec.points()

    def run(self, resume: bool = False, progress=sys.stderr, ledger=None):
        from simulations.study.runner import StudyRunner

        return StudyRunner(self.spec, resume=resume, progress=progress, ledger=ledger).run()


def _one_of(name: str, value, alias: str, alias_value):
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise StudyError(f"pass {name}= or {alias}= (the same field), not both")
    return alias_value


__all__ = ["Study", "StudyError", "StudySpec"]
