"""The dp_sgd trainer: what it trains, and that its accounting describes what really happened."""
import argparse
import dataclasses

import numpy as np
import pytest

from tests.dp_training.synthetic import build_model, make_context, make_data

from dp_training import accounting  # noqa: E402
from dp_training import trainer as trainer_mod  # noqa: E402
from dp_training.ledger import BudgetExceededError, PrivacyLedger  # noqa: E402
from dp_training.trainer import DPSGDTrainer, add_arguments, plan_training, trainer_args  # noqa

tf = pytest.importorskip("tensorflow")


def _ledger_runs(workdir, fp="fp-synthetic"):
    return PrivacyLedger(str(workdir)).history(fp)[0]["runs"]


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


@pytest.mark.parametrize("path", ["fast_gradient_clipping", "vectorized_optimizer"])
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


@pytest.mark.parametrize("path", ["fast_gradient_clipping", "vectorized_optimizer"])
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
# Planning and flags
# ------------------------------------------------------------------------------------------------
def test_flags_and_default_target_epsilon():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = trainer_args(p.parse_args([]))
    plan = plan_training(dict(args, accountant="rdp"), 2000)
    assert plan["target_epsilon"] == 3.0 and plan["calibrated"]
    assert 2.9 <= plan["planned_epsilon"] <= 3.0
    assert plan["delta"] == pytest.approx(1 / 20000)
    args = trainer_args(p.parse_args(["--noise-multiplier", "1.1", "--sampling", "shuffle",
                                      "--accountant", "rdp", "--batch-size", "100",
                                      "--epochs", "2", "--no-mia", "--budget-epsilon", "8"]))
    assert args["noise_multiplier"] == 1.1 and args["sampling"] == "shuffle"
    assert args["mia"] is False and args["budget_epsilon"] == 8.0
    plan = plan_training(args, 1000)
    assert plan["steps"] == 20 and not plan["calibrated"]
    assert trainer_args(p.parse_args(["--sampling", "fixed"]))["sampling"] == "shuffle"


def test_plan_errors_and_delta_warning():
    with pytest.raises(ValueError, match="not both"):
        plan_training({"noise_multiplier": 1.0, "target_epsilon": 2.0, "batch_size": 10}, 100)
    with pytest.raises(ValueError, match="batch_size"):
        plan_training({"noise_multiplier": 1.0, "batch_size": 500}, 100)
    with pytest.raises(ValueError, match="noise_multiplier"):
        plan_training({"noise_multiplier": 0.0, "batch_size": 10}, 100)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        plan_training({"noise_multiplier": 1.0, "l2_norm_clip": -1, "batch_size": 10}, 100)
    with pytest.raises(ValueError, match="unknown"):
        plan_training({"noise": 1.0}, 100)
    plan = plan_training({"noise_multiplier": 1.0, "delta": 0.02, "batch_size": 10}, 100)
    assert plan["warnings"] and "1/n" in plan["warnings"][0]


# ------------------------------------------------------------------------------------------------
# End to end on a tiny synthetic data set
# ------------------------------------------------------------------------------------------------
def test_trains_fast_path_and_epsilon_matches_accounting(tmp_path):
    ctx, logs = make_context(tmp_path, {"noise_multiplier": 0.8, "batch_size": 60, "epochs": 4,
                                        "learning_rate": 1.0, "accountant": "rdp", "seed": 0})
    out = DPSGDTrainer().train(ctx)
    p = out.privacy
    assert out.details["dp_path"] == "fast_gradient_clipping"
    assert p["steps"] == 40
    assert p["epsilon"] == pytest.approx(accounting.compute_epsilon(
        0.8, 60 / 600, 40, 1 / 6000, "rdp", "poisson"), rel=1e-12)
    for key in ("epsilon", "delta", "accountant", "noise_multiplier", "l2_norm_clip",
                "sampling_rate", "sampling_method", "steps", "epochs", "train_rows"):
        assert key in p
    assert p["train_rows"] == 600 and p["sampling"] == "poisson"
    assert 0.0 <= p["mia_auc"] <= 1.0
    assert out.details["eval_accuracy"] > 0.6  # learned something
    runs = _ledger_runs(tmp_path)
    assert runs[0]["status"] == "completed" and runs[0]["steps"] == 40
    assert runs[0]["epsilon"] == pytest.approx(p["epsilon"])
    # the returned model is the plain functional model from build_model (exportable)
    assert out.model({"num": np.zeros((2, 4), np.float32),
                      "cat": np.zeros((2, 1), np.int64)}).shape == (2, 1)


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
    ctx, _ = make_context(tmp_path, {"target_epsilon": 5.0, "batch_size": 100, "epochs": 2,
                                     "sampling": "shuffle", "accountant": "pld", "seed": 1,
                                     "mia": False}, builder=_ln_model)
    out = DPSGDTrainer().train(ctx)
    p = out.privacy
    assert out.details["dp_path"] == "vectorized_optimizer"
    assert p["steps"] == 12 and p["epochs"] == 2
    assert "no amplification" in p["sampling_method"]
    assert p["epsilon"] <= 5.0
    assert p["epsilon"] == pytest.approx(accounting.compute_epsilon(
        p["noise_multiplier"], 100 / 600, 12, p["delta"], "pld", "shuffle"), rel=1e-9)
    assert "mia_auc" not in p


def test_budget_refused_before_training(tmp_path):
    built = []

    def builder():
        built.append(1)
        return build_model()

    led = PrivacyLedger(str(tmp_path))
    led.set_budget("fp-synthetic", 0.5, 1e-4, accountant="rdp")
    ctx, _ = make_context(tmp_path, {"noise_multiplier": 0.8, "batch_size": 60, "epochs": 4,
                                     "accountant": "rdp"}, builder=builder)
    with pytest.raises(BudgetExceededError, match="remaining"):
        DPSGDTrainer().train(ctx)
    assert built == []  # nothing was trained
    assert PrivacyLedger(str(tmp_path)).history("fp-synthetic")[0]["runs"] == []


def test_budget_flag_sets_budget_and_composes_runs(tmp_path):
    args = {"noise_multiplier": 2.0, "batch_size": 60, "epochs": 1, "accountant": "rdp",
            "budget_epsilon": 2.0, "mia": False}
    for _ in range(2):
        ctx, _ = make_context(tmp_path, args)
        out = DPSGDTrainer().train(ctx)
    one = out.privacy["epsilon"]
    spend = PrivacyLedger(str(tmp_path)).spent("fp-synthetic")
    assert out.privacy["ledger_budget_epsilon"] == 2.0
    assert one < spend.epsilon < 2 * one + 1e-9
    ctx, _ = make_context(tmp_path, dict(args, budget_epsilon=50.0))
    with pytest.raises(ValueError, match="already has a privacy budget"):
        DPSGDTrainer().train(ctx)


def test_interrupted_run_records_steps_done(tmp_path):
    ctx, logs = make_context(tmp_path, {"noise_multiplier": 1.0, "batch_size": 60, "epochs": 5,
                                        "accountant": "rdp", "mia": False})

    def log(msg):
        if "step 20/" in msg:
            raise KeyboardInterrupt
    ctx = dataclasses.replace(ctx, log=log)
    with pytest.raises(KeyboardInterrupt):
        DPSGDTrainer().train(ctx)
    run = _ledger_runs(tmp_path)[0]
    assert run["status"] == "cancelled" and run["steps"] == 20
    assert run["epsilon"] == pytest.approx(accounting.compute_epsilon(
        1.0, 0.1, 20, 1 / 6000, "rdp"))


def test_failed_run_before_any_step_spends_nothing(tmp_path):
    def broken():
        raise RuntimeError("model construction failed")
    ctx, _ = make_context(tmp_path, {"noise_multiplier": 1.0, "batch_size": 60, "epochs": 1,
                                     "accountant": "rdp"}, builder=broken)
    with pytest.raises(RuntimeError):
        DPSGDTrainer().train(ctx)
    run = _ledger_runs(tmp_path)[0]
    assert run["status"] == "failed" and run["steps"] == 0 and run["epsilon"] == 0.0
    assert "model construction failed" in run["extra"]["error"]


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
