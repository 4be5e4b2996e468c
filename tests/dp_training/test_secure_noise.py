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
    def no_noise(self, tensors, stddev, words):
        return [tf.zeros_like(t) for t in tensors]

    monkeypatch.setattr(secure_noise.GaussianNoise, "like", no_noise)
    a, b = _train_twice(tmp_path)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _draw(noise, shapes, std):
    total = sum(int(np.prod(t.shape)) for t in shapes)
    return noise.like(shapes, std, noise.words(total))


def test_noise_is_gaussian_with_the_stated_std_and_fresh_every_call():
    from scipy import stats

    noise = secure_noise.GaussianNoise()
    shapes = [tf.zeros([200, 500]), tf.zeros([51])]          # an odd total: the last pair is cut
    first, second = _draw(noise, shapes, 3.0), _draw(noise, shapes, 3.0)
    assert [t.shape for t in first] == [(200, 500), (51,)]
    z = np.concatenate([np.ravel(t) for t in first]) / 3.0
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(float(z.mean())) < 0.01 and float(z.std()) == pytest.approx(1.0, rel=0.01)
    assert float(stats.kurtosis(z)) == pytest.approx(0.0, abs=0.05)           # Gaussian tails, not uniform sums
    assert not np.any(np.asarray(first[0]) == np.asarray(second[0]))
    with pytest.raises(TypeError, match="secret"):
        pickle.dumps(noise)
    assert "AES-256-CTR" in repr(noise)
    # the Philox key block of the stateless form (DP-FedAvg): the same block gives the same noise, a fresh one not
    block = secure_noise.fresh_key_block()
    assert block.shape == secure_noise.KEY_BLOCK_SHAPE and secure_noise.SECRET_BITS == 768
    same = [secure_noise.stateless_gaussian_like(shapes, 1.0, block) for _ in range(2)]
    np.testing.assert_array_equal(same[0][0], same[1][0])
    other = secure_noise.stateless_gaussian_like(shapes, 1.0, secure_noise.fresh_key_block())
    zs = np.concatenate([np.ravel(t) for t in other])
    assert not np.any(np.asarray(other[0]) == np.asarray(same[0][0])) and stats.kstest(zs, "norm").pvalue > 1e-3
    assert str(int(block[0, 0])) not in repr(noise)


def test_the_noise_is_the_aes_256_ctr_keystream_through_box_muller(monkeypatch):
    """Recomputed independently: OpenSSL's AES-256-CTR keystream under the key ``fresh_aes_key`` returned, read as
    little-endian 32-bit words, through Box-Muller in float64 NumPy; the sum over the four draws, halved. The
    DP-SGD noise is that keystream and nothing else (TensorFlow's RNG and the seed play no part)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key, counter = bytes(range(32)), bytes(range(100, 116))
    monkeypatch.setattr(secure_noise, "fresh_aes_key", lambda: (key, counter))
    tf.random.set_seed(11)
    noise = secure_noise.GaussianNoise()
    shapes = [tf.zeros([3, 5]), tf.zeros([4])]                 # 19 values: 10 pairs per draw
    got = [np.concatenate([np.ravel(t) for t in _draw(noise, shapes, 2.0)]) for _ in range(2)]

    stream = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    for call in range(2):
        w = np.frombuffer(stream.update(bytes(4 * 4 * 2 * 10)), "<u4").reshape(4, 2, 10).astype(np.float64)
        u = (np.floor(w / 512) + 0.5) / 2 ** 23
        r, t = np.sqrt(-2 * np.log(u[:, 0])), 2 * np.pi * u[:, 1]
        z = np.concatenate([r * np.cos(t), r * np.sin(t)], axis=1)[:, :19]
        np.testing.assert_allclose(got[call], 2.0 * z.sum(axis=0) / 2, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[0], got[1])                     # the counter moved on: fresh bits every call


def test_box_muller_is_finite_at_the_extreme_words():
    words = np.array([[[0, 0xFFFFFFFF, 0x80], [0, 0xFFFFFFFF, 0x40000000]]], np.uint32)
    z = np.asarray(secure_noise.normals_from_bits(tf.constant(words)))
    assert np.all(np.isfinite(z)) and np.abs(z).max() < 5.8 and np.abs(z).max() > 5.7


def test_every_uniform_is_an_exact_midpoint_strictly_inside_zero_one():
    """Each word's uniform is (k + 1/2) 2^-23, exact in float32, for all 2^23 values of k: with the angle word 0
    (cos t = 1) the first normal is the radius, checked against float64 (with 24 bits, half the midpoints
    rounded and the top words gave u = 1.0, radius 0)."""
    k = np.arange(2 ** 23, dtype=np.uint32)
    for low in (0, 0x1FF):                                             # the low 9 bits play no part
        words = np.stack([(k << 9) | low, np.zeros_like(k)])[None]       # [1, 2, 2^23]
        r = np.asarray(secure_noise.normals_from_bits(tf.constant(words)))[0, :2 ** 23].astype(np.float64)
        want = np.sqrt(-2 * np.log((k.astype(np.float64) + 0.5) / 2 ** 23))
        np.testing.assert_allclose(r, want, rtol=2e-6, atol=2e-7)
        assert r.min() > 2e-4 and r.max() < 5.77


def test_the_words_must_match_the_values_they_noise():
    noise = secure_noise.GaussianNoise()
    shapes = [tf.zeros([3, 5])]
    with pytest.raises(ValueError, match=r"words\(15\)"):
        noise.like(shapes, 1.0, noise.words(18))


def test_key_appears_in_nothing_the_run_writes(tmp_path, monkeypatch):
    blocks, whole = [], []
    real = secure_noise.fresh_aes_key

    def spy():
        key, counter = real()
        blocks.append(np.frombuffer(key + counter, np.int64))   # 6 words: the scan's forms of each
        whole.extend([key, counter, key + counter])              # base64 / hex of the whole key
        return key, counter

    monkeypatch.setattr(secure_noise, "fresh_aes_key", spy)
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
    assert find(blocks, str(tmp_path), [str(m) for m in logs], whole) == []


def test_the_secret_scan_finds_the_key_in_each_written_form(tmp_path):
    """The scan the tests above rely on: a key written as hex, base64 or in chunks is found; other bytes are not."""
    import base64
    import struct

    key, counter = secure_noise.fresh_aes_key()
    block = np.frombuffer(key + counter, np.int64)
    for i, text in enumerate([key.hex(), key.hex().upper(), base64.b64encode(key).decode(),
                              base64.urlsafe_b64encode(counter).decode(), str(int(block[2])),
                              f"0x{struct.unpack('<Q', key[8:16])[0]:x}"]):
        (tmp_path / f"f{i}.txt").write_text(f"prefix {text} suffix")
        assert find([block], str(tmp_path), whole=[key, counter]), text
        (tmp_path / f"f{i}.txt").unlink()
    (tmp_path / "other.bin").write_bytes(secure_noise.fresh_aes_key()[0])
    assert find([block], str(tmp_path), whole=[key, counter]) == []
