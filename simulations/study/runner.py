"""Runs a study: every grid point is a real pipeline run (pipeline.runner.run_pipeline: the same components,
privacy protocol and ledger as ``privtrain run``), all points under one pipeline name and ML Metadata store so
that TFX's cache runs ExampleGen, StatisticsGen, SchemaGen, the validator and Transform once per data set.

Progress: one line per point with the elapsed time and an ETA. Ctrl-C stops after recording what finished
(exit 130; ``--resume`` continues). A failed point is recorded with its error and the study goes on.
``jobs > 1``: after the first point (which fills the cache), points run in worker processes, each with its own
copy of the ML Metadata store (SQLite takes one writer at a time) and its own output root; the ledger is shared
(its transactions are atomic).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from simulations.study import results as res
from simulations.study.spec import Point, StudyError, StudySpec

RESULTS_JSON, RESULTS_CSV, AGGREGATE_CSV, REPORT_HTML = "results.json", "results.csv", "aggregate.csv", "report.html"


class StudyInterrupted(Exception):
    """Ctrl-C: the finished points are recorded; ``--resume`` continues."""


@dataclasses.dataclass
class StudyResults:
    rows: List[Dict[str, Any]]
    aggregate: List[Dict[str, Any]]
    statement: str
    files: List[str]
    ran: int                 # points run by this call (the rest were resumed from an earlier call)

    @property
    def table(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    @property
    def summary(self):
        import pandas as pd

        return pd.DataFrame(self.aggregate)


def pipeline_name(dataset_name: str) -> str:
    """One pipeline per data set for every study in a workdir: the upstream components' cache is shared."""
    return f"{dataset_name}-study"


# ------------------------------------------------------------------------------------------------
# One point (in this process or a worker)
# ------------------------------------------------------------------------------------------------
def run_point(spec: StudySpec, point: Point, store_dir: Optional[str] = None) -> Dict[str, Any]:
    from core.dataset import DatasetError, load_dataset
    from dp_training.ledger import LedgerError
    from dp_training.protocol import DEFAULT_MIN_SLICE_SIZE
    from pipeline.config import RunConfig
    from pipeline.runner import PipelineRunError, run_pipeline
    from simulations.study.plan import privacy_args

    dataset = load_dataset(spec.data)
    config = RunConfig(
        data_dir=spec.data, workdir=spec.workdir, trainer=point.arm.trainer, trainer_args=point.trainer_args(dataset),
        hidden_units=tuple(point.arm.run.get("hidden_units", (64, 64))),
        min_auc=float(point.arm.run.get("min_auc", 0.8)), allow_non_private=spec.allow_non_private,
        privacy=privacy_args(spec, point), pipeline_name=pipeline_name(dataset.name), compare_to_baseline=False,
        store_dir=store_dir)
    logs = os.path.join(spec.workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    started = time.time()
    log_path = os.path.join(logs, point.id.replace("/", "_") + ".log")
    with open(log_path, "a") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        try:
            summary = run_pipeline(config, progress=log)
        except PipelineRunError as e:
            return res.failed_row(point, str(e), time.time() - started)
        except (DatasetError, LedgerError, ValueError, OSError) as e:
            return res.failed_row(point, f"{type(e).__name__}: {e}", time.time() - started)
    min_slice = int(point.arm.privacy.get("min_slice_size") or DEFAULT_MIN_SLICE_SIZE)
    return res.row_from_summary(point, summary, min_slice, _round_accuracy(summary) if
                                point.arm.trainer == "federated" else None,
                                eval_public=dataset.require_privacy().is_public_split("eval"))


def _round_accuracy(summary):
    """Federated: each round's accuracy on the eval split, from the Trainer's private details in the workdir
    (only round numbers and eval accuracies are taken; per-round counts and losses stay there)."""
    runs = summary.outputs("Trainer", "model_run")
    if not runs:
        return None
    path = os.path.join(runs[0].uri, "private_details.json")
    try:
        with open(path) as f:
            history = json.load(f).get("history") or []
    except (OSError, ValueError):
        return None
    return [(h["round"], h["eval_accuracy"]) for h in history if h.get("eval_accuracy") is not None]


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt   # like Ctrl-C: the running Trainer closes its reservation with what it released


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops the study; workers are ended by it (SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    from pipeline.quiet import quiet_libraries

    quiet_libraries()


def _worker_point(spec: StudySpec, point: Point, store_dir: Optional[str]) -> Dict[str, Any]:
    """A point in a worker process. SIGTERM from the parent arrives as KeyboardInterrupt: the protocol has
    closed the running point's ledger entry (cancelled, with what was released) by the time it reaches here;
    the worker then exits at once."""
    try:
        return run_point(spec, point, store_dir)
    except KeyboardInterrupt:
        os._exit(128 + signal.SIGTERM)


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------
def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _describe(row: Dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"FAILED: {row.get('error')}"
    acc = row.get("accuracy")
    eps = row.get("epsilon")
    eps_text = "non-private" if eps in (None, float("inf")) or not row.get("private") else f"epsilon {eps:.3g}"
    return f"accuracy {acc:.4f} ({eps_text})" if isinstance(acc, float) else f"no accuracy ({eps_text})"


class StudyRunner:
    def __init__(self, spec: StudySpec, resume: bool = False, progress=sys.stderr, ledger=None):
        self.spec, self.resume, self.progress, self.ledger = spec, resume, progress, ledger
        self._stop = False

    def say(self, text: str) -> None:
        self.progress.write(text + "\n")
        self.progress.flush()

    def run(self) -> StudyResults:
        from simulations.study.plan import plan_study

        spec = self.spec
        points = spec.points()
        results_path = os.path.join(spec.output, RESULTS_JSON)
        done: Dict[str, Dict[str, Any]] = {}
        if os.path.exists(results_path):
            if not self.resume:
                raise StudyError(f"output: {spec.output} already holds a study's results; pass --resume to continue "
                                 "it, or choose another --output")
            ids = {p.id for p in points}
            done = {r["point"]: r for r in res.load_rows(results_path) if r.get("status") == "ok" and r["point"] in ids}
        pending = [p for p in points if p.id not in done]
        plan = plan_study(spec, points, ledger=self.ledger, pending=[p.id for p in pending])  # refuses first
        self.say(f"study {spec.name}: {len(points)} point(s) ({len(spec.arms)} arm(s) x epsilons x {spec.replicates} "
                 f"replicate(s)); {len(done)} already finished, {len(pending)} to run")
        self.say(plan.statement())
        for w in plan.warnings:
            self.say(f"warning: {w}")
        if not plan.dataset.require_privacy().is_public_split("eval"):
            self.say(res.SLICE_SIZES_WITHHELD)
        os.makedirs(spec.output, exist_ok=True)
        from core.private_files import OpenDirectoryError, private_dir

        try:
            private_dir(spec.workdir)  # 0700 (private rows, models); an existing one open to others is refused
        except OpenDirectoryError as e:
            raise StudyError(str(e)) from None
        rows = dict(done)
        started = time.time()
        ran = 0
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            self._stop = True
            raise KeyboardInterrupt

        try:
            signal.signal(signal.SIGINT, on_sigint)
        except ValueError:   # not the main thread: Ctrl-C is the caller's business
            previous = None
        interrupted = False
        try:
            for point, row in self._execute(pending):
                ran += 1
                rows[point.id] = row
                elapsed = time.time() - started
                left = len(pending) - ran
                eta = elapsed / ran * left
                self.say(f"[{len(done) + ran}/{len(points)}] {point.id}: {_describe(row)} in "
                         f"{_fmt_duration(row.get('wall_seconds', 0))}; elapsed {_fmt_duration(elapsed)}, "
                         f"ETA {_fmt_duration(eta) if left else 'done'}")
                self._write_tables(plan, points, rows)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        ordered = [rows[p.id] for p in points if p.id in rows]
        if interrupted or self._stop:
            self._write_tables(plan, points, rows)
            self.say(f"study interrupted: {len(ordered)} of {len(points)} point(s) recorded (the running point was "
                     f"not); continue with --resume")
            raise StudyInterrupted(f"{len(ordered)} of {len(points)} points recorded")
        files = self._write_tables(plan, points, rows)
        from simulations.study.plots import write_plots
        from simulations.study.report import write_report

        pngs = write_plots(spec.output, ordered, res.aggregate(ordered),
                           eval_public=plan.dataset.require_privacy().is_public_split("eval"))
        files += pngs
        files.append(write_report(spec, plan, ordered, res.aggregate(ordered), pngs, self._document(plan, points, rows)))
        failed = sum(r.get("status") != "ok" for r in ordered)
        from simulations.study.plan import ledger_statement

        charged = ledger_statement(plan, self.ledger)
        self.say(charged)
        self.say(f"study {spec.name} finished: {len(ordered) - failed} point(s) ok, {failed} failed, in "
                 f"{_fmt_duration(time.time() - started)}; results in {spec.output}")
        return StudyResults(rows=ordered, aggregate=res.aggregate(ordered), statement=charged,
                            files=[os.path.join(spec.output, f) for f in files], ran=ran)

    # -- execution ---------------------------------------------------------------------------------
    def _execute(self, pending: Sequence[Point]):
        spec = self.spec
        if not pending:
            return
        if spec.jobs <= 1 or len(pending) == 1:
            for point in pending:
                row = run_point(spec, point)
                if self._stop:
                    raise KeyboardInterrupt
                yield point, row
            return
        yield from self._execute_parallel(pending)

    def _execute_parallel(self, pending: Sequence[Point]):
        import concurrent.futures as cf
        import multiprocessing

        spec = self.spec
        pool = cf.ProcessPoolExecutor(max_workers=spec.jobs, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_worker_init)
        try:
            first = pool.submit(_worker_point, spec, pending[0], None)   # fills the shared cache in the main store
            yield pending[0], first.result()
            slots = []
            for k in range(spec.jobs):
                slot = os.path.join(spec.workdir, "jobs", f"job-{k}")
                os.makedirs(slot, exist_ok=True)
                shutil.copyfile(os.path.join(spec.workdir, "metadata.sqlite"), os.path.join(slot, "metadata.sqlite"))
                slots.append(slot)
            queue = list(pending[1:])
            running: Dict[Any, tuple] = {}
            while queue or running:
                while queue and len(running) < spec.jobs:
                    slot = next(s for s in slots if s not in {v[1] for v in running.values()})
                    point = queue.pop(0)
                    running[pool.submit(_worker_point, spec, point, slot)] = (point, slot)
                finished, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    point, _slot = running.pop(future)
                    yield point, future.result()
        finally:
            processes = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in processes:   # the workers this study started, by their own handles
                if proc.is_alive():
                    proc.terminate()
            for proc in processes:
                proc.join(timeout=60)
                if proc.is_alive():   # did not close within a minute: its reservation stays charged in full
                    proc.kill()
                    proc.join()

    # -- outputs ------------------------------------------------------------------------------------
    def _document(self, plan, points, rows) -> Dict[str, Any]:
        from simulations.study.plan import ledger_statement
        from simulations.study.report import provenance

        ordered = [rows[p.id] for p in points if p.id in rows]
        eval_public = plan.dataset.require_privacy().is_public_split("eval")
        return {"study": self.spec.to_json(), "dataset": plan.dataset.name,
                "source_id": plan.dataset.require_privacy().source_id,
                "privacy_cost": ledger_statement(plan, self.ledger), "public_benchmark": plan.public_benchmark,
                "points": len(points), "rows": ordered, "aggregate": res.aggregate(ordered),
                "columns": res.declarations(eval_public), "provenance": provenance(self.spec),
                "not_covered": res.not_covered(eval_public)}

    def _write_tables(self, plan, points, rows) -> List[str]:
        ordered = [rows[p.id] for p in points if p.id in rows]
        out = self.spec.output
        eval_public = plan.dataset.require_privacy().is_public_split("eval")
        res.write_csv(os.path.join(out, RESULTS_CSV), ordered, res.ROW_FIRST, eval_public)
        res.write_csv(os.path.join(out, AGGREGATE_CSV), res.aggregate(ordered), res.AGG_FIRST, eval_public)
        res.write_json(os.path.join(out, RESULTS_JSON), self._document(plan, points, rows), eval_public)
        return [RESULTS_CSV, AGGREGATE_CSV, RESULTS_JSON]
