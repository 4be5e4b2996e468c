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
    dataset: Any                        # core.dataset.DatasetSpec
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
        if math.isinf(c.epsilon):
            text = (f"planned privacy cost of the study's {c.runs} run(s), each run once: UNBOUNDED "
                    f"({c.non_private_runs} non-private run(s) void any guarantee on source {src.source_id!r})")
            if c.private_runs:
                text += (f"; the {c.private_runs} private run(s) alone compose to epsilon = {c.private_epsilon:.4g}, "
                         f"delta = {c.delta:.3g} ({c.accountant} accountant, {relation})")
            return text
        return (f"planned privacy cost of the study's {c.runs} run(s), each run once: epsilon = {c.epsilon:.4g}, "
                f"delta = {c.delta:.3g} ({c.accountant} accountant, {relation}; the composition of every run's "
                f"event on source {src.source_id!r}, not a sum)")


def label_prefix(spec: StudySpec) -> str:
    """Every point's ledger label starts with this (``study NAME: POINT``)."""
    return f"study {spec.name}: "


def ledger_statement(plan: "StudyPlan", ledger=None) -> str:
    """The study's total privacy cost as the ledger holds it: the composition of every entry labelled
    ``study NAME:`` on the source (every attempt: a point interrupted or failed after its reservation keeps its
    charge, and ``--resume`` charges it again), accounted by the privacy layer; the grid's planned cost (each
    point once) beside it."""
    from dp_training.events import RELATION_TEXT
    from dp_training.protocol.studies import ledger_charge

    c = plan.combined
    src = c.source
    charge = ledger_charge(src, label_prefix(plan.spec), c.delta, c.accountant, ledger=ledger)
    relation = RELATION_TEXT[src.relation].format(unit=src.unit_name)
    head = (f"total privacy cost of the study as charged in the ledger: {charge.runs} entr(y/ies) labelled "
            f"'{label_prefix(plan.spec).strip()}' on source {src.source_id!r}"
            + (f" ({charge.not_completed} of them failed, cancelled or open: charged all the same)"
               if charge.not_completed else ""))
    if math.isinf(charge.epsilon):
        text = f"{head}: UNBOUNDED ({charge.non_private_runs} non-private run(s) void any guarantee)"
        if charge.runs > charge.non_private_runs:
            text += (f"; the private entries alone compose to epsilon = {charge.private_epsilon:.4g}, "
                     f"delta = {c.delta:.3g} ({c.accountant} accountant, {relation})")
    else:
        text = (f"{head}: epsilon = {charge.epsilon:.4g}, delta = {c.delta:.3g} ({c.accountant} accountant, "
                f"{relation}; the composition of every entry's charged event, not a sum)")
    planned = ("unbounded" if math.isinf(c.epsilon) else f"epsilon = {c.epsilon:.4g}")
    return text + f". The grid's {c.runs} point(s), each run once, were planned at {planned}"


def privacy_args(spec: StudySpec, point: Point) -> Dict[str, Any]:
    args: Dict[str, Any] = dict(point.arm.privacy)
    args.update({"target_epsilon": point.target_epsilon, "delta": spec.delta,
                 "label": f"study {spec.name}: {point.id}"})
    if spec.allow_non_private:
        args["allow_non_private"] = True
    return args


def plan_study(spec: StudySpec, points: Sequence[Point], ledger=None,
               pending: Optional[Sequence[str]] = None) -> StudyPlan:
    """Plans every point of the study (replicates share their plan: it depends on public inputs only), states
    the whole study's composed cost, and checks the points still to run (``pending`` ids; default all) against
    the ledger, composed with what it already holds. Raises StudyError for a grid the privacy layer refuses,
    and the ledger's errors for a study it would refuse."""
    from core.dataset import DatasetError, load_dataset
    from dp_training.planner import PlanOptions, plan_for
    from dp_training.protocol import PlanError
    from dp_training.protocol.studies import check_combined, combine_plans
    from pipeline.config import RunConfig
    from pipeline.trainers import get_trainer

    try:
        dataset = load_dataset(spec.data)
        source = dataset.require_privacy()
    except DatasetError as e:
        raise StudyError(f"data: {e}") from None
    # the points run as pipeline runs with RunConfig's image model (simulations/study/runner.py): plan the same
    exact = None
    if source.relation == "replace_one":
        from pipeline.data_gate import readable_rows

        exact = readable_rows(dataset, "train")   # as ingestion reads them (damaged rows are placeholders)
    options = PlanOptions(image_model=RunConfig().image_model, exact_rows=exact)
    plans: Dict[str, Any] = {}
    by_config: Dict[tuple, Any] = {}
    for point in points:
        key = (point.arm.name, point.target_epsilon, point.partition)
        if key not in by_config:
            try:
                by_config[key] = plan_for(dataset, get_trainer(point.arm.trainer), point.trainer_args(dataset),
                                          privacy_args(spec, point), options)
            except (PlanError, ValueError) as e:
                raise StudyError(f"point {point.id}: {e}") from None
        plans[point.id] = by_config[key]
    pending_ids = set(plans) if pending is None else set(pending)
    warnings: List[str] = []
    from dp_training.ledger import Ledger, resolve_ledger_path

    ledger = ledger if ledger is not None else Ledger(resolve_ledger_path(None))
    budget = ledger.get_budget(source.source_id)
    try:
        combined = combine_plans(list(plans.values())) if plans else None
        to_go = [plans[i] for i in plans if i in pending_ids]
        combined_to_go = combine_plans(to_go) if to_go else None
    except PlanError as e:
        raise StudyError(f"grid: {e} (give every arm the same accountant; the study's delta is shared)") from None
    if combined is None:
        raise StudyError("grid: the study has no points")
    public = bool(getattr(source, "public_benchmark", False))
    if public:
        warnings.append(f"source {source.source_id!r} is declared a public benchmark (dataset.json): every run "
                        "is recorded in the ledger, no budget applies")
    if combined_to_go is not None:
        first = to_go[0]
        check_combined(combined_to_go, dataclasses.replace(first.privacy, label=f"study {spec.name}"), ledger=ledger)
        if budget is None and not public:
            warnings.append(f"source {source.source_id!r} has no privacy budget in the ledger: nothing limits this "
                            "study's spend (set one with privtrain budget --set-epsilon)")
    done = len(plans) - len(to_go)
    if done:
        warnings.append(f"{done} run(s) of this study are already recorded (and charged in the ledger); the ledger "
                        f"check covered the {len(to_go)} to go")
    return StudyPlan(spec=spec, dataset=dataset, points=list(points), plans=plans, combined=combined,
                     public_benchmark=public, budget=budget, warnings=warnings)
