"""Plans every grid point through the privacy layer before anything runs, states the whole study's cost (the
composition of every point's event on the data source, accounted by the privacy layer) and checks it against
the source's ledger. Nothing here computes an epsilon itself."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence

from simulations.study.spec import Point, StudyError, StudySpec


@dataclasses.dataclass
class StudyPlan:
    spec: StudySpec
    dataset: Any                        # dp_training.dataset.DatasetSpec
    points: List[Point]
    plans: Dict[str, Any]               # point id -> dp_training.protocol.RunPlan
    combined: Any                       # dp_training.protocol.CombinedPlan of the points still to run
    public_benchmark: bool
    budget: Optional[Any]               # the source's ledger budget, if any
    warnings: List[str]

    def privacy_args(self, point: Point) -> Dict[str, Any]:
        return privacy_args(self.spec, point)

    def statement(self) -> str:
        c = self.combined
        src = c.source
        from dp_training.events import RELATION_TEXT

        relation = RELATION_TEXT[src.relation].format(unit=src.unit_name)
        if c.runs == 0:
            return "nothing left to run"
        if math.isinf(c.epsilon):
            text = (f"total privacy cost of the {c.runs} run(s) to go: UNBOUNDED ({c.non_private_runs} non-private "
                    f"run(s) void any guarantee on source {src.source_id!r})")
            if c.private_runs:
                text += (f"; the {c.private_runs} private run(s) alone compose to epsilon = {c.private_epsilon:.4g}, "
                         f"delta = {c.delta:.3g} ({c.accountant} accountant, {relation})")
            return text
        return (f"total privacy cost of the {c.runs} run(s) to go: epsilon = {c.epsilon:.4g}, delta = {c.delta:.3g} "
                f"({c.accountant} accountant, {relation}; the composition of every run's "
                f"event on source {src.source_id!r}, not a sum)")


def privacy_args(spec: StudySpec, point: Point) -> Dict[str, Any]:
    args: Dict[str, Any] = dict(point.arm.privacy)
    args.update({"target_epsilon": point.target_epsilon, "delta": spec.delta,
                 "label": f"study {spec.name}: {point.id}"})
    if spec.allow_non_private:
        args["allow_non_private"] = True
    return args


def plan_study(spec: StudySpec, points: Sequence[Point], ledger=None) -> StudyPlan:
    """Plans ``points`` (the ones still to run) and checks their composition against the ledger. Raises
    StudyError for a grid the privacy layer refuses, and the ledger's errors for a study it would refuse."""
    from dp_training.dataset import DatasetError, load_dataset
    from dp_training.features import numeric_key
    from dp_training.protocol import PlanError, check_combined, combine_plans, plan_run
    from pipeline.trainers import get_trainer

    try:
        dataset = load_dataset(spec.data)
        source = dataset.require_privacy()
    except DatasetError as e:
        raise StudyError(f"data: {e}") from None
    exact = None
    if source.relation == "replace_one":
        from dp_training.dataset import read_rows

        exact = read_rows(dataset, "train").num_rows
    numeric = [numeric_key(c) for c in dataset.numeric_features]
    plans: Dict[str, Any] = {}
    for point in points:
        try:
            plans[point.id] = plan_run(dataset, point.arm.trainer, get_trainer(point.arm.trainer),
                                       point.trainer_args(dataset), privacy_args(spec, point), numeric,
                                       exact_rows=exact)
        except (PlanError, ValueError) as e:
            raise StudyError(f"point {point.id}: {e}") from None
    warnings: List[str] = []
    from dp_training.ledger import Ledger, resolve_ledger_path

    ledger = ledger if ledger is not None else Ledger(resolve_ledger_path(None))
    budget = ledger.get_budget(source.source_id)
    if plans:
        try:
            combined = combine_plans(list(plans.values()))
        except PlanError as e:
            raise StudyError(f"grid: {e} (give every arm the same accountant; the study's delta is shared)") from None
    else:
        from dp_training.protocol import CombinedPlan

        import dp_accounting
        combined = CombinedPlan(source, "pld", spec.delta or 0.0, 0, 0, dp_accounting.NoOpDpEvent(), 0.0)
    public = bool(getattr(source, "public_benchmark", False))
    if plans:
        if public:
            warnings.append(f"source {source.source_id!r} is declared a public benchmark (dataset.json): every run "
                            "is recorded in the ledger, no budget applies")
        first = next(iter(plans.values()))
        check_combined(combined, {**first.privacy_args, "label": f"study {spec.name}"}, ledger=ledger)
        if budget is None and not public:
            warnings.append(f"source {source.source_id!r} has no privacy budget in the ledger: nothing limits this "
                            "study's spend (set one with privtrain budget --set-epsilon)")
    return StudyPlan(spec=spec, dataset=dataset, points=list(points), plans=plans, combined=combined,
                     public_benchmark=public, budget=budget, warnings=warnings)
