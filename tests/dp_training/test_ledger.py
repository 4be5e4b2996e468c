"""The shared, append-only, hash-chained privacy budget ledger (dp_training/ledger/) and `privtrain budget`."""
import hashlib
import json
import math
import multiprocessing
import os
import sqlite3
import stat

import dp_accounting
import pytest
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

from dp_training import events as ev
from dp_training.ledger import (BudgetConflictError, BudgetExceededError, BudgetRequest, Ledger, LedgerError,
                                LedgerTamperedError, NonPrivateTrainingRefused, NotALedgerError,
                                RelationMismatchError, ReservationError, format_budget, resolve_ledger_path)
from tests.conftest import run_cli

SRC = "test-source"
ADD = ev.ADD_OR_REMOVE_ONE
REPLACE = ev.REPLACE_ONE


def dpsgd(steps=500, sigma=1.0, q=0.01):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def rdp_eps(events, delta=1e-5, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    """Independent figure: dp_accounting's RdpAccountant fed the events one by one."""
    acc = dp_rdp.RdpAccountant(neighboring_relation=relation)
    for e in events:
        acc.compose(e)
    return acc.get_epsilon(delta)


def reserve(led, event=None, source=SRC, relation=ADD, accountant="rdp", budget=None, **kw):
    kw.setdefault("private", True)
    return led.reserve(source, event if event is not None else dpsgd(), trainer=kw.pop("trainer", "dp_sgd"),
                       accountant=accountant, relation=relation, delta=kw.pop("delta", 1e-5), budget=budget, **kw)


@pytest.fixture
def ledger_path(tmp_path, monkeypatch):
    path = str(tmp_path / "shared" / "ledger.sqlite")
    monkeypatch.setenv("PRIVTRAIN_LEDGER", path)
    return path


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def raw(path, sql, params=()):
    """A direct edit, as someone with sqlite3 and write access would make it."""
    con = sqlite3.connect(path)
    try:
        out = con.execute(sql, params).fetchall()
        con.commit()
        return out
    finally:
        con.close()


# --- location -----------------------------------------------------------------------------------------------
def test_location_precedence_and_private_permissions(tmp_path, monkeypatch):
    monkeypatch.delenv("PRIVTRAIN_LEDGER", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert resolve_ledger_path() == str(tmp_path / "home" / ".local" / "share" / "privtrain" / "ledger.sqlite")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_ledger_path() == str(tmp_path / "xdg" / "privtrain" / "ledger.sqlite")
    monkeypatch.setenv("PRIVTRAIN_LEDGER", str(tmp_path / "env.sqlite"))
    assert resolve_ledger_path() == str(tmp_path / "env.sqlite")
    assert resolve_ledger_path(str(tmp_path / "explicit.sqlite")) == str(tmp_path / "explicit.sqlite")

    monkeypatch.delenv("PRIVTRAIN_LEDGER")
    led = Ledger()
    assert not os.path.exists(led.path)  # reading never creates it
    assert led.verify().entries == 0
    reserve(led)
    assert stat.S_IMODE(os.stat(led.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "xdg" / "privtrain").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "xdg").st_mode) == 0o700


def test_the_test_session_never_uses_the_users_ledger():
    real = os.path.join(os.path.expanduser("~"), ".local", "share", "privtrain", "ledger.sqlite")
    assert resolve_ledger_path() != real
    assert "privtrain_ledger" in os.environ["PRIVTRAIN_LEDGER"]


# --- one budget per source, shared ------------------------------------------------------------------------
def test_two_workdirs_share_one_budget(ledger_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = Ledger(), Ledger()  # e.g. `privtrain run --workdir A` and `--workdir B`
    assert first.path == second.path == ledger_path
    r1 = reserve(first, dpsgd(1000), budget=BudgetRequest(3.0, 1e-5, "rdp"))
    first.finish(r1, dpsgd(1000), "completed")
    # The second workdir sees the budget and the spend, and passing the same budget is fine.
    assert second.get_budget(SRC).epsilon == 3.0
    assert second.spend(SRC).epsilon == pytest.approx(rdp_eps([dpsgd(1000)]))
    reserve(second, dpsgd(300, sigma=2.0), budget=BudgetRequest(3.0, 1e-5, "rdp"))
    with pytest.raises(BudgetExceededError):
        reserve(second, dpsgd(2000))
    spend = first.spend(SRC)
    assert spend.runs == 2 and spend.open_runs == 1
    assert spend.epsilon == pytest.approx(rdp_eps([dpsgd(1000), dpsgd(300, sigma=2.0)]))


def test_composition_equals_independent_dp_accounting(ledger_path):
    led = Ledger()
    led.set_budget(SRC, 10.0, 1e-5, "rdp", ADD)
    runs = [(dpsgd(500), dpsgd(500)), (dpsgd(400, 1.5, 0.02), dpsgd(250, 1.5, 0.02)),  # stopped early
            (dp_accounting.GaussianDpEvent(8.0), dp_accounting.GaussianDpEvent(8.0))]
    for planned, released in runs:
        led.finish(reserve(led, planned), released, "completed")
    open_run = dpsgd(200, 0.9)
    reserve(led, open_run)  # died: charged as planned
    spend = led.spend(SRC)
    charged = [released for _, released in runs] + [open_run]
    assert spend.epsilon == pytest.approx(rdp_eps(charged), rel=1e-9)
    singles = [rdp_eps([e]) for e in charged]
    assert spend.naive_epsilon_sum == pytest.approx(sum(singles))
    assert max(singles) < spend.epsilon < sum(singles)  # composition beats the naive sum
    assert spend.naive_delta_sum == pytest.approx(4e-5)
    assert spend.remaining == pytest.approx(10.0 - spend.epsilon)


def test_pld_composition_under_replace_one_matches_dp_accounting(ledger_path):
    led = Ledger()
    events = [dpsgd(300, 1.1, 0.02), dpsgd(100, 2.0, 0.05)]
    for e in events:
        led.finish(reserve(led, e, relation=REPLACE, accountant="pld",
                           budget=BudgetRequest(20.0, 1e-5, "pld")), e, "completed")
    acc = dp_pld.PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                               value_discretization_interval=1e-4)
    acc.compose(dp_accounting.ComposedDpEvent(events))
    spend = led.spend(SRC)
    assert spend.relation == REPLACE and spend.accountant == "pld"
    assert spend.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_refusal_names_spent_remaining_requested_and_fix_and_leaves_no_trace(ledger_path):
    led = Ledger()
    led.set_budget(SRC, 3.0, 1e-5, "rdp", ADD)
    led.finish(reserve(led, dpsgd(1000)), dpsgd(1000), "completed")
    spent = led.spend(SRC).epsilon
    assert spent < 3.0
    before = led.verify()
    with pytest.raises(BudgetExceededError) as err:
        reserve(led, dpsgd(3000))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"spent epsilon={spent:.4g}" in msg and f"remaining {3.0 - spent:.4g}" in msg
    assert f"requests epsilon={rdp_eps([dpsgd(3000)]):.4g}" in msg
    assert "Nothing was trained" in msg and "--target-epsilon" in msg and "--set-epsilon" in msg
    assert led.verify() == before  # nothing appended
    reserve(led, dpsgd(10, sigma=5.0))  # a run that fits still passes


def test_died_run_keeps_its_planned_spend(ledger_path):
    planned = dpsgd(1000)
    r = reserve(Ledger(), planned, budget=BudgetRequest(2.5, 1e-5, "rdp"))  # the process is killed here
    led = Ledger()  # a later process
    assert led.spend(SRC).epsilon == pytest.approx(rdp_eps([planned]))
    assert led.history(SRC)[0]["runs"][0]["status"] == "open"
    with pytest.raises(BudgetExceededError):
        reserve(led, dpsgd(1000))
    # Had it finished after 100 steps, it would be charged those only.
    led.finish(r, dpsgd(100), "failed")
    assert led.spend(SRC).epsilon == pytest.approx(rdp_eps([dpsgd(100)]))
    with pytest.raises(ReservationError):
        led.finish(r, dpsgd(10), "completed")  # a reservation is finished once
    with pytest.raises(ReservationError):
        led.finish(999, dpsgd(10), "completed")


# --- budgets: created in the reserve transaction, never raised implicitly ----------------------------------
def test_a_different_budget_is_a_conflict_and_raising_is_explicit(ledger_path):
    led = Ledger()
    reserve(led, dpsgd(100), budget=BudgetRequest(3.0, 1e-5, "rdp"))
    with pytest.raises(BudgetConflictError, match="privtrain budget --set-epsilon 8"):
        reserve(led, dpsgd(100), budget=BudgetRequest(8.0, 1e-5, "rdp"))
    with pytest.raises(BudgetConflictError):
        led.set_budget(SRC, 8.0, 1e-5, "rdp", ADD)
    assert led.get_budget(SRC).epsilon == 3.0
    receipt = led.set_budget(SRC, 8.0, 1e-5, "rdp", ADD, replace=True)
    assert led.get_budget(SRC).epsilon == 8.0
    assert [e.kind for e in led.entries(SRC)] == ["budget", "reserve", "budget"]
    assert led.entries(SRC)[-1].payload["replaces"] == 1
    led.verify(anchors=[receipt.anchor])
    assert led.set_budget(SRC, 8.0, 1e-5, "rdp", ADD) == receipt  # the same budget again appends nothing


def _create_budget(path, epsilon, barrier, results):
    os.environ["PRIVTRAIN_LEDGER"] = path
    led = Ledger()
    barrier.wait()
    try:
        reserve(led, dpsgd(10, sigma=5.0), budget=BudgetRequest(epsilon, 1e-5, "rdp"))
        results.put(("ok", epsilon))
    except BudgetConflictError:
        results.put(("conflict", epsilon))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        results.put(("error", repr(e)))


def _run_processes(target, args_list):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(args_list))
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for args in args_list]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return out


def test_concurrent_budget_creation_leaves_exactly_one_budget(ledger_path):
    epsilons = [1.0, 2.0, 4.0, 8.0]
    out = _run_processes(_create_budget, [(ledger_path, e) for e in epsilons])
    assert not [o for o in out if o[0] == "error"], out
    winners = [e for status, e in out if status == "ok"]
    led = Ledger()
    budgets = [e for e in led.entries(SRC) if e.kind == "budget"]
    assert len(budgets) == 1
    assert led.get_budget(SRC).epsilon in epsilons
    assert winners == [led.get_budget(SRC).epsilon]  # only runs that asked for the winning budget got in
    assert sum(1 for status, _ in out if status == "conflict") == len(epsilons) - 1
    assert os.listdir(os.path.dirname(ledger_path)) == ["ledger.sqlite"]  # the racing creators left no temp files


def _reserve_one(path, _, barrier, results):
    os.environ["PRIVTRAIN_LEDGER"] = path
    led = Ledger()
    barrier.wait()
    try:
        results.put(("ok", reserve(led, dpsgd(400)).seq))
    except BudgetExceededError:
        results.put(("refused", None))
    except Exception as e:  # noqa: BLE001
        results.put(("error", repr(e)))


def test_concurrent_reservations_never_exceed_the_budget(ledger_path):
    one = rdp_eps([dpsgd(400)])
    fits = max(k for k in range(1, 10) if rdp_eps([dpsgd(400)] * k) <= 2.0)
    assert 1 < fits < 5 and one < 2.0
    Ledger().set_budget(SRC, 2.0, 1e-5, "rdp", ADD)
    out = _run_processes(_reserve_one, [(ledger_path, i) for i in range(6)])
    assert not [o for o in out if o[0] == "error"], out
    assert sum(1 for status, _ in out if status == "ok") == fits
    spend = Ledger().spend(SRC)
    assert spend.epsilon <= 2.0 and spend.runs == fits
    Ledger().verify()


# --- relations and non-private runs -----------------------------------------------------------------------
def test_relation_is_fixed_by_the_first_entry(ledger_path):
    led = Ledger()
    reserve(led, relation=ADD)
    before = led.verify()
    with pytest.raises(RelationMismatchError, match="add_or_remove_one"):
        reserve(led, relation=REPLACE, accountant="pld")
    with pytest.raises(RelationMismatchError):
        led.set_budget(SRC, 5.0, 1e-5, "pld", REPLACE)
    assert led.verify() == before
    reserve(led, source="other-source", relation=REPLACE, accountant="pld")  # another source may differ
    assert led.relation("other-source") == REPLACE and led.relation(SRC) == ADD


def test_non_private_runs_are_always_recorded_with_infinite_spend(ledger_path):
    led = Ledger()
    r = reserve(led, dp_accounting.NonPrivateDpEvent(), private=False, trainer="standard")  # no budget
    led.finish(r, dp_accounting.NonPrivateDpEvent(), "completed")
    spend = led.spend(SRC)
    assert math.isinf(spend.epsilon) and spend.non_private_runs == 1
    (row,) = led.history(SRC)[0]["runs"]
    assert row["trainer"] == "standard" and row["private"] is False and row["epsilon"] == "inf"
    # "private" with zero noise is non-private too.
    reserve(led, dpsgd(10, sigma=0.0), source="s2", private=True)
    assert math.isinf(led.spend("s2").epsilon)
    assert led.entries("s2")[0].payload["event"] == {"type": "NonPrivateDpEvent"}


def test_non_private_on_a_budgeted_source_is_refused_unless_allowed(ledger_path):
    led = Ledger()
    led.set_budget(SRC, 5.0, 1e-5, "rdp", ADD)
    with pytest.raises(NonPrivateTrainingRefused, match="--allow-non-private"):
        reserve(led, dp_accounting.NonPrivateDpEvent(), private=False, trainer="standard")
    assert len(led.entries(SRC)) == 1
    reserve(led, dp_accounting.NonPrivateDpEvent(), private=False, trainer="standard", allow_non_private=True)
    assert math.isinf(led.spend(SRC).epsilon)
    with pytest.raises(BudgetExceededError, match="no DP guarantee left"):
        reserve(led, dpsgd(10, sigma=5.0))


# --- tamper evidence --------------------------------------------------------------------------------------
def _three_runs(led):
    led.set_budget(SRC, 3.0, 1e-5, "rdp", ADD)
    receipts = []
    for _ in range(2):
        r = reserve(led, dpsgd(1000))
        receipts.append(r.receipt)
        receipts.append(led.finish(r, dpsgd(1000), "completed"))
    return receipts


def test_entries_are_append_only_in_sqlite_too(ledger_path):
    led = Ledger()
    _three_runs(led)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw(ledger_path, "UPDATE entries SET payload = replace(payload, '\"count\":1000', '\"count\":0')")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw(ledger_path, "DELETE FROM entries WHERE seq = 5")
    led.verify()


def test_zeroing_steps_in_an_entry_is_caught_by_verify_and_the_next_reserve(ledger_path):
    led = Ledger()
    _three_runs(led)
    spent = led.spend(SRC).epsilon
    raw(ledger_path, "DROP TRIGGER entries_no_update")
    raw(ledger_path, "UPDATE entries SET payload = replace(payload, '\"count\":1000', '\"count\":0') WHERE seq = 3")
    raw(ledger_path, "CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries "
                     "BEGIN SELECT RAISE(ABORT, 'privtrain ledger entries are append-only'); END")
    with pytest.raises(LedgerTamperedError) as err:
        led.verify()
    assert "entry 3" in str(err.value) and ledger_path in str(err.value) and "outside privtrain" in str(err.value)
    size = os.path.getsize(ledger_path)
    with pytest.raises(LedgerTamperedError, match="entry 3"):
        reserve(led, dpsgd(10, sigma=5.0))  # would have fitted had the edit been believed
    with pytest.raises(LedgerTamperedError):
        led.spend(SRC)
    assert os.path.getsize(ledger_path) == size and spent > 0


def test_deleting_the_last_finish_is_caught(ledger_path):
    led = Ledger()
    _three_runs(led)
    raw(ledger_path, "DROP TRIGGER entries_no_delete")
    raw(ledger_path, "DELETE FROM entries WHERE seq = 5")
    with pytest.raises(LedgerTamperedError, match="entry 5 is missing"):
        led.verify()
    with pytest.raises(LedgerTamperedError):
        reserve(led, dpsgd(10, sigma=5.0))


@pytest.mark.parametrize("edit", [
    "UPDATE entries SET source_id = 'elsewhere' WHERE seq = 2",
    "DELETE FROM entries WHERE seq = 2",
    "UPDATE entries SET hash = prev_hash WHERE seq = 4",
    "DROP TRIGGER entries_no_delete",
])
def test_other_direct_edits_are_caught(ledger_path, edit):
    led = Ledger()
    _three_runs(led)
    if not edit.startswith("DROP"):
        raw(ledger_path, "DROP TRIGGER entries_no_update")
        raw(ledger_path, "DROP TRIGGER entries_no_delete")
    raw(ledger_path, edit)
    with pytest.raises(LedgerTamperedError):
        Ledger().verify()


def _forge(path, seq, old, new):
    """Rewrites entry `seq`'s payload and recomputes every later hash and the head: an intact-looking chain."""
    rows = raw(path, "SELECT seq, source_id, kind, payload, prev_hash, hash FROM entries ORDER BY seq")
    raw(path, "DROP TRIGGER entries_no_update")
    prev = rows[0][4]
    con = sqlite3.connect(path)
    for s, _, _, payload, _, _ in rows:
        if s == seq:
            assert old in payload
            payload = payload.replace(old, new)
        digest = hashlib.sha256((prev + payload).encode()).hexdigest()
        con.execute("UPDATE entries SET payload=?, prev_hash=?, hash=? WHERE seq=?", (payload, prev, digest, s))
        prev = digest
    con.execute("UPDATE meta SET value=? WHERE key='head_hash'", (prev,))
    con.execute("CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries "
                "BEGIN SELECT RAISE(ABORT, 'privtrain ledger entries are append-only'); END")
    con.commit()
    con.close()


def test_a_recomputed_forged_chain_is_caught_by_receipts_recorded_elsewhere(ledger_path):
    led = Ledger()
    receipts = _three_runs(led)
    honest = led.spend(SRC).epsilon
    _forge(ledger_path, 3, '"count":1000', '"count":1')
    forged = Ledger()
    forged.verify()  # internally consistent: without anchors this edit cannot be seen
    assert forged.spend(SRC).epsilon < honest - 0.3  # and it hides spend
    with pytest.raises(LedgerTamperedError, match="entry 3") as err:
        forged.verify(anchors=[r.anchor for r in receipts])
    assert "rewritten" in str(err.value)
    size = os.path.getsize(ledger_path)
    with pytest.raises(LedgerTamperedError, match="entry 3"):  # the pipeline passes its receipts to reserve
        reserve(forged, dpsgd(10, sigma=5.0), anchors=[r.anchor for r in receipts])
    assert os.path.getsize(ledger_path) == size
    # Anchors of entries before the edit still match; a receipt of a vanished entry does not.
    forged.verify(anchors=[receipts[0].anchor])
    with pytest.raises(LedgerTamperedError, match="entry 9"):
        forged.verify(anchors=[(9, "ab" * 32)])


# --- files that are not ledgers are never touched --------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "text", "sqlite", "empty"])
def test_a_file_that_is_not_a_ledger_is_refused_and_left_unchanged(tmp_path, monkeypatch, kind):
    path = tmp_path / "not-a-ledger"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("budget: 3\n" * 100)
    elif kind == "sqlite":
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE entries (seq INTEGER, payload TEXT)")
        con.execute("INSERT INTO entries VALUES (1, 'mine')")
        con.commit()
        con.close()
    else:
        path.write_bytes(b"")
    before = sha(path)
    listing = sorted(os.listdir(tmp_path))
    monkeypatch.setenv("PRIVTRAIN_LEDGER", str(path))
    with pytest.raises(NotALedgerError) as err:
        Ledger()
    assert str(path) in str(err.value) and "left untouched" in str(err.value) and "--ledger" in str(err.value)
    # Every entry point refuses it, and none writes anything.
    led = Ledger.__new__(Ledger)
    led.path, led._eps_cache = str(path), {}
    for call in (led.verify, lambda: led.spend(SRC), lambda: reserve(led),
                 lambda: led.set_budget(SRC, 3.0, 1e-5, "rdp", ADD)):
        with pytest.raises(NotALedgerError):
            call()
    assert sha(path) == before
    assert sorted(os.listdir(tmp_path)) == listing
    assert issubclass(NotALedgerError, LedgerError)


def test_a_directory_is_not_a_ledger(tmp_path):
    with pytest.raises(NotALedgerError, match="directory"):
        Ledger(str(tmp_path))


# --- reporting and the CLI --------------------------------------------------------------------------------
def test_history_and_format_budget(ledger_path):
    led = Ledger()
    r = reserve(led, dpsgd(1000), budget=BudgetRequest(5.0, 1e-5, "rdp"), label="nightly")
    led.finish(r, dpsgd(700), "cancelled")
    reserve(led, dpsgd(100))
    (src,) = led.history()
    assert src["source_id"] == SRC and src["relation"] == ADD and src["budget"]["epsilon"] == 5.0
    assert [x["status"] for x in src["runs"]] == ["cancelled", "open"]
    assert src["runs"][0]["label"] == "nightly" and src["runs"][0]["released_event"]["count"] == 700
    json.dumps(src)
    text = format_budget(led)
    assert "Source test-source (add_or_remove_one)" in text and "remaining=" in text and "open*" in text
    assert json.loads(format_budget(led, as_json=True))[0]["spent"]["runs"] == 2


def _one_line_error(result):
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_cli_budget_verify_exit_codes(ledger_path, tmp_path):
    led = Ledger()
    receipts = _three_runs(led)
    ok = run_cli("budget", "verify", timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert f"ledger OK: 5 entries, head {receipts[-1].head_hash}" in ok.stdout
    anchored = run_cli("--ledger", ledger_path, "budget", "verify", "--anchor", f"5:{receipts[-1].head_hash}",
                       timeout=300)
    assert anchored.returncode == 0, anchored.stderr

    raw(ledger_path, "DROP TRIGGER entries_no_update")
    raw(ledger_path, "UPDATE entries SET payload = replace(payload, '\"count\":1000', '\"count\":0') WHERE seq = 2")
    bad = run_cli("budget", "verify", timeout=300)
    assert bad.returncode == 1
    line = _one_line_error(bad)
    assert "entry 2" in line and ledger_path in line
    assert run_cli("budget", timeout=300).returncode == 1  # showing the budget verifies first

    text = tmp_path / "notes.txt"
    text.write_text("not a ledger\n")
    other = run_cli("budget", "verify", "--ledger", str(text), timeout=300)
    assert other.returncode == 2 and "is not a privtrain ledger" in _one_line_error(other)
    assert text.read_text() == "not a ledger\n"


def test_cli_set_epsilon_raises_a_budget_explicitly(ledger_path, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    spec = json.load(open(os.path.join(os.path.dirname(__file__), "..", "..", "data", "adult", "dataset.json")))
    spec.pop("schema", None)
    spec["privacy"] = {"source_id": "cli-source"}
    spec["splits"] = {"train": "train.csv", "eval": "eval.csv"}
    (data / "dataset.json").write_text(json.dumps(spec))
    (data / "train.csv").write_text("x\n")
    (data / "eval.csv").write_text("x\n")
    missing = run_cli("budget", "--set-epsilon", "4", "--data", str(data), timeout=300)
    assert missing.returncode == 2 and "--delta" in _one_line_error(missing)
    created = run_cli("budget", "--set-epsilon", "4", "--delta", "1e-6", "--relation", "replace_one",
                      "--data", str(data), "--json", timeout=300)
    assert created.returncode == 0, created.stderr
    (src,) = json.loads(created.stdout)
    assert src["source_id"] == "cli-source" and src["budget"]["epsilon"] == 4.0 and src["relation"] == REPLACE
    raised = run_cli("budget", "--set-epsilon", "6", "--source", "cli-source", timeout=300)
    assert raised.returncode == 0, raised.stderr
    budget = Ledger().get_budget("cli-source")
    assert (budget.epsilon, budget.delta, budget.seq) == (6.0, 1e-6, 2)


def test_check_is_a_dry_run_reservation(tmp_path):
    import dp_accounting as dpa
    from dp_training.ledger import BudgetExceededError, BudgetRequest, Ledger

    ledger = Ledger(str(tmp_path / "ledger.sqlite"))
    event = dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(10.0), 10)
    kw = dict(trainer="dp_sgd", private=True, accountant="pld", relation="add_or_remove_one", delta=1e-5)
    ledger.check("s", event, budget=BudgetRequest(2.0, 1e-5), **kw)   # would be accepted ...
    assert ledger.get_budget("s") is None and ledger.verify().entries == 0  # ... and nothing was written
    ledger.reserve("s", event, budget=BudgetRequest(2.0, 1e-5), **kw)
    with pytest.raises(BudgetExceededError):
        for _ in range(50):
            ledger.check("s", event, **kw)
            ledger.reserve("s", event, **kw)
    entries = ledger.verify().entries
    with pytest.raises(BudgetExceededError):
        ledger.check("s", event, **kw)
    assert ledger.verify().entries == entries
