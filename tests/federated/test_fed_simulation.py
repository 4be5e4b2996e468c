"""TFF rounds through the privacy protocol: the ledger is charged with the planned/released event, the
guarantee is the protocol's, per-round facts stay private, and no worker_binary is ever left running."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import dp_accounting
import numpy as np
import psutil
import pytest

from dp_training import accountants, events as ev
from dp_training.ledger import Ledger
from federated import SimulationConfig, simulate
from federated.runtime import worker_processes
from tests.conftest import make_adult_sample

SMALL = dict(clients=10, clients_per_round=4, train_sample=1500, eval_sample=800, client_batch_size=32,
             client_lr=0.1, plot=False)
ADULT_SOURCE = "uci-adult-1994-census"
PRIVATE_KEYS = {"sampled", "participants", "examples", "history", "shards", "sizes", "positive_rates",
                "label_skew", "train_loss", "train_accuracy", "nonempty_clients", "rows_without_person",
                "train_rows", "dropped", "round_seconds"}


def quiet(_msg):
    pass


def _keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v)


def _runs(path, source=ADULT_SOURCE):
    return Ledger(path).history(source)[0]["runs"]


def test_non_private_rounds_learn_and_are_recorded(adult, tmp_path, ledger_path, no_workers_after):
    res = simulate(SimulationConfig(**dict(SMALL, plot=True), rounds=4, partition="iid", sampling="fixed",
                                    output_dir=str(tmp_path)), data=adult, log=quiet)
    h = res.history
    assert [r["round"] for r in h] == [1, 2, 3, 4]
    assert h[-1]["eval_loss"] < h[0]["eval_loss"]
    assert res.final["eval_accuracy"] > 0.78  # majority class is ~0.76
    assert res.privacy["private"] is False and res.privacy["epsilon"] == "inf"
    for f in ("metrics.csv", "metrics.json", "accuracy.png", "privacy.json"):
        assert os.path.getsize(tmp_path / f) > 0
    meta = json.load(open(tmp_path / "metrics.json"))
    assert meta["privacy_status"].startswith("PRIVATE")
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 4 and float(rows[-1]["eval_accuracy"]) == pytest.approx(res.final["eval_accuracy"])
    runs = _runs(ledger_path)   # a non-private run is recorded too (unbounded spend)
    assert len(runs) == 1 and runs[0]["status"] == "completed" and not runs[0]["private"]
    assert runs[0]["released_event"]["type"] == "NonPrivateDpEvent"


def test_fixed_sampling_private_run_is_planned_and_charged(adult, tmp_path, ledger_path, no_workers_after):
    cfg = SimulationConfig(**SMALL, rounds=2, sampling="fixed", dp_noise_multiplier=1.0, dp_clip=0.5, eval_every=0,
                           output_dir=str(tmp_path), privacy={"accountant": "rdp", "delta": 1e-5})
    res = simulate(cfg, data=adult, log=quiet)
    g = res.privacy
    wrapped = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(10, 4, dp_accounting.GaussianDpEvent(1.0)), 2)
    event = ev.from_json(g["event"])
    pre, training = event.events
    assert isinstance(pre, dp_accounting.GaussianDpEvent)            # DP normalisation statistics
    assert training == ev.ReplaceAdjacencyDpEvent(wrapped)
    assert g["private"] and g["accountant"] == "rdp" and g["privacy_unit"] == "row"
    assert g["epsilon"] == pytest.approx(accountants.epsilon(event, 1e-5, "rdp", "add_or_remove_one"), rel=1e-9)
    runs = _runs(ledger_path)
    assert len(runs) == 1 and runs[0]["status"] == "completed" and runs[0]["private"]
    assert ev.from_json(runs[0]["planned_event"]) == event == ev.from_json(runs[0]["released_event"])
    assert Ledger(ledger_path).spend(ADULT_SOURCE).epsilon == pytest.approx(g["epsilon"], rel=1e-6)
    # what is public holds no per-round or per-client fact
    published = json.load(open(tmp_path / "privacy.json"))
    assert published == g
    assert not PRIVATE_KEYS & set(_keys(published)), PRIVATE_KEYS & set(_keys(published))
    assert any("per-round" in item for item in g["not_covered"])
    # ... which stay in the private metrics
    assert [r["sampled"] for r in res.history] == [4, 4]
    # the model is the platform's one model (DP normalisation + public-domain one-hots)
    assert any(layer.name.endswith("_dp_norm") for layer in res.model.layers)


def test_exception_in_round_charges_released_rounds_and_stops_worker(adult, ledger_path, no_workers_after):
    seen = []

    def boom(msg):
        if msg.startswith("[federated] round 2/"):
            seen.append(worker_processes())
            raise RuntimeError("client failure injected in round 2")

    with pytest.raises(RuntimeError, match="injected"):
        simulate(SimulationConfig(**SMALL, rounds=5, dp_noise_multiplier=1.0, eval_every=0), data=adult, log=boom)
    assert seen and seen[0], "a worker_binary should have been running during the rounds"
    assert worker_processes() == []
    (run,) = _runs(ledger_path)
    assert run["status"] == "failed"
    released = ev.from_json(run["released_event"])
    assert released.events[1] == ev.ReplaceAdjacencyDpEvent(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.4, dp_accounting.GaussianDpEvent(1.0)), 2))   # 2 of 5 rounds


def test_one_client_per_person_and_refusals(tmp_path, ledger_path, no_workers_after):
    from federated.data import load_tabular

    data_dir = make_adult_sample(str(tmp_path / "persons"), 1500, 400, source_id="fed-persons",
                                 privacy={"unit": "column:native-country"})
    data = load_tabular(data_dir)
    # refused from public inputs, before anything is reserved: a partition that splits a person's rows
    with pytest.raises(ValueError, match="column:native-country"):
        simulate(SimulationConfig(**SMALL, rounds=1, data_dir=data_dir, dp_noise_multiplier=1.0), data=data,
                 log=quiet)
    assert Ledger(ledger_path).history("fed-persons")[0]["runs"] == []
    res = simulate(SimulationConfig(clients_per_round=5, rounds=2, data_dir=data_dir, partition="column:native-country",
                                    dp_noise_multiplier=1.0, dp_clip=0.5, eval_every=0, plot=False,
                                    privacy={"delta": 1e-5}), data=data, log=quiet)
    k = len(data.spec.public_domains()["native-country"].values) + 1
    g = res.privacy
    assert g["privacy_unit"] == "column:native-country" and "one native-country" in g["statement"]
    # no row-level preprocessing; the client-level event, exact
    assert ev.from_json(g["event"]) == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(5 / k, dp_accounting.GaussianDpEvent(1.0)), 2)
    assert res.shards["clients"] == k
    (run,) = Ledger(ledger_path).history("fed-persons")[0]["runs"]
    assert run["status"] == "completed" and run["private"]


@pytest.mark.slow
def test_dropout_and_noise_only_rounds(adult, ledger_path, no_workers_after):
    res = simulate(SimulationConfig(**SMALL, rounds=3, sampling="fixed", dropout_rate=0.5, eval_every=0,
                                    partition="iid"), data=adult, log=quiet)
    assert [(r["sampled"], r["dropped"], r["participants"]) for r in res.history] == [(4, 2, 2)] * 3
    # DP-FedAvg runs a round even when nobody is left (a noise-only update): skipping it would reveal that
    res = simulate(SimulationConfig(**SMALL, rounds=2, sampling="fixed", dropout_rate=0.9, eval_every=0,
                                    dp_noise_multiplier=1.0, privacy={"accountant": "rdp"}), data=adult, log=quiet)
    assert [r["participants"] for r in res.history] == [0, 0]
    assert res.final["rounds"] == 2


@pytest.mark.slow
def test_resume_from_checkpoint_equals_uninterrupted_run(adult, tmp_path, ledger_path):
    cfg = dict(SMALL, checkpoint_every=1, eval_every=0, partition="hash")
    first = simulate(SimulationConfig(**cfg, rounds=2, output_dir=str(tmp_path / "a")), data=adult, log=quiet)
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints"))[-1] == "round_00002.npz"
    resumed = simulate(SimulationConfig(**cfg, rounds=3, output_dir=str(tmp_path / "a")), data=adult, log=quiet)
    assert resumed.resumed_from_round == 2 and resumed.history[:2] == first.history
    straight = simulate(SimulationConfig(**cfg, rounds=3, output_dir=str(tmp_path / "b")), data=adult, log=quiet)
    for a, b in zip(resumed.model.get_weights(), straight.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a checkpoint of other settings (here: a non-private run) is never resumed into a private one
    with pytest.raises(ValueError, match="other settings"):
        simulate(SimulationConfig(**cfg, rounds=4, output_dir=str(tmp_path / "a"), dp_noise_multiplier=1.0),
                 data=adult, log=quiet)


SCRIPT = textwrap.dedent("""
    from federated import SimulationConfig, simulate
    def log(msg):
        if msg.startswith("[federated] round"):
            print("ROUND", msg.split()[2], flush=True)
    simulate(SimulationConfig(clients=10, clients_per_round=3, rounds=1000, train_sample=1000, eval_every=0,
                              plot=False, partition="iid"), log=log)
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_no_worker_left_after_interrupting_a_simulation(sig, ledger_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, text=True)
    try:
        deadline = time.time() + 240
        for line in proc.stdout:
            if line.startswith("ROUND 2") or time.time() > deadline:
                break
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "worker_binary"]
        assert workers, "the simulation should be running a worker_binary"
        proc.send_signal(sig)  # Ctrl-C / kill
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"worker_binary survived {sig!r}: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
