"""The image models' privacy-relevant pieces: the multi-class fused Dense DP step equals naive per-example
clipping, the DP channel-moment release is unbiased without noise and bounded per row, the models pick the
expected DP path, and the ScatterNet cache is keyed by content."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dp_training.images import build_image_model, scattering_cache_name, scattering_features
from dp_training.preprocessing import NormalizationPlan, release_channel_moments
from dp_training.trainer import _DPStepper, supports_fused_dense


def _plan(n, bs, clip, sigma=0.0):
    return {"noise_multiplier": sigma, "l2_norm_clip": clip, "learning_rate": 1.0, "args": {"momentum": 0.0},
            "sampling_rate": bs / n, "num_rows": n}


@pytest.mark.parametrize("name", ["scatternet_linear", "scatternet_linear_dpnorm"])
def test_multiclass_fused_dense_step_equals_naive_per_example_clipping(name):
    rng = np.random.default_rng(0)
    n, k = 24, 27
    x = rng.normal(size=(n, k, 3, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=(n, 1)).astype(np.float32)
    model = build_image_model(name, (k, 3, 3), 10, seed=3)
    assert supports_fused_dense(model)
    w0 = [v.numpy().copy() for v in model.trainable_variables]
    clip, expected = 0.05, 16.0
    stepper = _DPStepper(model, "fused_dense", _plan(int(expected * 2), int(expected), clip),
                         {"scattering": tf.TensorSpec((None, k, 3, 3), tf.float32)})
    stepper.step({"scattering": tf.constant(x)}, tf.constant(y))
    fused = [w0[i] - v.numpy() for i, v in enumerate(model.trainable_variables)]   # = clipped sum / expected

    naive_model = build_image_model(name, (k, 3, 3), 10, seed=3)
    total = [np.zeros_like(w) for w in w0]
    clipped_any = False
    for i in range(n):
        with tf.GradientTape() as tape:
            logits = naive_model(x[i:i + 1])
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=[int(y[i, 0])], logits=logits)
        grads = [g.numpy() for g in tape.gradient(loss, naive_model.trainable_variables)]
        norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads))
        clipped_any |= norm > clip
        factor = min(1.0, clip / max(norm, 1e-12))
        total = [t + g * factor for t, g in zip(total, grads)]
    assert clipped_any
    for a, b in zip(fused, total):
        np.testing.assert_allclose(a, b / expected, rtol=1e-4, atol=1e-7)


def _normalised(model, x):
    """The default model's input to its Dense layer (the GroupNorm'd, flattened ScatterNet features)."""
    features = tf.keras.Model(model.inputs, model.get_layer("flatten").output)
    return features(tf.constant(x), training=True).numpy()


def test_the_group_norm_is_per_example_so_other_images_never_change_one_images_features():
    """No privacy cost: an image's normalised features depend on that image only (a batch statistic, e.g. a
    BatchNormalization in training mode, would fail this), and they are its own group-standardised channels."""
    from dp_training.images import GROUP_NORM_GROUPS

    rng = np.random.default_rng(1)
    k = 81
    model = build_image_model("scatternet_linear", (k, 7, 7), 10, seed=0)
    assert not any(layer.trainable_weights for layer in model.layers if layer.name != "logits")
    x = np.abs(rng.normal(size=(6, k, 7, 7))).astype(np.float32) * rng.uniform(0.01, 5.0, size=(6, k, 1, 1))
    other = (np.abs(rng.normal(size=(40, k, 7, 7))) * 50.0).astype(np.float32)   # very different images
    alone = _normalised(model, x[:1])
    in_batch = _normalised(model, x)[:1]
    with_others = _normalised(model, np.concatenate([x[:1], other]))[:1]    # another image added ...
    np.testing.assert_allclose(in_batch, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(with_others, alone, rtol=0, atol=1e-5)     # ... or removed: nothing moves
    groups = x[:1].reshape(1, GROUP_NORM_GROUPS, -1).astype(np.float64)
    expected = (groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(alone, expected.reshape(1, -1), rtol=1e-4, atol=1e-4)


def test_the_cnns_are_plain_conv_layers_on_the_fast_clipping_path():
    from dp_training.trainer import supports_fast_gradient_clipping

    for name, shape in (("scatternet_cnn", (81, 7, 7)), ("cnn", (28, 28, 1))):
        model = build_image_model(name, shape, 10)
        assert not supports_fused_dense(model) and supports_fast_gradient_clipping(model)
        assert any(isinstance(layer, tf.keras.layers.Conv2D) for layer in model.layers)
        assert model(np.zeros((2,) + shape, np.float32)).shape == (2, 10)


def test_multiclass_fast_clipping_step_of_the_cnn_equals_naive_per_example_clipping():
    rng = np.random.default_rng(4)
    n = 6
    x = rng.uniform(0, 1, size=(n, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(n, 1)).astype(np.float32)
    model = build_image_model("cnn", (28, 28, 1), 10, seed=5)
    w0 = [v.numpy().copy() for v in model.trainable_variables]
    clip, expected = 0.01, 4.0
    stepper = _DPStepper(model, "fast_gradient_clipping", _plan(8, int(expected), clip),
                         {"pixels": tf.TensorSpec((None, 28, 28, 1), tf.float32)})
    stepper.step({"pixels": tf.constant(x)}, tf.constant(y))
    fast = [w0[i] - v.numpy() for i, v in enumerate(stepper.train_model.trainable_variables)]
    naive_model = build_image_model("cnn", (28, 28, 1), 10, seed=5)
    total = [np.zeros_like(w) for w in w0]
    for i in range(n):
        with tf.GradientTape() as tape:
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=[int(y[i, 0])], logits=naive_model(x[i:i + 1]))
        grads = [g.numpy() for g in tape.gradient(loss, naive_model.trainable_variables)]
        factor = min(1.0, clip / max(np.sqrt(sum(float(np.sum(g * g)) for g in grads)), 1e-12))
        total = [t + g * factor for t, g in zip(total, grads)]
    for a, b in zip(fast, total):
        np.testing.assert_allclose(a, b / expected, rtol=1e-3, atol=1e-6)


def test_channel_moments_without_noise_are_the_exact_moments():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 0.2, size=(500, 4, 5, 5))
    plan = NormalizationPlan(tuple(f"c{i}" for i in range(4)), 0.0, None)
    stats, details = release_channel_moments(plan, x, rng=np.random.default_rng(0))
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats.variance, x.var(axis=(0, 2, 3)), rtol=1e-6)
    assert details["moments_clipped_rows"] == 0


def test_one_extreme_row_moves_the_released_mean_by_at_most_its_clip_share():
    """A row's moment vectors are clipped to the public norms: one outlier cannot dominate the release."""
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 0.1, size=(1000, 3, 4, 4))
    plan = NormalizationPlan(("a", "b", "c"), 0.0, None)
    base, _ = release_channel_moments(plan, x)
    outlier = np.concatenate([x, np.full((1, 3, 4, 4), 1e6)])
    moved, details = release_channel_moments(plan, outlier)
    assert details["moments_clipped_rows"] == 1
    shift = np.linalg.norm(np.asarray(moved.mean) * 1001 - np.asarray(base.mean) * 1000)
    assert shift <= 1.0 + 1e-9          # the first-moment clip norm (MOMENT_CLIP = 1)


def test_scattering_features_are_cached_by_content(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.uniform(0, 1, size=(4, 28, 28, 1)).astype(np.float32)
    first = np.asarray(scattering_features(pixels, str(tmp_path)))
    assert first.shape == (4, 81, 7, 7)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("scattering-J2-4x28x28x1-")
    again = np.asarray(scattering_features(pixels, str(tmp_path)))
    np.testing.assert_array_equal(first, again)
    other = pixels.copy()
    other[0, 0, 0, 0] = 0.5
    assert scattering_cache_name(other) != files[0].name    # different content, different key
    assert scattering_cache_name(pixels, J=3) != files[0].name


def test_the_group_norm_models_dense_head_on_precomputed_features_takes_the_whole_models_step():
    """The image Trainer computes the GroupNorm'd features once and trains the Dense head on them: one DP step
    (no noise) there moves the weights exactly as the same step through the whole model."""
    from dp_training.images import NORMALISED_KEY, dense_head_model, fixed_feature_model, load_head, \
        per_example_features

    rng = np.random.default_rng(2)
    n, k = 32, 27
    x = (np.abs(rng.normal(size=(n, k, 3, 3))) * rng.uniform(0.1, 3.0, size=(n, 1, 1, 1))).astype(np.float32)
    y = rng.integers(0, 10, size=(n, 1)).astype(np.float32)
    whole = build_image_model("scatternet_linear", (k, 3, 3), 10, seed=3)
    stepper = _DPStepper(whole, "fused_dense", _plan(64, 32, 0.05), {"scattering": tf.TensorSpec((None, k, 3, 3),
                                                                                                  tf.float32)})
    stepper.step({"scattering": tf.constant(x)}, tf.constant(y))

    other = build_image_model("scatternet_linear", (k, 3, 3), 10, seed=3)
    head = dense_head_model(other)
    feats = per_example_features(fixed_feature_model(other), x, batch=5)   # chunked: a per-example map
    step = _DPStepper(head, "fused_dense", _plan(64, 32, 0.05), {NORMALISED_KEY: tf.TensorSpec(
        (None, feats.shape[1]), tf.float32)})
    step.step({NORMALISED_KEY: tf.constant(feats)}, tf.constant(y))
    load_head(other, head)
    moved = [np.abs(a.numpy() - b).max() for a, b in zip(whole.trainable_variables,
             [v.numpy() for v in build_image_model("scatternet_linear", (k, 3, 3), 10, seed=3).trainable_variables])]
    assert max(moved) > 1e-4                                   # the step did move the weights
    for a, b in zip(whole.trainable_variables, other.trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_the_image_run_returns_the_whole_group_norm_model_with_the_trained_head(tmp_path):
    """run_image_training trains the head on precomputed features but returns the whole model (ScatterNet
    features in): it scores the eval images as the Trainer's own evaluation did, and nothing was released before
    DP-SGD."""
    import os

    from core.dataset import load_dataset
    from dp_training.images import image_trainer_args, run_image_training, scattering_features
    from dp_training.ledger import Ledger
    from dp_training.trainer import DPSGDTrainer
    from pipeline.config import PROJECT_ROOT

    spec = load_dataset(os.path.join(PROJECT_ROOT, "data", "fashion_mnist"))
    rng = np.random.default_rng(0)
    labels = np.arange(96) % 10
    pixels = (rng.random((96, 28, 28, 1)) * (0.2 + labels[:, None, None, None] / 12)).astype(np.float32)
    args = image_trainer_args("scatternet_linear", {"seed": 0, "mia": False, "epochs": 3, "batch_size": 32,
                                                    "learning_rate": 2.0, "noise_multiplier": 0.5})
    result = run_image_training(spec, "scatternet_linear", "dp_sgd", DPSGDTrainer(), args,
                                {"delta": 1e-5}, pixels[:64], labels[:64], pixels[64:],
                                labels[64:], scratch_dir=str(tmp_path / "scratch"), cache_dir=None,
                                log=lambda m: None, ledger=Ledger(str(tmp_path / "ledger.sqlite")))
    model = result.outcome.model
    assert model.input_names == ["scattering"] and model.get_layer("scattering_group_norm") is not None
    assert result.normalization is None and [m.covers for m in result.guarantee.mechanisms] == [
        "the model's trained weights"]
    logits = model(np.asarray(scattering_features(pixels[64:], None)), training=False).numpy()
    accuracy = float((logits.argmax(1) == labels[64:]).mean())
    assert accuracy == pytest.approx(result.outcome.private_details["eval_accuracy"], abs=1e-9)
    initial = build_image_model("scatternet_linear", (81, 7, 7), 10, seed=0).get_layer("logits").get_weights()[0]
    assert np.abs(model.get_layer("logits").get_weights()[0] - initial).max() > 1e-3   # the trained weights
