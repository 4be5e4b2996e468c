"""The dp_sgd trainer: what it trains, and that its accounting describes what really happened."""
import argparse

import numpy as np
import pytest

import dp_accounting

from tests.dp_training.synthetic import build_model, make_context, make_data, plan_inputs

from dp_training import sgd_events as accounting  # noqa: E402
from dp_training import trainer as trainer_mod  # noqa: E402
from dp_training.contract import TrainingInterrupted  # noqa: E402
from dp_training.trainer import DPSGDTrainer, add_arguments, plan_training, trainer_args  # noqa

tf = pytest.importorskip("tensorflow")


# ------------------------------------------------------------------------------------------------
# The DP step itself: clipped sum + N(0, (sigma C)^2), divided by the *expected* batch size
# ------------------------------------------------------------------------------------------------
def _linear_model():
    num = tf.keras.Input(shape=(4,), name="num", dtype=tf.float32)
    out = tf.keras.layers.Dense(1, kernel_initializer="glorot_uniform")(num)
    return tf.keras.Model(inputs={"num": num}, outputs=out)


def _stepper(path, sigma, clip, lr, n=400, expected_batch=40):
    tf.random.set_seed(3)
    model = _linear_model()
    plan = {"noise_multiplier": sigma, "l2_norm_clip": clip, "learning_rate": lr,
            "args": {"momentum": 0.0}, "sampling_rate": expected_batch / n, "num_rows": n}
    specs = {"num": tf.TensorSpec((None, 4), tf.float32)}
    return model, trainer_mod._DPStepper(model, path, plan, specs)


def _clipped_sum(model, x, y, clip):
    loss_fn = tf.keras.losses.BinaryCrossentropy(from_logits=True)
    total = [tf.zeros_like(v) for v in model.trainable_variables]
    for i in range(x.shape[0]):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[i:i + 1], model({"num": x[i:i + 1]}))
        g = tape.gradient(loss, model.trainable_variables)
        norm = tf.sqrt(sum(tf.reduce_sum(t * t) for t in g))
        f = tf.minimum(1.0, clip / norm)
        total = [a + b * f for a, b in zip(total, g)]
    return total


@pytest.mark.parametrize("path", ["fused_dense", "fast_gradient_clipping", "vectorized_optimizer"])
def test_update_is_clipped_sum_over_expected_batch_size(path):
    lr, clip = 0.5, 0.05
    model, st = _stepper(path, 0.0, clip, lr)
    x, y = make_data(10, seed=5)
    x, y = x["num"], y.reshape(-1, 1)
    before = [v.numpy().copy() for v in model.trainable_variables]
    expected = _clipped_sum(model, x, y, clip)
    st.step({"num": tf.constant(x)}, tf.constant(y))
    for b, v, g in zip(before, model.trainable_variables, expected):
        # realised batch 10, expected batch 40: the update must use 40
        np.testing.assert_allclose(b - v.numpy(), lr * g.numpy() / 40.0, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("path", ["fused_dense", "fast_gradient_clipping", "vectorized_optimizer"])
def test_noise_std_is_sigma_times_clip_over_expected_batch(path):
    lr, clip, sigma = 1.0, 0.5, 2.0
    model, st = _stepper(path, sigma, clip, lr)
    x, y = make_data(8, seed=6)
    xt, yt = {"num": tf.constant(x["num"])}, tf.constant(y.reshape(-1, 1))
    init = [v.numpy().copy() for v in model.trainable_variables]
    deltas, noise_only = [], []
    for _ in range(150):
        for v, w in zip(model.trainable_variables, init):
            v.assign(w)
        st.step(xt, yt)
        deltas.append(np.concatenate([(w - v.numpy()).ravel()
                                      for v, w in zip(model.trainable_variables, init)]))
        for v, w in zip(model.trainable_variables, init):
            v.assign(w)
        st.noise_step()
        noise_only.append(np.concatenate([(w - v.numpy()).ravel()
                                          for v, w in zip(model.trainable_variables, init)]))
    want = lr * sigma * clip / 40.0
    d = np.array(deltas)
    got = (d - d.mean(axis=0)).std()  # the clipped sum is the same every time; noise varies
    assert got == pytest.approx(want, rel=0.1)
    assert np.array(noise_only).std() == pytest.approx(want, rel=0.1)


def test_fused_dense_equals_naive_per_example_clipping_on_an_mlp():
    """The fused path on the platform's shape of model (parameter-free features, ReLU Dense chain): the update
    equals the clipped per-example gradients (computed one example at a time) summed over the expected batch."""
    tf.random.set_seed(4)
    model = build_model(hidden=8)
    assert trainer_mod.supports_fused_dense(model)
    clip, lr, n, expected_batch = 0.3, 0.7, 400, 40
    plan = {"noise_multiplier": 0.0, "l2_norm_clip": clip, "learning_rate": lr, "args": {"momentum": 0.0},
            "sampling_rate": expected_batch / n, "num_rows": n}
    specs = {"num": tf.TensorSpec((None, 4), tf.float32), "cat": tf.TensorSpec((None, 1), tf.int64)}
    st = trainer_mod._DPStepper(model, "fused_dense", plan, specs)
    x, y = make_data(12, seed=9)
    loss_fn = tf.keras.losses.BinaryCrossentropy(from_logits=True)
    want = [tf.zeros_like(v) for v in model.trainable_variables]
    for i in range(12):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[i:i + 1].reshape(-1, 1), model({k: v[i:i + 1] for k, v in x.items()}))
        g = tape.gradient(loss, model.trainable_variables)
        f = min(1.0, clip / float(tf.sqrt(sum(tf.reduce_sum(t * t) for t in g))))
        want = [a + b * f for a, b in zip(want, g)]
    before = [v.numpy().copy() for v in model.trainable_variables]
    st.step({k: tf.constant(v) for k, v in x.items()}, tf.constant(y.reshape(-1, 1)))
    for b, v, g in zip(before, model.trainable_variables, want):
        np.testing.assert_allclose(b - v.numpy(), lr * g.numpy() / expected_batch, rtol=1e-4, atol=1e-7)
    # not the platform's shape: a trainable layer before the Dense chain
    assert not trainer_mod.supports_fused_dense(_ln_model())


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------
def test_poisson_batches_have_variable_size_with_mean_qn():
    rng = np.random.default_rng(0)
    sizes = [len(i) for i in trainer_mod.batch_indices(1000, 50, 400, "poisson", rng)]
    assert len(sizes) == 400 and len(set(sizes)) > 5
    assert np.mean(sizes) == pytest.approx(50, rel=0.05)


def test_shuffle_batches_are_fixed_and_disjoint_within_an_epoch():
    rng = np.random.default_rng(0)
    batches = list(trainer_mod.batch_indices(103, 10, 20, "shuffle", rng))
    assert all(len(b) == 10 for b in batches)
    epoch = np.concatenate(batches[:10])
    assert len(set(epoch.tolist())) == 100  # 10 batches per epoch, remainder dropped


# ------------------------------------------------------------------------------------------------
# Planning (public inputs only) and flags
# ------------------------------------------------------------------------------------------------
def test_flags_and_calibration_to_the_runs_target():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = trainer_args(p.parse_args([]))
    plan = plan_training(plan_inputs(args, 2000, target_epsilon=3.0))
    assert plan.public["noise_calibrated"] and plan.private
    eps = accounting.epsilon_of_event(plan.event, 1 / 20000, "rdp")
    assert 2.9 <= eps <= 3.0
    # calibrated for the composition with the preprocessing release: more noise than alone
    base = dp_accounting.GaussianDpEvent(8.0)
    plan2 = plan_training(plan_inputs(args, 2000, target_epsilon=3.0, base_event=base))
    assert plan2.public["noise_multiplier"] > plan.public["noise_multiplier"]
    both = accounting.epsilon_of_event(dp_accounting.ComposedDpEvent([base, plan2.event]), 1 / 20000, "rdp")
    assert 2.9 <= both <= 3.0
    args = trainer_args(p.parse_args(["--noise-multiplier", "1.1", "--sampling", "shuffle",
                                      "--batch-size", "100", "--epochs", "2", "--no-mia"]))
    assert args["noise_multiplier"] == 1.1 and args["sampling"] == "shuffle" and args["mia"] is False
    plan = plan_training(plan_inputs(args, 1000, relation="replace_one"))
    assert plan.public["steps"] == 20 and not plan.public["noise_calibrated"]
    assert trainer_args(p.parse_args(["--sampling", "fixed"]))["sampling"] == "shuffle"


def test_plan_uses_the_public_planning_size_only():
    a = {"noise_multiplier": 1.0, "batch_size": 100, "epochs": 2}
    plan = plan_training(plan_inputs(a, 5000))
    assert plan.public["sampling_rate"] == pytest.approx(100 / 5000)
    assert plan.public["steps"] == 100 and plan.public["planning_rows"] == 5000
    assert plan.event == accounting.dp_event(1.0, 100 / 5000, 100, "poisson")


def test_plan_errors():
    with pytest.raises(ValueError, match="not both"):
        plan_training(plan_inputs({"noise_multiplier": 1.0, "batch_size": 10}, 100, target_epsilon=2.0))
    with pytest.raises(ValueError, match="batch_size"):
        plan_training(plan_inputs({"noise_multiplier": 1.0, "batch_size": 500}, 100))
    with pytest.raises(ValueError, match="noise"):
        plan_training(plan_inputs({"noise_multiplier": 0.0, "batch_size": 10}, 100))
    with pytest.raises(ValueError, match="l2_norm_clip"):
        plan_training(plan_inputs({"noise_multiplier": 1.0, "l2_norm_clip": -1, "batch_size": 10}, 100))
    with pytest.raises(ValueError, match="unknown"):
        plan_training(plan_inputs({"noise": 1.0}, 100))
    with pytest.raises(ValueError, match="replace_one"):  # shuffle needs a public n
        plan_training(plan_inputs({"noise_multiplier": 1.0, "batch_size": 10, "sampling": "shuffle"}, 100))
    with pytest.raises(ValueError, match="privacy unit"):
        plan_training(plan_inputs({"noise_multiplier": 1.0, "batch_size": 10}, 100, unit="column:person"))


# ------------------------------------------------------------------------------------------------
# End to end on a tiny synthetic data set
# ------------------------------------------------------------------------------------------------
def test_trains_fast_path_and_reports_what_it_released(tmp_path):
    args = {"noise_multiplier": 0.8, "batch_size": 60, "epochs": 4, "learning_rate": 1.0, "seed": 0}
    plan = plan_training(plan_inputs(args, 600))
    ctx, logs = make_context(tmp_path, args, plan)
    out = DPSGDTrainer().train(ctx)
    assert out.public_details["dp_path"] == "fused_dense"
    assert out.released_event == accounting.dp_event(0.8, 60 / 600, 40, "poisson")
    assert 0.0 <= out.private_details["mia_auc"] <= 1.0
    assert out.private_details["eval_accuracy"] > 0.6  # learned something
    # nothing computed from the rows is in the public details
    assert set(out.public_details) == {"dp_path"}
    assert out.model({"num": np.zeros((2, 4), np.float32),
                      "cat": np.zeros((2, 1), np.int64)}).shape == (2, 1)


def test_sampling_rate_comes_from_the_public_figure_not_the_rows(tmp_path):
    # planned on 6000 rows, trained on 600: batches average 60 * 600 / 6000 = 6 rows
    args = {"noise_multiplier": 1.0, "batch_size": 60, "epochs": 0.1, "seed": 0, "mia": False}
    plan = plan_training(plan_inputs(args, 6000))
    sizes = []
    rng = np.random.default_rng(0)
    for idx in trainer_mod.batch_indices(600, 60, 2000, "poisson", rng, sampling_rate=plan.public["sampling_rate"]):
        sizes.append(idx.size)
    assert np.mean(sizes) == pytest.approx(6.0, rel=0.05)


def _ln_model():
    num = tf.keras.Input(shape=(4,), name="num", dtype=tf.float32)
    cat = tf.keras.Input(shape=(1,), name="cat", dtype=tf.int64)
    x = tf.keras.layers.LayerNormalization()(num)  # trainable, not in TF Privacy's registry
    x = tf.keras.layers.Concatenate()(
        [x, tf.keras.layers.CategoryEncoding(num_tokens=5, output_mode="one_hot")(cat)])
    return tf.keras.Model(inputs={"num": num, "cat": cat}, outputs=tf.keras.layers.Dense(1)(x))


def test_unsupported_layer_falls_back_to_vectorized_optimizer_with_shuffle(tmp_path):
    assert trainer_mod.supports_fast_gradient_clipping(build_model())
    assert not trainer_mod.supports_fast_gradient_clipping(_ln_model())
    args = {"batch_size": 100, "epochs": 2, "sampling": "shuffle", "seed": 1, "mia": False}
    plan = plan_training(plan_inputs(args, 600, relation="replace_one", target_epsilon=5.0, accountant="pld"))
    ctx, _ = make_context(tmp_path, args, plan, builder=_ln_model)
    out = DPSGDTrainer().train(ctx)
    assert out.public_details["dp_path"] == "vectorized_optimizer"
    assert plan.public["steps"] == 12
    sigma = plan.public["noise_multiplier"]
    assert out.released_event == accounting.dp_event(sigma, 100 / 600, 12, "shuffle")
    eps = accounting.epsilon_of_event(out.released_event, 1 / 6000, "pld", relation="replace_one")
    assert eps <= 5.0
    assert "mia_auc" not in out.private_details


class _FakeClock:
    """Advances ``tick`` seconds each time it is read."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


def test_interrupted_run_reports_the_steps_it_released(tmp_path, monkeypatch):
    args = {"noise_multiplier": 1.0, "batch_size": 60, "epochs": 5, "mia": False}
    plan = plan_training(plan_inputs(args, 600))
    monkeypatch.setattr(trainer_mod, "_clock", _FakeClock(1.0))   # a step line every 5 steps
    lines = []

    def log(msg):
        if "step " in msg:
            lines.append(msg)
            if len(lines) == 3:
                raise KeyboardInterrupt
    ctx, _ = make_context(tmp_path, args, plan, log=log)
    with pytest.raises(TrainingInterrupted) as info:
        DPSGDTrainer().train(ctx)
    assert isinstance(info.value.cause, KeyboardInterrupt)
    interrupted_at = int(lines[-1].split("step ")[1].split("/")[0])
    assert 1 < interrupted_at < 50
    assert info.value.released_event == accounting.dp_event(1.0, 0.1, interrupted_at, "poisson")


def test_step_lines_come_at_most_every_few_seconds(tmp_path, monkeypatch):
    # 50 steps of 10 steps per epoch; the clock advances 0.3 s a step: a line per epoch would be one every 3 s.
    clock = _FakeClock(0.3)
    monkeypatch.setattr(trainer_mod, "_clock", clock)
    args = {"noise_multiplier": 1.0, "batch_size": 60, "epochs": 5, "mia": False, "seed": 0}
    plan = plan_training(plan_inputs(args, 600))
    lines = []

    def log(msg):
        if msg.startswith("dp_sgd: step "):
            lines.append((clock.now, msg))
    ctx, _ = make_context(tmp_path, args, plan, log=log)
    DPSGDTrainer().train(ctx)
    assert lines[-1][1].startswith("dp_sgd: step 50/50")   # the last step is always reported
    gaps = [b[0] - a[0] for a, b in zip(lines[:-1], lines[1:-1])]
    assert gaps and all(g >= 5.0 for g in gaps), lines
    assert len(lines) <= 50 * 0.3 / 5.0 + 2


def test_failed_run_before_any_step_released_nothing(tmp_path):
    def broken():
        raise RuntimeError("model construction failed")
    args = {"noise_multiplier": 1.0, "batch_size": 60, "epochs": 1}
    plan = plan_training(plan_inputs(args, 600))
    ctx, _ = make_context(tmp_path, args, plan, builder=broken)
    with pytest.raises(TrainingInterrupted) as info:
        DPSGDTrainer().train(ctx)
    assert isinstance(info.value.released_event, dp_accounting.NoOpDpEvent)


def test_membership_inference_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    z = rng.normal(size=2000)
    res = trainer_mod.membership_inference_auc(z[:1000], y[:1000], z[1000:], y[1000:])
    assert res["mia_auc"] == pytest.approx(0.5, abs=0.05)
    # memorised training rows: confident, correct logits on train, noise on test
    res = trainer_mod.membership_inference_auc((2 * y[:1000] - 1) * 6.0, y[:1000], z[1000:],
                                               y[1000:])
    assert res["mia_auc"] > 0.9
