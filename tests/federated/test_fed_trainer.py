"""The pipeline plug-in (FederatedTrainer) and the CLI helpers."""
import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from federated import cli, trainer


def test_flags_roundtrip():
    p = argparse.ArgumentParser()
    trainer.add_arguments(p)
    ns = p.parse_args(["--clients", "7", "--partition", "dirichlet:0.5", "--dp-noise-multiplier", "1.2",
                       "--adaptive-clipping", "--dropout-rate", "0.2", "--client-optimizer", "adam"])
    args = trainer.trainer_args(ns)
    assert args["clients"] == 7 and args["partition"] == "dirichlet:0.5" and args["dp_noise_multiplier"] == 1.2
    assert args["adaptive_clipping"] and args["dropout_rate"] == 0.2 and args["client_optimizer"] == "adam"
    cfg, unknown = trainer._config(args)
    assert cfg.clients == 7 and not unknown
    with pytest.raises(SystemExit):
        p.parse_args(["--partition", "bogus"])
    sp = argparse.ArgumentParser()
    cli.add_simulate_arguments(sp)
    ns = sp.parse_args(["--output", "/tmp/x", "--rounds", "2"])
    assert ns.rounds == 2 and ns.data.endswith(os.path.join("data", "adult"))


def _pipeline_style(d):
    """Features shaped like the pipeline's transformed ones: [n, 1], names age_z / native_country_id."""
    import tensorflow as tf

    key = lambda name, cat: name.replace("-", "_") + ("_id" if cat else "_z")  # noqa: E731

    def feats(f):
        return {key(k, k in d.vocab_sizes): v.reshape(-1, 1) for k, v in f.items()}

    def build():
        inputs, parts = {}, []
        for k in d.numeric:
            inputs[key(k, False)] = tf.keras.Input(shape=(1,), name=key(k, False), dtype=tf.float32)
            parts.append(inputs[key(k, False)])
        for k, n in d.vocab_sizes.items():
            inputs[key(k, True)] = tf.keras.Input(shape=(1,), name=key(k, True), dtype=tf.int64)
            parts.append(tf.keras.layers.CategoryEncoding(num_tokens=n, output_mode="one_hot")(inputs[key(k, True)]))
        x = tf.keras.layers.Dense(16, activation="relu")(tf.keras.layers.Concatenate()(parts))
        return tf.keras.Model(inputs, tf.keras.layers.Dense(1)(x))

    return feats(d.train_features), feats(d.eval_features), build


def test_trainer_dp_column_partition(adult, tmp_path, no_workers_after):
    from pipeline.trainers.base import TrainerContext

    d = adult.subsample(3000, 500, seed=1)
    train_x, eval_x, build = _pipeline_style(d)
    logs = []
    ctx = TrainerContext(
        dataset_name="adult", dataset_fingerprint="f" * 64, train_features=train_x,
        train_labels=d.train_labels, eval_features=eval_x, eval_labels=d.eval_labels,
        build_model=build, workdir=str(tmp_path), log=logs.append,
        args={"partition": "column:native-country", "clients_per_round": 5, "rounds": 2,
              "dp_noise_multiplier": 0.8, "dp_clip": 0.5, "eval_every": 2, "client_lr": 0.1})
    out = trainer.FederatedTrainer().train(ctx)
    n_clients = len(np.unique(d.train_features["native-country"]))
    p = out.privacy
    assert p["clients"] == n_clients and p["sampling_rate"] == pytest.approx(5 / n_clients)
    assert p["steps"] == 2 and p["sampling_method"] == "poisson-clients" and p["epsilon"] > 0
    assert out.details["strategy"] == "dp-fedavg" and out.details["clients"] == n_clients
    ref = ctx.build_model()
    assert [w.shape for w in out.model.get_weights()] == [w.shape for w in ref.get_weights()]
    assert any("partition column:native-country" in m for m in logs)
    try:
        from dp_training.ledger import PrivacyLedger
    except ImportError:
        return
    runs = PrivacyLedger(str(tmp_path)).history("f" * 64)[0]["runs"]
    assert len(runs) == 1 and runs[0]["status"] == "completed" and runs[0]["steps"] == 2
    # example-level entry: client-level noise multiplier halved (one example moves one update by 2*clip)
    assert runs[0]["noise_multiplier"] == pytest.approx(0.4)
    assert runs[0]["sampling_rate"] == pytest.approx(5 / n_clients)


def test_non_private_fedavg_refused_on_a_budgeted_dataset(adult, tmp_path, no_workers_after):
    ledger = pytest.importorskip("dp_training.ledger")
    from pipeline.trainers.base import TrainerContext

    ledger.PrivacyLedger(str(tmp_path)).set_budget("b" * 64, 3.0, 1e-5)
    d = adult.subsample(200, 100, seed=0)
    ctx = TrainerContext(dataset_name="adult", dataset_fingerprint="b" * 64, train_features=d.train_features,
                         train_labels=d.train_labels, eval_features=d.eval_features, eval_labels=d.eval_labels,
                         build_model=None, workdir=str(tmp_path), args={"rounds": 1})
    from pipeline.trainer_executor import train_guarded

    with pytest.raises(ledger.NonPrivateTrainingRefused):
        train_guarded("federated", ctx)


SCRIPT = textwrap.dedent("""
    import sys
    from federated import SimulationConfig, simulate
    def on_round(rec):
        print("ROUND", rec["round"], flush=True)
    simulate(SimulationConfig(clients=10, clients_per_round=3, rounds=1000, train_sample=1000, eval_every=0,
                              plot=False), log=lambda m: None, on_round=on_round)
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_no_worker_left_after_interrupting_a_simulation(sig):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
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
