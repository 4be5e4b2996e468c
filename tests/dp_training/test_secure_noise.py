"""DP-SGD's noise is keyed from OS entropy (``dp_training.secure_noise``, issue 17 item 7): the run's seed and
TensorFlow's global seed never reach it, two same-seed runs differ only by it, and its key appears in nothing the
run writes."""
import json
import pickle

import numpy as np
import pytest

from dp_training import secure_noise
from dp_training import trainer as trainer_mod
from dp_training.trainer import DPSGDTrainer, plan_training
from tests.dp_training.synthetic import make_context, make_data, plan_inputs
from tests.secret_scan import find

tf = pytest.importorskip("tensorflow")

PATHS = ["fused_dense", "fast_gradient_clipping", "vectorized_optimizer"]


def _linear_model():
    num = tf.keras.Input(shape=(4,), name="num", dtype=tf.float32)
    out = tf.keras.layers.Dense(1, kernel_initializer="glorot_uniform")(num)
    return tf.keras.Model(inputs={"num": num}, outputs=out)


def _seeded_stepper(path, sigma=2.0, clip=0.5, n=400, expected_batch=40):
    tf.random.set_seed(3)   # a public (or 32-bit) seed: fixed TensorFlow's noise before the fix
    model = _linear_model()
    plan = {"noise_multiplier": sigma, "l2_norm_clip": clip, "learning_rate": 1.0,
            "args": {"momentum": 0.0}, "sampling_rate": expected_batch / n, "num_rows": n}
    return model, trainer_mod._DPStepper(model, path, plan, {"num": tf.TensorSpec((None, 4), tf.float32)})


@pytest.mark.parametrize("path", PATHS)
def test_tensorflow_global_seed_does_not_fix_the_noise(path):
    """Old code: every path drew with tf.random.normal, so the same global seed gave the same noise."""
    x, y = make_data(8, seed=6)
    xt, yt = {"num": tf.constant(x["num"])}, tf.constant(y.reshape(-1, 1))
    moved = []
    for _ in range(2):
        model, st = _seeded_stepper(path)
        w0 = [v.numpy().copy() for v in model.trainable_variables]
        st.noise_step()
        st.step(xt, yt)
        moved.append(np.concatenate([(v.numpy() - w).ravel() for v, w in zip(model.trainable_variables, w0)]))
    assert np.abs(moved[0] - moved[1]).max() > 1e-3, f"{path}: two same-seed steppers drew the same noise"


def _seeded_model():
    """The synthetic model with seeded initializers (unseeded Keras initializers ignore TensorFlow's global seed)."""
    num = tf.keras.Input(shape=(4,), name="num", dtype=tf.float32)
    cat = tf.keras.Input(shape=(1,), name="cat", dtype=tf.int64)
    x = tf.keras.layers.Concatenate()([num, tf.keras.layers.CategoryEncoding(5, output_mode="one_hot")(cat)])
    x = tf.keras.layers.Dense(8, activation="relu", kernel_initializer=tf.keras.initializers.GlorotUniform(1))(x)
    out = tf.keras.layers.Dense(1, kernel_initializer=tf.keras.initializers.GlorotUniform(2))(x)
    return tf.keras.Model(inputs={"num": num, "cat": cat}, outputs=out)


def _train_twice(tmp_path):
    args = {"noise_multiplier": 1.0, "batch_size": 60, "epochs": 2, "learning_rate": 1.0, "seed": 7, "mia": False}
    plan = plan_training(plan_inputs(args, 600))
    out = []
    for i in range(2):
        ctx, _ = make_context(tmp_path / str(i), args, plan, builder=_seeded_model)
        out.append(np.concatenate([np.ravel(w) for w in DPSGDTrainer().train(ctx).model.get_weights()]))
    return out


def test_same_seed_runs_differ_by_the_noise_alone(tmp_path, monkeypatch):
    """Same data, same seed, same initial weights: without the noise the two runs are identical (the batches come
    from the seed), with it they differ. Old code: the seed fixed the noise too, so the runs were identical."""
    a, b = _train_twice(tmp_path)
    assert np.abs(a - b).max() > 1e-3, "two runs with the same seed drew the same noise"
    def no_noise(self, tensors, stddev):
        return [tf.zeros_like(t) for t in tensors]

    monkeypatch.setattr(secure_noise.GaussianNoise, "like", no_noise)
    a, b = _train_twice(tmp_path)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_noise_is_gaussian_with_the_stated_std_and_fresh_every_call():
    noise = secure_noise.GaussianNoise()
    shapes = [tf.zeros([200, 100]), tf.zeros([50])]
    first, second = noise.like(shapes, 3.0), noise.like(shapes, 3.0)
    assert [t.shape for t in first] == [(200, 100), (50,)]
    z = np.concatenate([np.ravel(t) for t in first])
    assert abs(float(z.mean())) < 0.05 and float(z.std()) == pytest.approx(3.0, rel=0.02)
    assert not np.any(np.asarray(first[0]) == np.asarray(second[0]))
    block = secure_noise.fresh_key_block()
    assert block.shape == secure_noise.KEY_BLOCK_SHAPE and secure_noise.SECRET_BITS == 768
    same = [secure_noise.stateless_gaussian_like(shapes, 1.0, block) for _ in range(2)]
    np.testing.assert_array_equal(same[0][0], same[1][0])
    with pytest.raises(TypeError, match="secret"):
        pickle.dumps(noise)
    assert "Philox" in repr(noise) and str(int(block[0, 0])) not in repr(noise)


def test_key_appears_in_nothing_the_run_writes(tmp_path, monkeypatch):
    blocks = []
    real = secure_noise.fresh_key_block

    def spy():
        blocks.append(real())
        return blocks[-1]

    monkeypatch.setattr(secure_noise, "fresh_key_block", spy)
    args = {"noise_multiplier": 1.0, "batch_size": 60, "epochs": 1, "seed": 0, "mia": True}
    plan = plan_training(plan_inputs(args, 600))
    ctx, logs = make_context(tmp_path / "scratch", args, plan)
    out = DPSGDTrainer().train(ctx)
    assert len(blocks) == 1
    tf.saved_model.save(out.model, str(tmp_path / "model"))
    out.model.save(str(tmp_path / "model.keras"))
    with open(tmp_path / "details.json", "w", encoding="utf-8") as f:
        json.dump({"public": out.public_details, "private": out.private_details, "plan_public": plan.public,
                   "plan_internal": plan.internal, "event": repr(out.released_event)}, f, default=str)
    assert find(blocks, str(tmp_path), [str(m) for m in logs]) == []
