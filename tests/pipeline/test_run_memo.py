"""pipeline/run_memo.py: when an identical re-run may answer from the last run's record, and when it may not."""
from __future__ import annotations

import os
import sqlite3
import stat

from pipeline import run_memo
from tests.conftest import make_adult_sample


def _store(path, executions):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE IF NOT EXISTS Execution (id INTEGER PRIMARY KEY)")
    con.executemany("INSERT INTO Execution (id) VALUES (?)", [(i,) for i in executions])
    con.commit()
    con.close()


def _setup(tmp_path):
    from core.dataset import load_dataset

    data = make_adult_sample(str(tmp_path / "data"), train_rows=50, eval_rows=20)
    workdir = tmp_path / "work"
    (workdir / "serving" / "adult" / "1").mkdir(parents=True)
    meta = str(workdir / "metadata.sqlite")
    _store(meta, [1, 2, 3])
    args = {"data": data, "workdir": str(workdir), "trainer": "standard", "epochs": None, "json": False}
    return load_dataset(data), str(workdir), meta, args


def test_identical_inputs_replay_the_record(tmp_path):
    spec, workdir, meta, args = _setup(tmp_path)
    digest = run_memo.fingerprint(args, spec)
    summary = {"pushed_path": os.path.join(workdir, "serving", "adult", "1"), "blessed": True}
    run_memo.record(workdir, meta, digest, summary, "text")
    doc = run_memo.identical_run(workdir, meta, run_memo.fingerprint(dict(args, json=True), spec))
    assert doc is not None and doc["summary"] == summary and doc["text"] == "text"
    assert stat.S_IMODE(os.stat(os.path.join(workdir, run_memo.RECORD)).st_mode) == 0o600


def test_any_change_runs_for_real(tmp_path):
    spec, workdir, meta, args = _setup(tmp_path)
    digest = run_memo.fingerprint(args, spec)
    pushed = os.path.join(workdir, "serving", "adult", "1")
    run_memo.record(workdir, meta, digest, {"pushed_path": pushed}, "text")
    # another argument
    assert run_memo.fingerprint(dict(args, epochs=3.0), spec) != digest
    # the data's content (same size, one byte changed)
    train = spec.split_files("train")[0]
    with open(train, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(b"4" if first != b"4" else b"5")
    assert run_memo.fingerprint(args, spec) != digest
    # the ledger's location from the environment
    os.environ["PRIVTRAIN_LEDGER"], old = "/elsewhere.sqlite", os.environ.get("PRIVTRAIN_LEDGER")
    try:
        assert run_memo.identical_run(workdir, meta, run_memo.fingerprint(args, spec)) is None
    finally:
        os.environ["PRIVTRAIN_LEDGER"] = old if old is not None else ""
        if old is None:
            del os.environ["PRIVTRAIN_LEDGER"]


def test_a_run_since_or_a_removed_push_runs_for_real(tmp_path):
    spec, workdir, meta, args = _setup(tmp_path)
    digest = run_memo.fingerprint(args, spec)
    pushed = os.path.join(workdir, "serving", "adult", "1")
    run_memo.record(workdir, meta, digest, {"pushed_path": pushed}, "text")
    assert run_memo.identical_run(workdir, meta, digest) is not None
    _store(meta, [4])   # another run wrote to the store: the baseline may have changed
    assert run_memo.identical_run(workdir, meta, digest) is None
    run_memo.record(workdir, meta, digest, {"pushed_path": pushed}, "text")
    os.rmdir(pushed)
    assert run_memo.identical_run(workdir, meta, digest) is None
    run_memo.forget(workdir)
    assert not os.path.exists(os.path.join(workdir, run_memo.RECORD))
