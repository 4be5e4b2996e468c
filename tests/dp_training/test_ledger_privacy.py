"""What the ledger publishes and keeps: receipts that reveal nothing (per-entry nonces), format 1 ledgers read
and upgraded, and the keyed training-content fingerprint that refuses a copy under a new source id."""
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import sqlite3

import dp_accounting
import pytest

from dp_training import events as ev
from dp_training.ledger import store as ledger_store
from core.dataset import load_dataset
from dp_training.fingerprint import content_digest
from dp_training.ledger import (BudgetRequest, KnownContentError, Ledger, LedgerTamperedError)
from tests.conftest import make_adult_sample

SRC = "census-2026"
GENESIS = "0" * 64


def dpsgd(steps=300, sigma=1.1, q=0.01):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def _canon(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _iso(t):
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


T_START = 1_796_000_000           # the Trainer's reservation (private: when the run started)
DURATION = 4321                   # private: grows with the number of rows


def _first_run(path, monkeypatch):
    """The first run on a source, as the Trainer records it: budget + reservation at T_START, finish at the end.
    Returns what privacy.json publishes about it (the guarantee's fields, its receipt)."""
    clock = {"now": _iso(T_START)}
    monkeypatch.setattr(ledger_store, "now", lambda: clock["now"])
    led = Ledger(path)
    event = dpsgd()
    r = led.reserve(SRC, event, trainer="dp_sgd", private=True, accountant="pld", relation=ev.ADD_OR_REMOVE_ONE,
                    delta=1e-5, budget=BudgetRequest(8.0, 1e-5, "pld"))
    clock["now"] = _iso(T_START + DURATION)
    receipt = led.finish(r, event, "completed")
    return {"source_id": SRC, "trainer": "dp_sgd", "accountant": "pld", "neighbouring_relation": ev.ADD_OR_REMOVE_ONE,
            "delta": 1e-5, "event": ev.to_json(event),
            "ledger": {"seq": receipt.seq, "head_hash": receipt.head_hash, "run_id": r.run_id,
                       "budget_epsilon": 8.0, "spent_at_delta": 1e-5}}


def brute_force_duration(published, end_estimate, max_duration=7200):
    """The attacker of issue 17.3: rebuilds the documented payloads from privacy.json's public fields and tries
    every start and end second (the end is known to a few seconds: the published file's mtime). Returns the
    training duration when a guess reproduces the published head hash, else None."""
    led = published["ledger"]
    common = {"accountant": published["accountant"], "relation": published["neighbouring_relation"],
              "source_id": published["source_id"]}
    budget = dict(common, kind="budget", seq=1, epsilon=led["budget_epsilon"], delta=led["spent_at_delta"],
                  replaces=None, created_by_run=led["run_id"], time="@T@")
    reserve = dict(common, kind="reserve", seq=2, event=published["event"], trainer=published["trainer"],
                   private=True, delta=published["delta"], run_id=led["run_id"], label=None, time="@T@")
    finish = {"kind": "finish", "seq": 3, "source_id": published["source_id"], "reservation": 2,
              "run_id": led["run_id"], "event": published["event"], "status": "completed", "time": "@T@"}
    b_text, r_text, f_text = _canon(budget), _canon(reserve), _canon(finish)
    ends = range(end_estimate - 2, end_estimate + 3)
    for t0 in range(end_estimate + 2, end_estimate - 2 - max_duration, -1):
        s0 = _iso(t0)
        h2 = _sha(_sha(GENESIS + b_text.replace("@T@", s0)) + r_text.replace("@T@", s0))
        for t1 in ends:
            if t1 >= t0 and _sha(h2 + f_text.replace("@T@", _iso(t1))) == led["head_hash"]:
                return t1 - t0
    return None


def test_the_published_receipt_reveals_no_run_times(tmp_path, monkeypatch):
    path = str(tmp_path / "ledger.sqlite")
    published = _first_run(path, monkeypatch)
    # issue 17.3's attack: on nonce-less payloads the head hash gives the training duration away
    assert brute_force_duration(published, T_START + DURATION + 1) is None
    entries = Ledger(path).entries()
    nonces = [e.payload["nonce"] for e in entries]
    assert all(len(n) == 32 and int(n, 16) >= 0 for n in nonces) and len(set(nonces)) == len(nonces)
    assert not any(n in json.dumps(published) for n in nonces)
    # control: the same search succeeds on the same chain without its nonces (the format 1 payloads), so the
    # nonce is what stops it
    prev, head = GENESIS, None
    for e in entries:
        head = _sha(prev + _canon({k: v for k, v in e.payload.items() if k != "nonce"}))
        prev = head
    old = dict(published, ledger=dict(published["ledger"], head_hash=head))
    assert brute_force_duration(old, T_START + DURATION + 1) == DURATION


def _format1_ledger(path):
    """A ledger written by privtrain before nonces (format version 1): two entries, no nonce, no content key."""
    con = sqlite3.connect(path, isolation_level=None)
    con.executescript(ledger_store.SCHEMA)
    prev, rows = GENESIS, []
    for seq, kind, fields in ((1, "budget", {"epsilon": 4.0, "delta": 1e-5, "accountant": "pld",
                                             "relation": ev.ADD_OR_REMOVE_ONE, "replaces": None,
                                             "time": "2026-01-01T00:00:00+00:00"}),
                              (2, "reserve", {"event": ev.to_json(dpsgd()), "trainer": "dp_sgd", "private": True,
                                              "accountant": "pld", "relation": ev.ADD_OR_REMOVE_ONE, "delta": 1e-5,
                                              "run_id": "abc", "label": None,
                                              "time": "2026-01-01T00:00:00+00:00"})):
        text = _canon(dict(fields, seq=seq, source_id=SRC, kind=kind))
        digest = _sha(prev + text)
        rows.append((seq, SRC, kind, text, prev, digest))
        prev = digest
    con.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?)", rows)
    con.executemany("INSERT INTO meta VALUES (?,?)", [("format", "privtrain-ledger"), ("version", "1"),
                                                      ("head_seq", "2"), ("head_hash", prev)])
    con.close()
    os.chmod(path, 0o600)
    return prev


def _meta(path):
    con = sqlite3.connect(path)
    try:
        return dict(con.execute("SELECT key, value FROM meta"))
    finally:
        con.close()


def test_a_format1_ledger_verifies_as_before_and_new_entries_carry_nonces(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    old_head = _format1_ledger(path)
    led = Ledger(path)
    assert led.verify([(2, old_head)]).head_hash == old_head       # old receipts still verify
    receipt = led.finish(2, dpsgd(), "completed")
    meta = _meta(path)
    assert meta["version"] == "2" and meta["nonces_from"] == "3" and len(meta["content_key"]) == 64
    assert "nonce" not in led.entries()[1].payload and len(led.entries()[2].payload["nonce"]) == 32
    assert led.verify([(2, old_head), (3, receipt.head_hash)]).entries == 3
    # an entry from the upgrade on without its nonce (re-hashed consistently) is refused
    con = sqlite3.connect(path, isolation_level=None)
    row = con.execute("SELECT payload, prev_hash FROM entries WHERE seq = 3").fetchone()
    payload = json.loads(row[0])
    del payload["nonce"]
    text = _canon(payload)
    digest = _sha(row[1] + text)
    con.executescript("DROP TRIGGER entries_no_update;")
    con.execute("UPDATE entries SET payload = ?, hash = ? WHERE seq = 3", (text, digest))
    con.execute("UPDATE meta SET value = ? WHERE key = 'head_hash'", (digest,))
    con.executescript("CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries BEGIN SELECT "
                      "RAISE(ABORT, 'privtrain ledger entries are append-only'); END;")
    con.close()
    with pytest.raises(LedgerTamperedError, match="entry 3 carries no nonce"):
        Ledger(path).verify()


# -- 17.9: the same training content under another source id ------------------------------------------------
@pytest.fixture
def sample_and_copy(tmp_path):
    """A small data set and a copy of it under another source id, its rows shuffled and re-spaced."""
    a = make_adult_sample(str(tmp_path / "a"), 120, 40, source_id="census-a")
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    with open(os.path.join(b, "dataset.json")) as f:
        description = json.load(f)
    description["privacy"]["source_id"] = "census-copy"
    with open(os.path.join(b, "dataset.json"), "w") as f:
        json.dump(description, f)
    with open(os.path.join(a, "adult.data")) as f:
        lines = [line for line in f if line.strip()]
    random.Random(1).shuffle(lines)
    with open(os.path.join(b, "adult.data"), "w", newline="") as f:
        f.writelines(line.replace(", ", ",").replace("\n", "\r\n") for line in lines)
    return load_dataset(a), load_dataset(b)


def _reserve(led, source, digest, **kw):
    return led.reserve(source, dpsgd(steps=10), trainer="dp_sgd", private=True, accountant="pld",
                       relation=ev.ADD_OR_REMOVE_ONE, delta=1e-5, content_digest=digest, **kw)


def test_a_copy_under_a_new_source_id_is_refused_unless_a_reason_is_stated(tmp_path, sample_and_copy):
    spec_a, spec_b = sample_and_copy
    digest_a, digest_b = content_digest(spec_a), content_digest(spec_b)
    assert digest_a == digest_b                       # row order, spacing and line endings do not matter
    led = Ledger(str(tmp_path / "ledger.sqlite"))
    _reserve(led, "census-a", digest_a)
    _reserve(led, "census-a", digest_a)               # the same source again: charged to its own budget
    with pytest.raises(KnownContentError) as refused:
        _reserve(led, "census-copy", digest_b)
    message = str(refused.value)
    assert "\n" not in message and "'census-a'" in message and '--new-source "REASON"' in message
    assert [e.source_id for e in led.entries()] == ["census-a", "census-a"]     # nothing appended
    with pytest.raises(KnownContentError):
        led.check("census-copy", dpsgd(steps=10), trainer="dp_sgd", private=True, accountant="pld",
                  relation=ev.ADD_OR_REMOVE_ONE, delta=1e-5, content_digest=digest_b)
    r = _reserve(led, "census-copy", digest_b, new_source="a licensed re-collection, not the 2026 census rows")
    assert led.entries()[-1].payload["new_source"].startswith("a licensed re-collection")
    assert led.history("census-copy")[0]["runs"][0]["new_source"].startswith("a licensed")
    assert r.seq == 3
    # one row more (a duplicate): other content (a multiset), no refusal; near-copies are out of scope
    with open(os.path.join(spec_b.directory, "adult.data")) as f:
        first = f.readline()
    with open(os.path.join(spec_b.directory, "adult.data"), "a") as f:
        f.write(first)
    assert content_digest(load_dataset(spec_b.directory)) != digest_a


def test_the_ledger_keeps_only_a_keyed_fingerprint(tmp_path, sample_and_copy):
    spec_a, _ = sample_and_copy
    digest = content_digest(spec_a)
    paths = [str(tmp_path / "one.sqlite"), str(tmp_path / "two.sqlite")]
    stored = []
    for path in paths:
        _reserve(Ledger(path), "census-a", digest)
        stored.append(Ledger(path).entries()[-1].payload["content"])
        with open(path, "rb") as f:
            raw = f.read()
        assert digest not in raw and digest.hex().encode() not in raw     # never the unkeyed digest
    assert stored[0] != stored[1]                    # keyed per ledger: not comparable across ledgers


def test_privtrain_run_on_a_copy_is_refused_before_anything_runs(tmp_path, monkeypatch, sample_and_copy):
    from pipeline.config import RunConfig
    from pipeline.runner import preflight
    from tests.conftest import run_cli

    spec_a, spec_b = sample_and_copy
    path = str(tmp_path / "ledger.sqlite")
    monkeypatch.setenv("PRIVTRAIN_LEDGER", path)
    _reserve(Ledger(path), "census-a", content_digest(spec_a))     # the original's run, as the Trainer reserves it
    workdir = str(tmp_path / "w")
    result = run_cli("run", "--data", spec_b.directory, "--workdir", workdir, "--trainer", "standard",
                     "--allow-non-private", timeout=600)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("privtrain: this run's training data was already charged under source 'census-a'")
    assert '--new-source "REASON"' in line
    assert not os.path.exists(os.path.join(workdir, "pipeline_root")) and len(Ledger(path).entries()) == 1
    # with a stated reason the pre-flight accepts it (the Trainer's reservation records the reason)
    preflight(RunConfig(data_dir=spec_b.directory, workdir=workdir, trainer="standard", allow_non_private=True,
                        privacy={"new_source": "a separately licensed collection"}), spec_b)
