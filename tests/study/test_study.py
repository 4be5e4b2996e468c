"""privtrain study: a 2 epsilons x 2 replicates x (dp_sgd, standard) study on a small Adult sample, run as real
pipeline runs, interrupted with SIGINT after its first points and resumed; its tables, plots and report.html
(rendered in headless Chromium); exactly what leaves the trust boundary; bad grids and over-budget studies
refused before anything runs."""
from __future__ import annotations

import csv
import glob
import hashlib
import html as html_lib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import PROJECT_ROOT, make_adult_sample, run_cli

TRAIN_ROWS = 397          # the sample's real size (private); dataset.json declares the public figure 400
SOURCE = "adult-sample-study"
GRID = ["--trainers", "dp_sgd,standard", "--epsilons", "1,2", "--seeds", "2", "--set", "epochs=1",
        "--set", "dp_sgd.batch_size=64", "--set", "min_auc=0"]
POINTS = 6   # dp_sgd: 2 epsilons x 2 replicates; standard (no epsilon axis): 2 replicates
EXPECTED_FILES = {"results.csv", "results.json", "aggregate.csv", "report.html", "utility_vs_epsilon.png",
                  "slices_vs_epsilon.png"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_adult_sample(str(tmp_path_factory.mktemp("study_sample")), TRAIN_ROWS, 300, source_id=SOURCE,
                             privacy={"public_row_estimate": 400})


def _rows(output):
    path = os.path.join(output, "results.json")
    try:
        with open(path) as f:
            return json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return []


@pytest.fixture(scope="module")
def study(tmp_path_factory, sample):
    """The study, interrupted (SIGINT) once its first point is recorded, then resumed with the Python API."""
    base = tmp_path_factory.mktemp("study")
    output, workdir = str(base / "out"), str(base / "work")
    args = [sys.executable, "-m", "privtrain_cli", "study", "--data", sample, "--output", output, "--workdir", workdir,
            *GRID]
    env = dict(os.environ, PYTHONPATH=PROJECT_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    log = open(base / "first.log", "w+")
    proc = subprocess.Popen(args, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 900
        while not _rows(output) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, "the study ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.seek(0)
    first = log.read()
    log.close()
    before = _rows(output)

    from simulations import Study

    progress = io.StringIO()
    settings = {"epochs": 1, "dp_sgd.batch_size": 64, "min_auc": 0}
    result = Study(data=sample, output=output, workdir=workdir, trainers="dp_sgd,standard", epsilons=[1, 2],
                   seeds=2, settings=settings).run(resume=True, progress=progress)
    return {"output": output, "workdir": workdir, "rc": rc, "first": first, "before": before,
            "resumed": progress.getvalue(), "result": result}


def test_sigint_stops_cleanly_and_resume_runs_only_missing_points(study):
    assert study["rc"] == 130, study["first"][-3000:]
    assert "study interrupted" in study["first"] and "--resume" in study["first"]
    assert "Traceback" not in study["first"]
    finished = {r["point"] for r in study["before"]}
    assert len(finished) >= 1
    resumed = study["resumed"]
    assert f"{len(finished)} already finished, {POINTS - len(finished)} to run" in resumed, resumed
    ran = re.findall(r"^\[(\d+)/(\d+)\] (\S+):", resumed, re.M)
    assert len(ran) == POINTS - len(finished) and not finished & {p for _, _, p in ran}
    assert all(re.search(r"elapsed \d+", line) and "ETA" in line for line in resumed.splitlines()
               if line.startswith("["))
    # The ledger holds one completed run per recorded point: the resumed study did not run them again.
    from dp_training.ledger import Ledger

    ledger = Ledger(os.environ["PRIVTRAIN_LEDGER"])
    labels = [e.payload.get("label") for e in ledger.entries(SOURCE) if e.kind == "reserve"]
    for point in finished:
        assert labels.count(f"study study: {point}") == 1, (point, labels)


def test_table_aggregate_plots_and_python_api(study):
    result = study["result"]
    assert len(result.table) == POINTS and set(result.table["status"]) == {"ok"}
    with open(os.path.join(study["output"], "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == POINTS
    dp = [r for r in rows if r["trainer"] == "dp_sgd"]
    assert len(dp) == 4 and all(float(r["epsilon"]) <= float(r["target_epsilon"]) + 1e-6 for r in dp)
    assert all(r["accountant"] == "pld" and r["relation"] == "add_or_remove_one" and float(r["delta"]) > 0 for r in dp)
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 and r["wall_seconds"] for r in rows)
    assert {r["epsilon"] for r in rows if r["trainer"] == "standard"} == {"inf"}
    assert any(k.startswith("accuracy[sex=") for k in rows[0])       # per-slice accuracy
    # each point's epsilon is the guarantee the privacy layer recorded in ML Metadata
    from pipeline.metadata import custom_properties, open_store

    with open_store(os.path.join(study["workdir"], "metadata.sqlite")) as store:
        recorded = sorted(round(float(custom_properties(m)["privacy_epsilon"]), 4)
                          for m in store.get_artifacts_by_type("Model")
                          if custom_properties(m).get("private"))
    assert sorted(round(float(r["epsilon"]), 4) for r in dp) == recorded[-4:] or set(
        round(float(r["epsilon"]), 4) for r in dp) <= set(recorded)
    agg = result.summary
    assert len(agg) == 3 and set(agg["accuracy_n"]) == {2}
    assert agg["accuracy_ci95"].notna().all()
    doc = json.load(open(os.path.join(study["output"], "results.json")))
    assert "composition" in doc["privacy_cost"] or "UNBOUNDED" in doc["privacy_cost"]
    # the published total is what the ledger holds for the study: every attempt, the interrupted one included
    from dp_training.ledger import Ledger

    held = [e for e in Ledger(os.environ["PRIVTRAIN_LEDGER"]).entries(SOURCE)
            if e.kind == "reserve" and str(e.payload.get("label")).startswith("study study: ")]
    assert f"as charged in the ledger: {len(held)} entr" in doc["privacy_cost"] and len(held) >= POINTS
    from simulations.study.plots import SLICES, UTILITY
    import matplotlib.image

    for png in (UTILITY, SLICES):
        pixels = matplotlib.image.imread(os.path.join(study["output"], png))
        assert pixels.shape[0] > 200 and pixels.std() > 0.05


def test_outputs_are_declared_and_hold_no_paths_counts_or_hashes(study, sample):
    from simulations.study.results import declared

    output = study["output"]
    assert set(os.listdir(output)) == EXPECTED_FILES
    for name in ("results.csv", "aggregate.csv"):
        with open(os.path.join(output, name)) as f:
            header = next(csv.reader(f))
        assert all(declared(c) for c in header), [c for c in header if not declared(c)]
    doc = json.load(open(os.path.join(output, "results.json")))
    assert set(doc) == {"study", "dataset", "source_id", "privacy_cost", "public_benchmark", "points", "rows",
                        "aggregate", "columns", "provenance", "not_covered"}
    for row in doc["rows"] + doc["aggregate"]:
        assert all(declared(k) for k in row), [k for k in row if not declared(k)]
    assert doc["columns"]["wall_seconds"]["status"].startswith("NOT covered")
    assert any("wall_seconds" in x for x in doc["not_covered"])
    with open(os.path.join(sample, "adult.data"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    for name in os.listdir(output):
        text = open(os.path.join(output, name), "rb").read().decode("latin-1")
        for secret in (sample, study["workdir"], os.path.dirname(output), digest, digest[:16]):
            assert secret not in text, (name, secret)
        if not name.endswith(".png"):  # embedded images are base64 noise where any digits occur by chance
            visible = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", text)
            assert not re.search(rf"(?<![\d.]){TRAIN_ROWS}(?![\d.])", visible), name   # the exact row count


def test_report_is_self_contained_and_renders_in_chromium(study, tmp_path):
    page = os.path.join(study["output"], "report.html")
    text = open(page).read()
    assert text.count("data:image/png;base64,") == 2
    assert not re.search(r"""(src|href)=['"]?(https?:|file:|//)""", text)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (make setup installs Debian's chromium as root)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = str(tmp_path / "shot.png")
    subprocess.run(flags + ["--window-size=1100,2400", f"--screenshot={shot}", "file://" + page],
                   capture_output=True, timeout=120, check=False)
    assert os.path.isfile(shot), "chromium wrote no screenshot"
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert (pixels < 0.95).any(axis=-1).mean() > 0.02 and pixels.std() > 0.05
    dom = subprocess.run(flags + ["--dump-dom", "file://" + page], capture_output=True, text=True, timeout=120)
    seen = html_lib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom.stdout)))
    for fact in ("Privacy–utility study", "Privacy cost of the study", SOURCE, "dp_sgd/eps=1/rep=0",
                 "mean and 95% interval", "What each column is", "NOT covered", "simulations.Study", "tensorflow"):
        assert fact in seen, fact


# ------------------------------------------------------------------------------------------------
# Refusals: before anything runs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,field", [
    (["--epsilons", "-1,2"], "epsilons: epsilon '-1'"),
    (["--epsilons", ""], "epsilons: the list is empty"),
    (["--trainers", "dp_sgd,sgd_magic"], "trainers: unknown trainer 'sgd_magic'"),
    (["--trainers", ""], "trainers: the list is empty"),
    (["--seeds", "0"], "seeds:"),
    (["--set", "seed=3"], "seed: a study does not take random seeds"),
    (["--set", "dp_sgd.l2_norm_clipp=1"], "has no setting 'l2_norm_clipp'"),
])
def test_bad_grid_is_refused_naming_the_field(sample, tmp_path, extra, field):
    from simulations.study.spec import StudyError, from_options

    argv = ["--trainers", "dp_sgd", "--epsilons", "1", "--seeds", "1"] + extra
    opts = dict(zip(argv[0::2], argv[1::2]))
    with pytest.raises(StudyError, match=re.escape(field)):
        from_options(sample, str(tmp_path / "out"), trainers=opts["--trainers"], epsilons=opts["--epsilons"],
                     seeds=opts["--seeds"], settings=[v for k, v in zip(argv[0::2], argv[1::2]) if k == "--set"],
                     workdir=str(tmp_path / "work"))


def test_cli_refusals_are_one_line_and_run_nothing(sample, tmp_path):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('name = "x"\n[[arm]\ntrainer = "dp_sgd"\n')
    cases = [(["--data", sample, "--output", str(tmp_path / "o1"), "--epsilons", "-0.5"], "epsilons"),
             (["--config", str(bad_toml), "--output", str(tmp_path / "o2")], "malformed TOML"),
             # iid is a permutation partition (depends on n): the privacy layer refuses it for private runs
             (["--data", sample, "--output", str(tmp_path / "o3"), "--trainers", "federated", "--partitions", "iid",
               "--epsilons", "2"], "point federated/eps=2/iid/rep=0")]
    for extra, field in cases:
        r = run_cli("study", "--workdir", str(tmp_path / "w"), *extra, timeout=300)
        assert r.returncode == 2, (extra, r.stderr[-2000:])
        lines = [line for line in r.stderr.splitlines() if line.startswith("privtrain study:")]
        assert len(lines) == 1 and field in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not os.path.exists(tmp_path / "w") and not any(os.path.exists(tmp_path / o) for o in ("o1", "o2", "o3"))


def test_study_over_budget_is_refused_as_a_whole(sample, tmp_path, monkeypatch):
    """Each point fits the budget alone; their composition does not: refused before anything runs."""
    from dp_training.ledger import BudgetExceededError, Ledger
    from simulations.study.plan import plan_study
    from simulations.study.spec import from_options

    ledger = Ledger(str(tmp_path / "ledger.sqlite"))
    ledger.set_budget(SOURCE, 2.5, 1e-4, "pld", "add_or_remove_one")
    spec = from_options(sample, str(tmp_path / "out"), trainers="dp_sgd", epsilons="2", seeds=2,
                        workdir=str(tmp_path / "work"), delta=1e-4)
    with pytest.raises(BudgetExceededError, match="budget"):
        plan_study(spec, spec.points(), ledger=ledger)
    one = from_options(sample, str(tmp_path / "out"), trainers="dp_sgd", epsilons="2", seeds=1,
                       workdir=str(tmp_path / "work"), delta=1e-4)
    plan = plan_study(one, one.points(), ledger=ledger)   # fits: stated, nothing run
    assert 1.9 < plan.combined.epsilon <= 2.0 and re.search(r"epsilon = (2|1\.99\d*),", plan.statement())
    assert not ledger.entries(SOURCE)[1:] and not os.path.exists(tmp_path / "work")
    # private and non-private points on a budgeted source: the first non-private run would make every later private
    # run refused, so the study is refused before anything runs, also with --allow-non-private
    from dp_training.ledger import NonPrivateTrainingRefused

    mixed = from_options(sample, str(tmp_path / "out"), trainers="dp_sgd,standard", epsilons="0.5", seeds=1,
                         workdir=str(tmp_path / "work"), delta=1e-4, allow_non_private=True)
    with pytest.raises(NonPrivateTrainingRefused, match="Run the non-private runs separately"):
        plan_study(mixed, mixed.points(), ledger=ledger)
    assert not ledger.entries(SOURCE)[1:]


def test_published_total_composes_every_ledger_attempt(sample, tmp_path):
    """A point charged, failed, and run again (--resume): the published total composes both attempts from the
    ledger, not the grid's points once; entries of other labels do not count."""
    import dp_training.events as ev
    from dp_training import accountants
    from dp_training.ledger import Ledger
    from simulations.study.plan import ledger_statement, plan_study
    from simulations.study.spec import from_options

    ledger = Ledger(str(tmp_path / "ledger.sqlite"))
    spec = from_options(sample, str(tmp_path / "out"), trainers="dp_sgd", epsilons="1", seeds=1,
                        workdir=str(tmp_path / "work"), delta=1e-4)
    plan = plan_study(spec, spec.points(), ledger=ledger)
    point = spec.points()[0]
    run_plan = plan.plans[point.id]
    kw = dict(trainer="dp_sgd", private=True, accountant="pld", relation=run_plan.source.relation, delta=1e-4)
    for label, status in ((f"study study: {point.id}", "failed"), (f"study study: {point.id}", "completed"),
                          ("another run", "completed")):
        r = ledger.reserve(SOURCE, run_plan.event, label=label, **kw)
        ledger.finish(r, run_plan.event, status)
    text = ledger_statement(plan, ledger)
    twice = accountants.epsilon(ev.compose(run_plan.event, run_plan.event), 1e-4, "pld", run_plan.source.relation)
    assert "2 entr(y/ies) labelled 'study study:'" in text and "1 of them failed" in text, text
    assert f"epsilon = {twice:.4g}," in text and twice > plan.combined.epsilon * 1.2
    assert f"planned at epsilon = {plan.combined.epsilon:.4g}" in text


def test_stopped_worker_handles_sigterm_like_ctrl_c():
    """--jobs: the parent stops workers with SIGTERM; a worker turns it into KeyboardInterrupt, so the running
    Trainer closes its ledger entry with what it released (dp_training.protocol)."""
    code = ("import sys, time\nfrom simulations.study.runner import _worker_init\n_worker_init()\n"
            "try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
            "except KeyboardInterrupt:\n    print('closed like Ctrl-C', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=PROJECT_ROOT))
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "closed like Ctrl-C" in out


def test_coverage_of_round_accuracy_simulation_rows_and_replicates():
    """round_accuracy follows the eval split's coverage like the other accuracy columns (declaration, not_covered,
    rounds plot); a noise-cohort simulation row is labelled and shows the noise it used; the replicate
    declaration says non-private replicates repeat."""
    import math
    import types

    from simulations.study import results as res
    from simulations.study.plots import rounds_ylabel

    assert res.declarations(True)["round_accuracy"]["status"].startswith("covered")
    assert res.declarations(False)["round_accuracy"]["status"].startswith("NOT covered")
    assert any("round_accuracy" in x for x in res.not_covered(False))
    assert not any("round_accuracy" in x for x in res.not_covered(True))
    assert "NOT covered" in rounds_ylabel(False) and "NOT" not in rounds_ylabel(True)
    assert "repeat" in res.COLUMNS["replicate"][1] and "non-private" in res.COLUMNS["replicate"][1]

    label = "simulation setting: noise calibrated for a cohort of 1000, 5 simulated"
    sim = types.SimpleNamespace(
        private=True, epsilon=40.0, delta=1e-4, accountant="pld", relation="add_or_remove_one", audit=None,
        parameters={"noise_multiplier": 1.1, "simulated_noise_multiplier": 0.0055, "simulation_setting": label,
                    "dp_clip": 0.1, "rounds": 3},
        simulation={"label": label, "deployment_epsilon": 2.0})
    cols = res.guarantee_columns(sim)
    assert cols["noise_multiplier"] == 0.0055 and cols["simulation_setting"].startswith(label)
    assert "does NOT cover" in cols["simulation_setting"] and "1.1" in cols["simulation_setting"]
    res.check_declared(cols)
    plain = types.SimpleNamespace(private=False, epsilon=math.inf, delta=1e-4, accountant="pld",
                                  relation="add_or_remove_one", audit=None, parameters={}, simulation=None)
    assert "simulation_setting" not in res.guarantee_columns(plain)


def test_published_command_and_errors_carry_no_paths():
    import argparse

    from simulations.study import cli
    from simulations.study.report import public_command
    from simulations.study.results import failed_row
    command = public_command(["privtrain", "--led", "/home/alice/l.sqlite", "study", "--dat", "/home/alice/secret/d",
                              "--outp=/home/alice/out", "--workdir=rel/work", "--set", "k=/home/alice/x",
                              "--epsilons", "1,2"])
    assert "alice" not in command and "rel/" not in command
    assert command == "privtrain --led l.sqlite study --dat d --outp=out --workdir=work --set k=x --epsilons 1,2"
    parser = argparse.ArgumentParser(prog="privtrain")
    cli.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):   # the study's flags cannot be abbreviated
        parser.parse_args(["study", "--dat", "/home/alice/secret/d"])
    row = failed_row(types_point(), "OSError: [Errno 2] No such file or directory: '/home/alice/secret/d/x.csv'\n"
                                    "second line /home/alice", 1.0)
    assert row["error"] == "OSError: [Errno 2] No such file or directory: 'x.csv'"


def types_point():
    import types

    arm = types.SimpleNamespace(name="dp_sgd", trainer="dp_sgd")
    return types.SimpleNamespace(id="dp_sgd/eps=1/rep=0", arm=arm, partition=None, replicate=0, target_epsilon=1.0)


@pytest.mark.slow
def test_federated_study_per_partition_round_curves(sample, tmp_path):
    """Federated arms: one point per partition; each row carries the accuracy after every round on the public
    eval split, plotted per partition."""
    from simulations import Study

    out = str(tmp_path / "out")
    result = Study(data=sample, output=out, workdir=str(tmp_path / "work"), trainers="federated", epsilons=[4],
                   seeds=1, partitions="hash,hash-dirichlet:0.1",
                   settings={"clients": 10, "clients_per_round": 5, "rounds": 2, "min_auc": 0}).run(
        progress=io.StringIO())
    table = result.table
    assert list(table["partition"]) == ["hash", "hash-dirichlet:0.1"] and set(table["status"]) == {"ok"}
    assert all(len(r) == 2 and r[-1][0] == 2 for r in table["round_accuracy"])
    assert all(float(e) <= 4.0 + 1e-6 for e in table["epsilon"])
    assert os.path.isfile(os.path.join(out, "federated_rounds.png"))


@pytest.mark.slow
def test_jobs_two_workers_share_the_cached_upstream(sample, tmp_path):
    """--jobs 2: the first point fills the cache; the others run in two worker processes, each on its own copy of
    the ML Metadata store, reusing the upstream components (no ExampleGen/Transform re-run)."""
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    r = run_cli("study", "--data", sample, "--output", out, "--workdir", work, "--trainers", "dp_sgd",
                "--epsilons", "1", "--seeds", "3", "--set", "epochs=1", "--jobs", "2", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 3 and {x["status"] for x in rows} == {"ok"}
    assert sorted(os.listdir(os.path.join(work, "jobs"))) == ["job-0", "job-1"]
    for point in ("dp_sgd_eps=1_rep=1", "dp_sgd_eps=1_rep=2"):
        log = open(os.path.join(work, "logs", point + ".log")).read()
        assert log.count("cached result reused") >= 5 and "Trainer finished" in log


def test_study_accepts_simulation_config_names(tmp_path):
    """``Study(data_dir=..., output_dir=...)`` is ``Study(data=..., output=...)`` (SimulationConfig's names)."""
    from simulations import Study
    from simulations.study.spec import StudyError

    out = str(tmp_path / "out")
    adult = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data", "adult")
    a = Study(data=adult, output=out, trainers="dp_sgd", epsilons=[1], seeds=1).spec
    b = Study(data_dir=adult, output_dir=out, trainers="dp_sgd", epsilons=[1], seeds=1).spec
    assert a == b and b.output == out and b.data.endswith("adult")
    with pytest.raises(StudyError, match="data= or data_dir="):
        Study(data=adult, data_dir="elsewhere", output=out)
