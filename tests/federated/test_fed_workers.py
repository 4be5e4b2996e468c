"""Remote TFF workers (federated.workers) and large populations: rounds split across real worker_binary processes
give the single-worker result, DP noise is added once per round whatever the number of workers, a killed worker
stops the run with a clear error and an intact checkpoint, ``privtrain federated-worker`` serves and stops cleanly,
a 10,000-client population loads client data per cohort, and the noise-cohort simulation setting is labelled and
accounted by the privacy layer."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import dp_accounting
import numpy as np
import psutil
import pytest

from dp_training import accountants, events as ev
from dp_training.ledger import Ledger
from federated import SimulationConfig, simulate
from federated import workers as workers_lib
from federated.engine import FederatedConfig, RunStopped, run_federated
from federated.trainer import training_event
from tests.conftest import PROJECT_ROOT, run_cli

SMALL = dict(clients=10, clients_per_round=4, train_sample=1500, eval_sample=300, client_batch_size=32,
             client_lr=0.1, plot=False, eval_every=0, partition="iid", sampling="fixed", rounds=3, seed=3)


def quiet(_msg):
    pass


def _weights(model):
    return np.concatenate([np.ravel(w) for w in model.get_weights()])


@pytest.fixture(scope="module")
def small(adult):
    return adult.sample(1500, 300, 30000, seed=3)


def _build(spec):
    from dp_training.model import bucket_sizes, build_model

    return lambda: build_model(spec, bucket_sizes(spec), None, (16,))


def test_two_local_workers_equal_one_worker(adult, ledger_path, no_workers_after):
    """Same seed, no DP: the clients of each round split across 2 worker processes give the 1-worker weights."""
    two = simulate(SimulationConfig(**SMALL, worker_processes=2), data=adult, log=quiet)
    one = simulate(SimulationConfig(**SMALL, worker_processes=1), data=adult, log=quiet)
    assert len(two.history) == len(one.history) == 3
    np.testing.assert_allclose(_weights(two.model), _weights(one.model), rtol=0, atol=1e-6)
    assert np.abs(_weights(two.model) - _weights(one.model)).max() <= 1e-6
    assert workers_lib.parse_addresses("a:1, b:2") == ["a:1", "b:2"]
    for bad in ("nohost", "h:0", "h:x", "a:1,a:1"):
        with pytest.raises(ValueError, match="--workers"):
            workers_lib.parse_addresses(bad)


def test_dp_noise_is_added_once_per_round_across_workers(small, no_workers_after):
    """With client learning rate 0 every clipped update is zero, so one round moves the weights by the aggregate
    noise alone: stddev z*clip/K if the noise is added once (server side), sqrt(2) times that if each of the
    2 workers added its own."""
    z, clip, k = 1.0, 1.0, 4
    cfg = FederatedConfig(clients=10, clients_per_round=k, rounds=1, partition="iid", sampling="fixed", client_lr=0.0,
                          dp_noise_multiplier=z, dp_clip=clip, plot=False, eval_every=0, worker_processes=2)
    build = _build(small.spec)
    res = run_federated(small.train_features, small.train_labels, None, None, build, cfg, log=quiet)
    before = np.concatenate([np.ravel(w) for w in build().trainable_weights])
    after = np.concatenate([np.ravel(w) for w in res.model.trainable_weights])
    std = float(np.std(after - before))
    assert before.size > 1000
    assert std == pytest.approx(z * clip / k, rel=0.1), std


def test_killed_worker_stops_run_with_intact_checkpoint_and_resume_works(small, tmp_path, no_workers_after):
    procs = workers_lib.start_local_workers(2)
    out = str(tmp_path / "run")
    cfg = FederatedConfig(clients=10, clients_per_round=4, rounds=3, partition="iid", sampling="fixed", plot=False,
                          eval_every=0, checkpoint_every=1, workers=",".join(p.address for p in procs))
    victim = procs[1]

    def kill_after_first(rec):
        if rec["round"] == 1:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()

    build = _build(small.spec)
    try:
        with pytest.raises(RunStopped) as info:
            run_federated(small.train_features, small.train_labels, None, None, build, cfg, output_dir=out,
                          on_round=kill_after_first, log=quiet)
    finally:
        workers_lib.stop_local_workers(procs)
    msg = str(info.value)
    assert victim.address in msg and "round 2" in msg and "round_00001" in msg and "intact" in msg
    assert "\n" not in msg and info.value.round == 2
    ckpt = info.value.checkpoint
    assert ckpt.endswith("round_00001") and os.path.isfile(ckpt + ".npz") and os.path.isfile(ckpt + ".json")
    # resume on fresh local workers (the worker settings may change between attempts)
    cfg2 = FederatedConfig(**{**cfg.__dict__, "workers": None, "worker_processes": 2})
    res = run_federated(small.train_features, small.train_labels, None, None, build, cfg2, output_dir=out, log=quiet)
    assert res.resumed_from_round == 1 and [h["round"] for h in res.history] == [1, 2, 3]


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_federated_worker_command_serves_a_cli_simulation_and_stops_cleanly(tmp_path, ledger_path, adult_sample):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=PROJECT_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "-m", "privtrain_cli", "federated-worker", "--port", str(port)],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        workers_lib.wait_ready(f"localhost:{port}", timeout=60, proc=proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any(c.name() == workers_lib.WORKER_NAME for c in children)
        # the port is taken now: a second worker on it is refused in one line
        with pytest.raises(workers_lib.WorkerError, match=f"port {port} is already in use"):
            workers_lib.serve(port)
        out = str(tmp_path / "sim")
        res = run_cli("simulate", "federated", "--data", adult_sample, "--output", out, "--workers",
                      f"localhost:{port}", "--clients", "20", "--clients-per-round", "5", "--rounds", "2",
                      "--eval-every", "0", "--dp-noise-multiplier", "10", "--noise-cohort-size", "50",
                      "--noise-population", "200", timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads(res.stdout[res.stdout.index("{\n"):])
        label = "simulation setting: noise calibrated for a cohort of 50, 5 simulated"
        assert summary["simulation_setting"] == label
        privacy = json.load(open(os.path.join(out, "privacy.json")))
        assert privacy["simulation_setting"]["label"] == label and privacy["statement"].startswith(label)
        assert privacy["parameters"]["simulation_setting"] == label
        # no worker reachable: an error naming the address (the CLI prints it as one line, exit 3)
        dead = _free_port()
        with pytest.raises(workers_lib.WorkerError, match=f"no TFF worker answers at localhost:{dead}"):
            workers_lib.create_remote_context([f"localhost:{dead}"], ready_timeout=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert rc == 0, proc.stderr.read()[-2000:]
    assert "stopped" in proc.stdout.read()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_ten_thousand_client_population_loads_cohorts_lazily_and_labels_the_noise_cohort(adult, tmp_path,
                                                                                        ledger_path, no_workers_after):
    """10,000 clients (row-stable hash shards of Adult), 100 per round; noise calibrated for a cohort of 1,000 of
    the same population: the simulation adds noise multiplier z*100/1000 to its sum and is charged with that."""
    z, rounds = 10.0, 2   # z*100/1000 = 1: the accountant stays quick
    cfg = SimulationConfig(clients=10_000, clients_per_round=100, rounds=rounds, partition="hash", eval_every=0,
                           plot=False, client_batch_size=8, dp_noise_multiplier=z, noise_cohort_size=1000,
                           output_dir=str(tmp_path), privacy={"delta": 1e-6})
    res = simulate(cfg, data=adult, log=quiet)
    assert res.final["clients"] == 10_000 and res.shards["clients"] == 10_000
    participants = sum(h["participants"] for h in res.history)
    assert 0 < res.final["client_datasets_built"] == participants < 500   # per cohort, never all 10,000
    g = json.load(open(tmp_path / "privacy.json"))
    label = "simulation setting: noise calibrated for a cohort of 1000, 100 simulated"
    sim = g["simulation_setting"]
    assert sim["label"] == label and g["statement"].startswith(label) and "does NOT cover" in g["statement"]
    assert g["parameters"]["simulated_noise_multiplier"] == pytest.approx(z * 100 / 1000)
    pre, charged = ev.from_json(g["event"]).events
    assert charged == training_event(z * 100 / 1000, rounds, 10_000, 100, "poisson", "replace")
    deployment = ev.compose(pre, training_event(z, rounds, 10_000, 1000, "poisson", "replace"))
    assert ev.from_json(sim["deployment_event"]) == deployment
    assert sim["deployment_epsilon"] == pytest.approx(
        accountants.epsilon(deployment, 1e-6, "pld", "add_or_remove_one"), rel=1e-9)
    assert g["epsilon"] > sim["deployment_epsilon"]   # the simulated data get the weaker guarantee, stated as such
    run = Ledger(ledger_path).history("uci-adult-1994-census")[0]["runs"][0]
    assert ev.from_json(run["released_event"]) == ev.from_json(g["event"])


def test_noise_cohort_plan_calibrates_the_deployment_and_refuses_misuse(adult):
    from core.features import numeric_key
    from dp_training.protocol import deployment_epsilon, plan_run
    from federated.trainer import FederatedTrainer

    spec = adult.spec
    keys = [numeric_key(c) for c in spec.numeric_features]
    args = dict(clients=5000, clients_per_round=50, rounds=5, partition="hash", dp_noise_multiplier="auto",
                noise_cohort_size=100, noise_population=10_000)
    plan = plan_run(spec, "federated", FederatedTrainer(), args, {"target_epsilon": 1.0, "delta": 1e-6}, keys)
    assert deployment_epsilon(plan) == pytest.approx(1.0, abs=0.02)
    z = plan.training.public["noise_multiplier"]
    assert plan.training.event == training_event(z * 50 / 100, 5, 5000, 50, "poisson", "replace")
    assert plan.training.public["simulation_setting"].startswith("simulation setting: noise calibrated for a cohort")
    assert plan.planned_epsilon() > 1.0
    for bad, match in ((dict(noise_cohort_size=10), "below the 50 simulated"),
                       (dict(noise_population=99), "exceeds the population"),
                       (dict(dp_noise_multiplier=None), "needs a private run")):
        with pytest.raises(ValueError, match=match):
            plan_run(spec, "federated", FederatedTrainer(), {**args, **bad}, {"delta": 1e-6, "allow_non_private": True},
                     keys)


def test_worker_and_noise_cohort_flags_roundtrip():
    import argparse

    from federated import trainer

    p = argparse.ArgumentParser()
    trainer.add_arguments(p)
    args = trainer.trainer_args(p.parse_args(["--workers", "h1:8000,h2:8001", "--worker-processes", "2",
                                              "--noise-cohort-size", "500", "--noise-population", "9000"]))
    assert args["workers"] == "h1:8000,h2:8001" and args["worker_processes"] == 2
    assert args["noise_cohort_size"] == 500 and args["noise_population"] == 9000
    with pytest.raises(SystemExit):
        p.parse_args(["--workers", "h1"])


@pytest.mark.slow
def test_pipeline_federated_run_on_two_local_workers(tmp_path, adult_sample, ledger_path):
    """privtrain run --trainer federated --worker-processes 2: trains, pushes, states the labelled guarantee, and
    leaves no worker_binary (the Trainer runs in this CLI's process tree)."""
    workdir = str(tmp_path / "work")
    res = run_cli("run", "--trainer", "federated", "--data", adult_sample, "--workdir", workdir, "--json",
                  "--worker-processes", "2", "--clients", "20", "--clients-per-round", "5", "--rounds", "2",
                  "--partition", "hash", "--dp-noise-multiplier", "10", "--noise-cohort-size", "50",
                  "--noise-population", "200", "--min-auc", "0")
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads(res.stdout)
    text = json.dumps(summary)
    assert "simulation setting: noise calibrated for a cohort of 50, 5 simulated" in text
    found = [os.path.join(d, "privacy.json") for d, _, files in os.walk(os.path.join(workdir, "serving"))
             if "privacy.json" in files]
    assert found, "nothing pushed"
    g = json.load(open(found[0]))
    assert g["simulation_setting"]["label"].endswith("5 simulated") and g["parameters"]["noise_cohort_size"] == 50
    from dp_training.guarantee import Guarantee
    from pipeline.runner import format_guarantee

    text = format_guarantee(Guarantee.from_json(g))
    assert text.startswith("simulation setting: noise calibrated for a cohort of 50, 5 simulated")
    assert "NOT for this run's data" in text and "simulated with noise multiplier 1 " in text
    assert not [p for p in psutil.process_iter(["name"]) if p.info["name"] == workers_lib.WORKER_NAME
                and p.ppid() == os.getpid()]


def test_attack_local_workers_cannot_be_reached_from_outside_their_namespace(no_workers_after):
    """TFF's worker_binary listens on every interface and runs any client's computation (no authentication). The
    local workers run in a private network namespace, reached only through a Unix socket in a 0700 directory:
    their TCP port is not reachable from this machine's network."""
    import socket
    import stat

    from core.netns import PrivateNetwork

    with PrivateNetwork() as net:
        if not net.isolated:
            pytest.skip(f"no private network namespace on this machine: {net.reason}")
    procs = workers_lib.start_local_workers(1)
    try:
        (proc,) = procs
        assert proc.address.startswith("unix:/")
        path = proc.address[len("unix:"):]
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", 10000), timeout=2).close()  # the worker's port, from outside
        workers_lib.wait_ready(proc.address, timeout=10)  # through its socket it answers
    finally:
        workers_lib.stop_local_workers(procs)
    assert not os.path.exists(os.path.dirname(path))
