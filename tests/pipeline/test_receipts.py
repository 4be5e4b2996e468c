"""Issue 17.6: the receipts a workdir records (ML Metadata, privacy.json files) anchor the ledger. A ledger forged
with sqlite3 alone (triggers dropped, a run's entries deleted, the chain re-hashed, triggers restored) passes a
plain `budget verify`, but `budget verify --workdir`, a run's pre-flight and the Trainer's reservation refuse it."""
import hashlib
import json
import os
import shutil
import sqlite3
import types

import pytest

from dp_training.contract import TrainingOutcome
from core.dataset import load_dataset
from core.features import numeric_key
from core.pushed import PushedVersion
from dp_training.fingerprint import content_digest
from dp_training.ledger import BudgetExceededError, Ledger, LedgerTamperedError
from dp_training.protocol import RunProtocol, plan_run
from pipeline.trainers import get_trainer
from tests.conftest import make_adult_sample, run_cli

SOURCE = "adult-sample-receipts"


def _plan(spec, privacy):
    return plan_run(spec, "dp_sgd", get_trainer("dp_sgd"), {}, privacy,
                    [numeric_key(c) for c in spec.numeric_features])


def _record_run(spec, workdir, privacy):
    """One Trainer run, recorded the way the executor records it: reserve -> finish -> privacy.json beside the
    SavedModel (write_run_files), its pushed copy, and the Model artifact's ML Metadata properties."""
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2
    from tfx.types import standard_artifacts

    from pipeline.trainer_executor import _set_property, guarantee_properties, write_run_files

    plan = _plan(spec, privacy)
    protocol = RunProtocol(plan, content_digest=content_digest(spec))
    protocol.reserve()
    outcome = TrainingOutcome(model=None, released_event=plan.training.event)
    guarantee = protocol.finish(outcome)
    run = os.path.join(workdir, "pipeline_root", "Trainer")
    fn_args = types.SimpleNamespace(serving_model_dir=os.path.join(run, "model", "7", "Format-Serving"),
                                    model_run_dir=os.path.join(run, "model_run", "7"))
    for d in (fn_args.serving_model_dir, fn_args.model_run_dir):
        os.makedirs(d)
    write_run_files(fn_args, "dp_sgd", guarantee, outcome)
    pushed = os.path.join(workdir, "serving", "adult", "1700000000")
    os.makedirs(pushed)
    shutil.copy(PushedVersion(fn_args.serving_model_dir).privacy_path, pushed)
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = os.path.join(workdir, "metadata.sqlite")
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    store = metadata_store.MetadataStore(config)
    model = standard_artifacts.Model()
    model.uri = os.path.join(run, "model", "7")
    for key, value in guarantee_properties(guarantee).items():
        _set_property(model, key, value)
    model.type_id = store.put_artifact_type(model.artifact_type)
    store.put_artifacts([model.mlmd_artifact])
    del store
    return guarantee, fn_args


def forge_without_entries(path, doomed):
    """Issue 17.6's forgery with sqlite3 only: drop the triggers, delete entries, re-hash the rest of the chain
    (renumbered, as privtrain would have written it) and the head, restore the triggers."""
    con = sqlite3.connect(path, isolation_level=None)
    triggers = con.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    con.execute("BEGIN")
    con.execute("DROP TRIGGER entries_no_update")
    con.execute("DROP TRIGGER entries_no_delete")
    rows = con.execute("SELECT seq, source_id, kind, payload FROM entries ORDER BY seq").fetchall()
    con.execute("DELETE FROM entries")
    prev, seq = "0" * 64, 0
    for old_seq, source_id, kind, payload in rows:
        if old_seq in doomed:
            continue
        seq += 1
        p = json.loads(payload)
        p["seq"] = seq
        text = json.dumps(p, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        digest = hashlib.sha256((prev + text).encode()).hexdigest()
        con.execute("INSERT INTO entries VALUES (?,?,?,?,?,?)", (seq, source_id, kind, text, prev, digest))
        prev = digest
    con.execute("UPDATE meta SET value = ? WHERE key = 'head_seq'", (str(seq),))
    con.execute("UPDATE meta SET value = ? WHERE key = 'head_hash'", (prev,))
    for (sql,) in triggers:
        con.execute(sql)
    con.execute("COMMIT")
    con.close()


@pytest.fixture
def forged(tmp_path, monkeypatch):
    """A workdir holding one run's receipts (0.8 of a budget of 1.0 spent), then its ledger forged to forget the run."""
    ledger_path = str(tmp_path / "ledger.sqlite")
    monkeypatch.setenv("PRIVTRAIN_LEDGER", ledger_path)
    data = make_adult_sample(str(tmp_path / "data"), 500, 100, source_id=SOURCE,
                             privacy={"public_row_estimate": 500})
    spec = load_dataset(data)
    workdir = str(tmp_path / "work")
    guarantee, fn_args = _record_run(spec, workdir, {"target_epsilon": 0.8, "budget_epsilon": 1.0})
    os.chmod(workdir, 0o700)   # as privtrain creates workdirs (an open one is refused before the ledger is read)
    led = Ledger(ledger_path)
    assert guarantee.ledger["seq"] == 3      # 1: the budget the run created, 2: its reservation, 3: its finish
    intact = run_cli("budget", "verify", "--workdir", workdir)
    assert intact.returncode == 0 and "1 receipt(s) checked" in intact.stdout, intact.stderr
    # the intact ledger refuses a second 0.8 run on the budget of 1.0
    with pytest.raises(BudgetExceededError):
        RunProtocol(_plan(spec, {"target_epsilon": 0.8})).check()
    forge_without_entries(ledger_path, doomed={2, 3})
    assert led.verify().entries == 1          # the forgery is consistent: a plain verify passes
    return spec, data, workdir, ledger_path, fn_args


def test_budget_verify_checks_the_workdirs_receipts(forged, tmp_path):
    _, _, workdir, _, _ = forged
    plain = run_cli("budget", "verify")
    assert plain.returncode == 0, plain.stderr       # without the workdir, nothing contradicts the forgery
    other = str(tmp_path / "empty-workdir")
    os.makedirs(other)
    result = run_cli("budget", "verify", "--workdir", other, "--workdir", workdir)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "\n" not in line and "entry 3" in line and "is missing" in line, line
    assert "privacy.json" in line or "metadata.sqlite" in line, line
    assert "edited outside privtrain" in line


def test_a_later_run_in_the_workdir_refuses_the_forged_ledger(forged, tmp_path):
    from pipeline.config import RunConfig
    from pipeline.runner import preflight

    spec, data, workdir, _, fn_args = forged
    # what the forgery buys without the anchors: a second 0.8 run fits the "remaining" budget of 1.0
    RunProtocol(_plan(spec, {"target_epsilon": 0.8})).check()
    config = RunConfig(data_dir=data, workdir=workdir, trainer="dp_sgd", privacy={"target_epsilon": 0.8})
    with pytest.raises(LedgerTamperedError, match="entry 3, whose receipt is recorded in .*is missing"):
        preflight(config, spec)
    # the Trainer's reservation collects the same receipts from its own workdir
    from pipeline.trainer_executor import privacy_with_receipts

    privacy = privacy_with_receipts({"target_epsilon": 0.8}, types.SimpleNamespace(
        model_run_dir=os.path.join(workdir, "pipeline_root", "Trainer", "model_run", "8")))
    assert {a[:2] for a in privacy["anchors"]} == {(3, PushedVersion(fn_args.serving_model_dir).privacy()[
        "ledger"]["head_hash"])}
    with pytest.raises(LedgerTamperedError, match="entry 3"):
        RunProtocol(_plan(spec, privacy)).reserve()
    # the command line: one line, nothing run
    result = run_cli("run", "--data", data, "--workdir", workdir, "--target-epsilon", "0.8", timeout=600)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("privtrain: entry 3, whose receipt is recorded in ") and "edited outside privtrain" in line
    assert len(Ledger(os.environ["PRIVTRAIN_LEDGER"]).entries()) == 1        # nothing was charged


def test_a_real_runs_receipts_are_found_and_verify(standard_run):
    """The session's pipeline run: its receipt is in ML Metadata, beside the Trainer's model and in the pushed
    version, all the same, and the ledger holds it."""
    from pipeline.receipts import collect_receipts

    workdir, summary, _ = standard_run
    found = collect_receipts(workdir)
    wheres = " ".join(r.where for r in found)
    assert "metadata.sqlite" in wheres and "Format-Serving" in wheres and summary["pushed_path"] in wheres, wheres
    published = {(r.seq, r.head_hash) for r in found if "receipts.jsonl" not in r.where}
    assert len(published) == 1
    # the Trainer's own record (private/receipts.jsonl): its reservation and its finish, the published one
    recorded = [(r.seq, r.head_hash) for r in found if "receipts.jsonl" in r.where]
    assert len(recorded) == 2 and recorded[1] in published and recorded[0][0] == recorded[1][0] - 1, recorded
    result = run_cli("budget", "verify", "--workdir", workdir)
    assert result.returncode == 0 and "2 receipt(s) checked" in result.stdout, result.stderr


def _truncate_tail(ledger_path, keep_seq):
    """Deletes every entry after ``keep_seq`` and moves the head back to it (plain sqlite3, no re-hashing)."""
    con = sqlite3.connect(ledger_path, isolation_level=None)
    head = con.execute("SELECT hash FROM entries WHERE seq = ?", (keep_seq,)).fetchone()[0]
    con.execute("DROP TRIGGER entries_no_delete")
    con.execute("DELETE FROM entries WHERE seq > ?", (keep_seq,))
    con.execute("UPDATE meta SET value=? WHERE key='head_seq'", (str(keep_seq),))
    con.execute("UPDATE meta SET value=? WHERE key='head_hash'", (head,))
    con.execute("CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, "
                "'privtrain ledger entries are append-only'); END;")
    con.close()


def test_a_failed_runs_tail_cannot_be_deleted_unnoticed(tmp_path, monkeypatch):
    """Review F6: a run that reserves, releases and then fails writes no privacy.json; the Trainer executor's
    ledger records its reserve and finish receipts in <workdir>/private/receipts.jsonl (0600), so deleting the
    ledger's tail after the newest guarantee is refused by `budget verify --workdir`."""
    import stat

    from pipeline.trainer_executor import workdir_ledger

    ledger_path = str(tmp_path / "ledger.sqlite")
    monkeypatch.setenv("PRIVTRAIN_LEDGER", ledger_path)
    data = make_adult_sample(str(tmp_path / "data"), 500, 100, source_id=SOURCE + "-tail",
                             privacy={"public_row_estimate": 500})
    spec = load_dataset(data)
    workdir = str(tmp_path / "work")
    run_dir = os.path.join(workdir, "pipeline_root", "Trainer", "model_run", "7")
    os.makedirs(run_dir)
    os.chmod(workdir, 0o700)
    fn_args = types.SimpleNamespace(model_run_dir=run_dir)
    completed = RunProtocol(_plan(spec, {"target_epsilon": 0.5}), ledger=workdir_ledger({}, fn_args))
    completed.reserve()
    plan = completed.plan
    completed.finish(TrainingOutcome(model=None, released_event=plan.training.event))
    kept = completed.receipt.seq
    failed = RunProtocol(_plan(spec, {"target_epsilon": 0.5}), ledger=workdir_ledger({}, fn_args))
    failed.reserve()
    failed.fail(plan.training.event, "failed")       # released, then failed: charged, no guarantee written
    recorded = os.path.join(workdir, "private", "receipts.jsonl")
    assert stat.S_IMODE(os.stat(recorded).st_mode) == 0o600
    assert run_cli("budget", "verify", "--workdir", workdir).returncode == 0
    _truncate_tail(ledger_path, kept)
    assert Ledger(ledger_path).verify().entries == kept      # a plain verify cannot tell
    result = run_cli("budget", "verify", "--workdir", workdir)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert f"entry {kept + 1}" in line and "receipts.jsonl" in line, line
