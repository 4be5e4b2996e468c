"""Federated runs with --secure-aggregation: the planned/charged event is the distributed discrete Gaussian's, the
guarantee names the mechanism and its threat model, the server's aggregation runs SecAgg+, and settings the path
does not run are refused in one line."""
from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest

from dp_training import accountants, events as ev
from dp_training.ledger import Ledger
from federated import SimulationConfig, simulate
from federated.secagg import accounting, protocol, rounds

SMALL = dict(clients=20, clients_per_round=10, train_sample=2000, eval_sample=800, client_batch_size=32,
             client_lr=0.1, plot=False, secure_aggregation=True)


def quiet(_msg):
    pass


def test_secure_aggregation_run_states_the_distributed_dp_guarantee(adult, tmp_path, ledger_path, monkeypatch):
    seen = []
    real = protocol.run_round

    def spy(params, inputs, identities, drop=None):   # what the protocol is given, and what the server holds
        res = real(params, inputs, identities, drop)
        seen.append((params, res))
        return res

    monkeypatch.setattr(protocol, "run_round", spy)
    cfg = SimulationConfig(**SMALL, rounds=2, sampling="fixed", dropout_rate=0.2, dp_noise_multiplier=1.5,
                           dp_clip=0.5, output_dir=str(tmp_path), privacy={"accountant": "rdp", "delta": 1e-5})
    res = simulate(cfg, data=adult, log=quiet)
    g = res.privacy
    floor = rounds.min_clients(10, 0.2, "fixed")
    assert floor == 8
    pre, training = ev.from_json(g["event"]).events
    assert training == accounting.planned_event(1.5, floor, 2, replace=True)
    assert isinstance(training.event, dp_accounting.ZCDpEvent)
    assert g["epsilon"] == pytest.approx(accountants.epsilon(ev.from_json(g["event"]), 1e-5, "rdp"), rel=1e-9)
    mech = g["mechanisms"][-1]["name"]
    assert "SecAgg+" in mech and "distributed discrete Gaussian" in mech and "held against the server" in mech
    assert f"at least {floor} clients" in mech
    assert any("without amplification" in n for n in g["notes"])
    run = Ledger(ledger_path).history("uci-adult-1994-census")[0]["runs"][0]
    assert ev.from_json(run["released_event"]) == ev.from_json(g["event"])
    # two rounds of SecAgg+, 2 of 10 clients dropped after sharing keys, a noise floor of 8 inputs
    assert len(seen) == 2
    for params, r in seen:
        assert params.min_inputs == floor and len(r.u3) == 8
        assert len(r.server.masked) == 8     # the server held masked vectors only (uniform: protocol tests)
    assert [h["aborted"] for h in res.history] == [None, None]
    assert json.load(open(tmp_path / "privacy.json")) == g


def test_a_cohort_below_the_noise_floor_releases_nothing(adult, ledger_path):
    """Poisson cohorts smaller than the floor abort: the model stays as it was in that round."""
    cfg = SimulationConfig(**dict(SMALL, clients_per_round=3, clients=20), rounds=4, dp_noise_multiplier=1.0,
                           eval_every=0, privacy={"accountant": "rdp"})
    res = simulate(cfg, data=adult, log=quiet)
    floor = rounds.min_clients(3, 0.0, "poisson")
    for h in res.history:
        assert (h["aborted"] is not None) == (h["sampled"] < floor)


@pytest.mark.parametrize("extra,message", [
    (dict(privacy={"accountant": "pld"}), "pass --accountant rdp"),
    (dict(client_optimizer="adam", privacy={"accountant": "rdp"}), "--client-optimizer sgd"),
    (dict(checkpoint_every=1, privacy={"accountant": "rdp"}), "drop --checkpoint-every"),
])
def test_settings_the_secure_path_does_not_run_are_refused_in_one_line(adult, ledger_path, extra, message):
    cfg = SimulationConfig(**SMALL, rounds=1, dp_noise_multiplier=1.0, **extra)
    with pytest.raises(ValueError, match=message) as e:
        simulate(cfg, data=adult, log=quiet)
    assert "\n" not in str(e.value)
    assert all(not h["runs"] for h in Ledger(ledger_path).history("uci-adult-1994-census"))   # nothing reserved


def test_cli_flag_reaches_the_secure_path(tmp_path, ledger_path, capsys):
    from federated.cli import main

    rc = main(["--output", str(tmp_path), "--train-sample", "800", "--eval-sample", "300", "--clients", "10",
               "--clients-per-round", "6", "--rounds", "1", "--sampling", "fixed", "--dp-noise-multiplier", "2",
               "--secure-aggregation", "--accountant", "rdp", "--eval-every", "0"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    out = json.loads(text[text.index("\n{\n") + 1:])   # the summary after the run's log lines
    assert out["privacy"]["parameters"]["secure_aggregation"].startswith("SecAgg+")
    rc = main(["--output", str(tmp_path / "b"), "--train-sample", "800", "--clients", "10", "--rounds", "1",
               "--dp-noise-multiplier", "2", "--secure-aggregation"])
    err = capsys.readouterr().err
    assert rc == 2 and "pass --accountant rdp" in err and err.count("\n") == 1


def test_worker_processes_run_the_clients_in_their_own_processes_and_stop_them(adult, ledger_path, monkeypatch):
    import psutil

    from federated.secagg import processes

    started = []
    real_init = processes.ProcessClients.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        started.extend(self.pids())

    monkeypatch.setattr(processes.ProcessClients, "__init__", init)
    cfg = SimulationConfig(**SMALL, rounds=2, sampling="fixed", dp_noise_multiplier=1.0, eval_every=0,
                           worker_processes=2, privacy={"accountant": "rdp"})
    res = simulate(cfg, data=adult, log=quiet)
    assert len(started) == 2
    assert [h["aborted"] for h in res.history] == [None, None] and res.history[-1]["bytes_per_client"] > 0
    for pid in started:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
