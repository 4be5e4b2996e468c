"""DP-FedAvg's noise and client sampling come from OS entropy, never from the run's seed (issue 17 items 7, 5):
two runs with the same seed (and the same TF global seed, which fixes TensorFlow's process RNG) add different
noise; a resumed private run samples fresh clients after its checkpoint; checkpoints hold no sampling state and
no noise key; the key never appears in anything the run writes."""
import glob
import json
import os

import numpy as np
import pytest

from federated import dp_noise
from federated import engine as engine_mod
from federated.engine import FederatedConfig, run_federated
from tests.dp_training.synthetic import make_data
from tests.secret_scan import find

tf = pytest.importorskip("tensorflow")


def quiet(_msg):
    pass


def _build(hidden=64):
    def build():
        num = tf.keras.Input(shape=(4,), name="num", dtype=tf.float32)
        cat = tf.keras.Input(shape=(1,), name="cat", dtype=tf.int64)
        x = tf.keras.layers.Concatenate()([num, tf.keras.layers.CategoryEncoding(5, output_mode="one_hot")(cat)])
        x = tf.keras.layers.Dense(hidden, activation="relu",
                                  kernel_initializer=tf.keras.initializers.GlorotUniform(1))(x)
        out = tf.keras.layers.Dense(1, kernel_initializer=tf.keras.initializers.GlorotUniform(2))(x)
        return tf.keras.Model(inputs={"num": num, "cat": cat}, outputs=out)
    return build


def _weights(model):
    return np.concatenate([np.ravel(w) for w in model.get_weights()])


@pytest.fixture(scope="module")
def rows():
    return make_data(400, seed=11)


def test_same_seed_runs_add_different_noise_and_nothing_else_differs(rows, no_workers_after):
    """Every client in the one round (fixed sampling of all of them, one local batch each): the only randomness
    left is the aggregate noise, and it differs between two runs with the same seeds (also TensorFlow's)."""
    x, y = rows
    k, z, clip = 8, 1.0, 0.5
    base = dict(clients=k, clients_per_round=k, rounds=1, partition="iid", sampling="fixed", client_lr=0.1,
                client_batch_size=400, dp_clip=clip, plot=False, eval_every=0, seed=4)
    noiseless = [run_federated(x, y, None, None, _build(), FederatedConfig(**base, dp_noise_multiplier=0.0),
                               log=quiet, model_key=("noise-test",)) for _ in range(2)]
    np.testing.assert_allclose(_weights(noiseless[0].model), _weights(noiseless[1].model), atol=1e-6)
    noisy = []
    try:
        for _ in range(2):
            tf.random.set_seed(5)   # the same seed for both runs, set before the process is traced
            noisy.append(run_federated(x, y, None, None, _build(), FederatedConfig(**base, dp_noise_multiplier=z),
                                       log=quiet))
    finally:
        tf.random.set_seed(None)
    diff = _weights(noisy[0].model) - _weights(noisy[1].model)
    assert np.abs(diff).max() > 1e-3, "two runs with the same seeds added the same noise"
    # the difference is two independent noise draws: std sqrt(2) z C / K per weight
    assert float(np.std(diff)) == pytest.approx(np.sqrt(2) * z * clip / k, rel=0.15)


def test_dp_fedavg_noise_is_a_function_of_the_injected_key_only(rows, no_workers_after):
    """Client learning rate 0: every clipped update is zero and one round moves the weights by the noise alone.
    The same key block gives the same noise (nothing of TensorFlow's process RNG, 32-bit seeded, enters it), a
    fresh block other noise of std z C / K. Old code: no key; the noise came from the TFF worker's process RNG."""
    from federated.runtime import tff_runtime
    from federated.strategies import DPFedAvg

    x, y = rows
    z, clip, k = 1.0, 0.5, 4.0
    with tff_runtime(0):
        process = DPFedAvg(noise_multiplier=z, clip=clip, clients_per_round=k, client_lr=0.0).build_process(
            lambda: _model_fn(x))
        state = process.initialize()
        assert dp_noise.count_noise_keys(state) == 1
        data = [engine_mod.ClientDatasets(engine_mod._as_model_dtypes(x), y, [np.arange(40)], 32, 1).client(0, 0)]
        before = _flat(process.get_model_weights(state))
        block = dp_noise.fresh_key_block()
        keyed = dp_noise._replace_keys(state, lambda _: block, [])
        a, b = (_flat(process.get_model_weights(process.next(keyed, data).state)) - before for _ in range(2))
        c = _flat(process.get_model_weights(process.next(dp_noise.with_fresh_noise_keys(state), data).state)) - before
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    assert float(np.std(c)) == pytest.approx(z * clip / k, rel=0.15)


def _flat(weights):
    return np.concatenate([np.ravel(w) for w in weights.trainable])


def test_adaptive_clipping_draws_both_gaussians_from_keys(rows, no_workers_after):
    from federated.runtime import tff_runtime
    from federated.strategies import DPFedAvg

    x, y = rows
    cfg = FederatedConfig(clients=20, clients_per_round=20, rounds=1, partition="iid", sampling="fixed",
                          adaptive_clipping=True, dp_noise_multiplier=1.0, dp_clip=0.5, plot=False, eval_every=0)
    res = run_federated(x, y, None, None, _build(), cfg, log=quiet)
    assert np.all(np.isfinite(_weights(res.model))) and res.history[0]["participants"] == 20
    with tff_runtime(0):
        process = DPFedAvg(noise_multiplier=1.0, clip=0.5, adaptive_clipping=True,
                           clients_per_round=20.0).build_process(lambda: _model_fn(x))
        state = process.initialize()
        assert dp_noise.count_noise_keys(state) == 2   # the clipped sum and the quantile estimator's count
        data = [engine_mod.ClientDatasets(engine_mod._as_model_dtypes(x), y, [np.arange(20)], 32, 1).client(0, 0)]
        # a round without an injected key yields NaN, which TFF's finalizer rejects: never predictable noise
        out = process.next(state, data)
        assert int(out.metrics["finalizer"]["update_non_finite"]) == 1
        out = process.next(dp_noise.with_fresh_noise_keys(state), data)
        assert int(out.metrics["finalizer"]["update_non_finite"]) == 0
        assert dp_noise.count_noise_keys(out.state) == 2
        assert all(not np.any(k) for k in _key_values(out.state))   # returned with the keys zeroed


def _key_values(state):
    got = []
    dp_noise._replace_keys(state, lambda leaf: got.append(np.asarray(leaf)) or leaf, [])
    return got


def _model_fn(x):
    element_spec = engine_mod._element_spec(engine_mod._as_model_dtypes(x))
    import tensorflow_federated as tff
    return tff.learning.models.from_keras_model(_build()(), loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                                                input_spec=element_spec)


def test_resumed_private_run_samples_fresh_clients_and_stores_no_secret(rows, tmp_path, monkeypatch,
                                                                        no_workers_after):
    """Old code: the checkpoint held the sampling RNG state and the resumed run re-used the clients the first run
    had sampled after the checkpoint, while the ledger composed both as independent rounds."""
    x, y = rows
    sampled, keys, logs = [], [], []
    real_for_round, real_key = engine_mod.ClientDatasets.for_round, dp_noise.fresh_key_block

    def spy_round(self, client_ids, round_seed):
        sampled.append(sorted(int(c) for c in client_ids))
        return real_for_round(self, client_ids, round_seed)

    def spy_key():
        keys.append(real_key())
        return keys[-1]

    monkeypatch.setattr(engine_mod.ClientDatasets, "for_round", spy_round)
    monkeypatch.setattr(dp_noise, "fresh_key_block", spy_key)
    out = str(tmp_path / "run")
    cfg = FederatedConfig(clients=20, clients_per_round=5, rounds=4, checkpoint_every=2, partition="iid",
                          dp_noise_multiplier=1.0, dp_clip=0.5, client_batch_size=16, eval_every=0, seed=0)
    run_federated(x, y, x, y, _build(16), cfg, output_dir=out, log=logs.append, model_key=("resume-test",))
    first = list(sampled)
    assert len(first) == 4
    for f in glob.glob(os.path.join(out, "checkpoints", "round_00004.*")):
        os.remove(f)            # as if the run had crashed after round 2's checkpoint (and released rounds 3, 4)
    del sampled[:]
    res = run_federated(x, y, x, y, _build(16), cfg, output_dir=out, log=logs.append, model_key=("resume-test",))
    assert res.resumed_from_round == 2 and len(sampled) == 2
    assert sampled != first[2:], "the resumed rounds re-used the clients the first run sampled after the checkpoint"
    for meta in glob.glob(os.path.join(out, "checkpoints", "*.json")):
        with open(meta, encoding="utf-8") as f:
            assert "rng_state" not in json.load(f)
    assert len(keys) == 6 and len({k.tobytes() for k in keys}) == 6   # one fresh block per round
    assert find(keys, out, logs) == []
    assert sorted(os.listdir(out)) == ["accuracy.png", "checkpoints", "metrics.csv", "metrics.json"]


def test_non_private_checkpoint_keeps_its_sampling_state(rows, tmp_path, no_workers_after):
    x, y = rows
    out = str(tmp_path / "run")
    cfg = FederatedConfig(clients=20, clients_per_round=5, rounds=1, checkpoint_every=1, partition="iid",
                          eval_every=0, plot=False)
    run_federated(x, y, None, None, _build(16), cfg, output_dir=out, log=quiet)
    with open(os.path.join(out, "checkpoints", "round_00001.json"), encoding="utf-8") as f:
        assert "rng_state" in json.load(f)   # reproducible from the public seed: nothing secret to hide


@pytest.mark.slow
def test_crashed_then_resumed_private_run_charges_every_released_round(adult, tmp_path, ledger_path, monkeypatch,
                                                                        no_workers_after):
    """Through the privacy protocol: a run crashes after round 4 (checkpoint at round 2) and is charged its 4
    released rounds; the resumed run re-runs rounds 3-5 with freshly sampled clients (old code: the crashed run's
    clients again) and is charged all 5 rounds its model embodies. Rounds 1-2 are charged twice (over-stated,
    never under-stated), rounds 3-4 of both runs each once, as the independent releases they now are."""
    import dp_accounting

    from dp_training import events as ev
    from dp_training.ledger import Ledger
    from federated import SimulationConfig, simulate

    sampled = []
    real_for_round = engine_mod.ClientDatasets.for_round

    def spy_round(self, client_ids, round_seed):
        sampled.append(sorted(int(c) for c in client_ids))
        return real_for_round(self, client_ids, round_seed)

    def crash(msg):
        if msg.startswith("[federated] round 4/"):
            raise RuntimeError("crash injected after round 4")

    monkeypatch.setattr(engine_mod.ClientDatasets, "for_round", spy_round)
    cfg = SimulationConfig(clients=20, clients_per_round=4, rounds=5, train_sample=1500, client_batch_size=32,
                           client_lr=0.1, plot=False, eval_every=0, checkpoint_every=2, dp_noise_multiplier=1.0,
                           output_dir=str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="crash injected"):
        simulate(cfg, data=adult, log=crash)
    crashed = list(sampled)
    resumed = simulate(cfg, data=adult, log=quiet)
    assert resumed.resumed_from_round == 2 and len(sampled) == 4 + 3
    assert sampled[4:6] != crashed[2:4], "the re-run rounds 3-4 sampled the crashed run's clients again"
    runs = Ledger(ledger_path).history("uci-adult-1994-census")[0]["runs"]
    assert [r["status"] for r in runs] == ["failed", "completed"]

    def rounds(run):
        return ev.from_json(run["released_event"]).events[1] == ev.ReplaceAdjacencyDpEvent(
            dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(
                1.0)), {"failed": 4, "completed": 5}[run["status"]]))
    assert all(rounds(r) for r in runs)
