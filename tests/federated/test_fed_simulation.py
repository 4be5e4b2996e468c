"""TFF rounds on a small Adult sample: learning, DP-FedAvg epsilon, dropout, resume, worker cleanup."""
import csv
import json
import os

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant

from federated import SimulationConfig, simulate
from federated.runtime import worker_processes

SMALL = dict(clients=10, clients_per_round=4, train_sample=2000, eval_sample=1000, client_batch_size=32,
             client_lr=0.1, plot=True)


def quiet(_msg):
    pass


def test_rounds_improve_model_and_write_outputs(adult, tmp_path, no_workers_after):
    res = simulate(SimulationConfig(**SMALL, rounds=4, output_dir=str(tmp_path), sampling="fixed"),
                   data=adult, log=quiet)
    h = res.history
    assert [r["round"] for r in h] == [1, 2, 3, 4]
    assert h[-1]["eval_loss"] < h[0]["eval_loss"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert res.final["eval_accuracy"] > 0.78  # majority class is ~0.76
    assert res.privacy is None
    # the returned Keras model carries TFF's final weights
    import tensorflow as tf

    x = {k: v[:1000] for k, v in adult.subsample(None, 1000, seed=0).eval_features.items()}
    m = res.model
    m.compile(loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
    for f in ("metrics.csv", "metrics.json", "accuracy.png"):
        assert os.path.getsize(tmp_path / f) > 0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 4 and float(rows[-1]["eval_accuracy"]) == pytest.approx(res.final["eval_accuracy"])
    meta = json.load(open(tmp_path / "metrics.json"))
    assert meta["shards"]["clients"] == 10 and sum(meta["shards"]["sizes"]) == 2000
    assert np.isfinite(m.predict(x, verbose=0)).all()
    assert worker_processes() == []


def test_dp_fedavg_epsilon_matches_independent_accountant(adult, no_workers_after):
    z, rounds = 1.0, 3
    res = simulate(SimulationConfig(**dict(SMALL, clients_per_round=5), rounds=rounds, dp_noise_multiplier=z,
                                    dp_clip=0.5, eval_every=0), data=adult, log=quiet)
    p = res.privacy
    assert p["sampling_method"] == "poisson-clients" and p["steps"] == rounds
    assert p["sampling_rate"] == 0.5 and p["clients"] == 10 and p["clients_per_round"] == 5
    assert p["noise_multiplier"] == z and p["l2_norm_clip"] == 0.5 and p["delta"] == 1e-5

    def independent(r):
        acc = pld_privacy_accountant.PLDAccountant()
        for _ in range(r):
            acc.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z)))
        return acc.get_epsilon(1e-5)

    assert p["epsilon"] == pytest.approx(independent(rounds), rel=1e-3)
    per_round = [r["epsilon"] for r in res.history]
    assert per_round == pytest.approx([independent(r) for r in (1, 2, 3)], rel=1e-3)
    assert per_round[0] < per_round[1] < per_round[2]


def test_dropout_training_continues(adult, no_workers_after):
    res = simulate(SimulationConfig(**SMALL, rounds=3, sampling="fixed", dropout_rate=0.5, eval_every=0),
                   data=adult, log=quiet)
    assert [(r["sampled"], r["dropped"], r["participants"]) for r in res.history] == [(4, 2, 2)] * 3
    assert all(r["train_loss"] is not None for r in res.history)
    # almost every sampled client fails: rounds with nobody left are skipped, the run goes on
    res = simulate(SimulationConfig(**SMALL, rounds=2, sampling="fixed", dropout_rate=0.9, eval_every=0),
                   data=adult, log=quiet)
    assert [r["participants"] for r in res.history] == [0, 0]
    assert res.final["rounds"] == 2


def test_resume_from_checkpoint(adult, tmp_path, no_workers_after):
    out = str(tmp_path)
    cfg = dict(SMALL, checkpoint_every=1, output_dir=out, eval_every=2)
    first = simulate(SimulationConfig(**cfg, rounds=2), data=adult, log=quiet)
    assert first.resumed_from_round == 0
    assert sorted(os.listdir(tmp_path / "checkpoints"))[-1] == "round_00002.npz"
    second = simulate(SimulationConfig(**cfg, rounds=3), data=adult, log=quiet)
    assert second.resumed_from_round == 2
    assert [r["round"] for r in second.history] == [1, 2, 3]
    assert second.history[:2] == first.history
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["round"]) for r in rows] == [1, 2, 3]


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(adult, tmp_path):
    cfg = dict(SMALL, checkpoint_every=1, eval_every=0)
    simulate(SimulationConfig(**cfg, rounds=2, output_dir=str(tmp_path / "a")), data=adult, log=quiet)
    resumed = simulate(SimulationConfig(**cfg, rounds=3, output_dir=str(tmp_path / "a")), data=adult, log=quiet)
    straight = simulate(SimulationConfig(**cfg, rounds=3, output_dir=str(tmp_path / "b")), data=adult, log=quiet)
    for a, b in zip(resumed.model.get_weights(), straight.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [r["sampled"] for r in resumed.history] == [r["sampled"] for r in straight.history]


def test_no_worker_left_after_exception_in_round(adult, no_workers_after):
    seen = []

    def boom(rec):
        seen.append(worker_processes())
        if rec["round"] == 2:
            raise RuntimeError("client failure injected in round 2")

    with pytest.raises(RuntimeError, match="injected"):
        simulate(SimulationConfig(**SMALL, rounds=4, eval_every=0), data=adult, log=quiet, on_round=boom)
    assert seen[0], "a worker_binary should have been running during the rounds"
    assert worker_processes() == []
