"""Ghost clipping for Conv2D (dp_training.conv_clipping): the registry rule's per-example norms equal naive
per-example gradients, through TF Privacy's own fast-clipping code, and the trainer's fast path uses it."""
import numpy as np
import pytest

from dp_training import conv_clipping
from dp_training import trainer as trainer_mod
from dp_training.contract import TrainerContext
from dp_training.trainer import DPSGDTrainer, plan_training

from tests.dp_training.synthetic import plan_inputs

tf = pytest.importorskip("tensorflow")
from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads  # noqa: E402

RTOL = 1e-5


def _naive_norms(model, loss_fn, x, y, variables=None):
    """Per-example gradient norms, one example at a time with tf.GradientTape."""
    variables = variables if variables is not None else model.trainable_variables
    out = []
    for i in range(x.shape[0]):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(y[i:i + 1], model(x[i:i + 1], training=True)))
        g = tape.gradient(loss, variables)
        out.append(np.sqrt(sum(np.sum(np.square(t.numpy().astype(np.float64))) for t in g)))
    return np.array(out)


def _sparse_ce():
    return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


# ------------------------------------------------------------------------------------------------
# The rule alone: a model whose only trainable layer is one Conv2D
# ------------------------------------------------------------------------------------------------
CONV_CONFIGS = {
    "s1-same-bias-tanh-c3": dict(filters=4, kernel_size=3, strides=1, padding="same", activation="tanh",
                                 in_shape=(9, 10, 3)),
    "s2-same-nobias-relu": dict(filters=5, kernel_size=3, strides=2, padding="same", activation="relu",
                                use_bias=False, in_shape=(11, 9, 2)),
    "s2-valid-bias-linear": dict(filters=3, kernel_size=4, strides=2, padding="valid", activation=None,
                                 in_shape=(12, 12, 3)),
    "s21-valid-rect-c1": dict(filters=6, kernel_size=(3, 2), strides=(2, 1), padding="valid", activation="tanh",
                              in_shape=(10, 7, 1)),
    "s1-same-dilation2": dict(filters=3, kernel_size=3, strides=1, padding="same", activation="tanh",
                              dilation_rate=2, in_shape=(9, 9, 2)),
}


def _conv_only_model(cfg, seed):
    cfg = dict(cfg)
    in_shape = cfg.pop("in_shape")
    tf.random.set_seed(seed)
    inp = tf.keras.Input(in_shape)
    conv = tf.keras.layers.Conv2D(bias_initializer="random_normal", **cfg)
    h = tf.keras.layers.Flatten()(conv(inp))
    head = tf.keras.layers.Dense(3, trainable=False)   # frozen: every norm below is the conv's alone
    return tf.keras.Model(inp, head(h)), conv, in_shape


@pytest.mark.parametrize("method", ["ghost", "direct", "auto"])
@pytest.mark.parametrize("name", sorted(CONV_CONFIGS))
def test_conv_rule_matches_naive_per_example_norms(name, method):
    model, conv, in_shape = _conv_only_model(CONV_CONFIGS[name], seed=1)
    assert [v.name for v in model.trainable_variables] == [v.name for v in conv.trainable_variables]
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(6,) + in_shape).astype(np.float32))
    y = tf.constant(rng.integers(0, 3, size=6))
    loss = _sparse_ce()
    got = clip_grads.compute_gradient_norms(model, conv_clipping.make_layer_registry(method), x, y,
                                            per_example_loss_fn=lambda yt, yp, w: loss(yt, yp))
    want = _naive_norms(model, loss, x, y)
    assert np.all(want > 0)
    np.testing.assert_allclose(got.numpy(), want, rtol=RTOL)


def test_registry_function_returns_the_layer_output_and_norms_of_any_upstream_gradient():
    """Directly on the registry contract: outputs == layer(x) with its activation, and for an arbitrary
    gradient G at the pre-activation, sqr_norm_fn(G) == per-example ||d<Z_i, G_i>/d(kernel, bias)||^2."""
    model, conv, in_shape = _conv_only_model(CONV_CONFIGS["s2-same-nobias-relu"] | {"use_bias": True}, seed=3)
    x = tf.constant(np.random.default_rng(4).normal(size=(5,) + in_shape).astype(np.float32))
    for method in ("ghost", "direct"):
        tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)
        with tape:
            z, outputs, sqr_norm_fn = conv_clipping.conv2d_layer_computation(conv, (x,), {}, tape, method=method)
        np.testing.assert_allclose(outputs.numpy(), conv(x).numpy(), rtol=1e-6, atol=1e-6)
        assert conv.activation is tf.keras.activations.relu   # restored
        g = tf.constant(np.random.default_rng(5).normal(size=z.shape).astype(np.float32))
        want = []
        for i in range(5):
            with tf.GradientTape() as t:
                zi = conv.convolution_op(x[i:i + 1], conv.kernel) + conv.bias
                s = tf.reduce_sum(zi * g[i:i + 1])
            want.append(sum(float(tf.reduce_sum(v * v)) for v in t.gradient(s, [conv.kernel, conv.bias])))
        np.testing.assert_allclose(sqr_norm_fn(g).numpy(), want, rtol=RTOL)


def test_microbatched_norms_are_norms_of_the_microbatch_mean_gradient():
    model, conv, in_shape = _conv_only_model(CONV_CONFIGS["s1-same-bias-tanh-c3"], seed=6)
    rng = np.random.default_rng(7)
    x = tf.constant(rng.normal(size=(6,) + in_shape).astype(np.float32))
    y = tf.constant(rng.integers(0, 3, size=6))
    loss = _sparse_ce()
    got = clip_grads.compute_gradient_norms(model, conv_clipping.make_layer_registry(), x, y, num_microbatches=3,
                                            per_example_loss_fn=lambda yt, yp, w: loss(yt, yp))
    want = []
    for m in range(3):
        with tf.GradientTape() as tape:
            mean_loss = tf.reduce_mean(loss(y[2 * m:2 * m + 2], model(x[2 * m:2 * m + 2])))
        g = tape.gradient(mean_loss, model.trainable_variables)
        want.append(np.sqrt(sum(float(tf.reduce_sum(t * t)) for t in g)))
    np.testing.assert_allclose(got.numpy(), want, rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# Papernot et al.'s tempered-sigmoid CNN, end to end through TF Privacy's clipping functions
# ------------------------------------------------------------------------------------------------
def papernot_cnn(classes=10, pool=tf.keras.layers.MaxPool2D, inputs=None):
    inp = inputs if inputs is not None else tf.keras.Input((28, 28, 1))
    h = tf.keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="tanh")(inp)
    h = pool(2, 1)(h)
    h = tf.keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation="tanh")(h)
    h = pool(2, 1)(h)
    h = tf.keras.layers.Flatten()(h)
    h = tf.keras.layers.Dense(32, activation="tanh")(h)
    return tf.keras.Model(inp, tf.keras.layers.Dense(classes)(h))


def test_bu_et_al_choice_per_layer_on_the_papernot_cnn():
    # conv1: T = 14*14, p = 8*8*1, d = 16 -> 2T^2 >> p d -> direct; conv2: T = 5*5, p = 4*4*16, d = 32 -> ghost
    assert conv_clipping.choose_method(14 * 14, 64, 16) == "direct"
    assert conv_clipping.choose_method(5 * 5, 256, 32) == "ghost"
    assert conv_clipping.choose_method(None, 256, 32) == "direct"


def test_papernot_cnn_norms_and_clipped_gradients_match_naive():
    tf.random.set_seed(8)
    model = papernot_cnn()
    assert trainer_mod.supports_fast_gradient_clipping(model)
    rng = np.random.default_rng(9)
    x = tf.constant(rng.random(size=(8, 28, 28, 1)).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, size=8))
    loss = _sparse_ce()
    registry = conv_clipping.make_layer_registry()
    got = clip_grads.compute_gradient_norms(model, registry, x, y,
                                            per_example_loss_fn=lambda yt, yp, w: loss(yt, yp))
    want = _naive_norms(model, loss, x, y)
    np.testing.assert_allclose(got.numpy(), want, rtol=RTOL)

    # the clipped sum (TF Privacy's compute_clipped_gradients_and_outputs), with a clip between the norms
    clip = float(np.median(want))
    model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.SUM))
    grads, _, _ = clip_grads.compute_clipped_gradients_and_outputs(model, clip, registry, x, y)
    naive = [np.zeros(v.shape, np.float64) for v in model.trainable_variables]
    for i in range(8):
        with tf.GradientTape() as tape:
            li = tf.reduce_sum(loss(y[i:i + 1], model(x[i:i + 1])))
        f = min(1.0, clip / want[i])
        naive = [a + f * g.numpy() for a, g in zip(naive, tape.gradient(li, model.trainable_variables))]
    for g, n in zip(grads, naive):
        np.testing.assert_allclose(g.numpy(), n, rtol=RTOL, atol=RTOL * np.abs(n).max())


# ------------------------------------------------------------------------------------------------
# The trainer: CNNs take the fast path, which computes the same clipped step as the vectorized path
# ------------------------------------------------------------------------------------------------
def _binary_cnn():
    img = tf.keras.Input((12, 12, 1), name="image")
    h = tf.keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="tanh")(img)
    h = tf.keras.layers.AveragePooling2D(2, 1)(h)
    h = tf.keras.layers.Flatten()(h)
    return tf.keras.Model({"image": img}, tf.keras.layers.Dense(1)(h))


def _image_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.random(size=(n, 12, 12, 1)).astype(np.float32)
    y = (x[:, :6].mean(axis=(1, 2, 3)) > x[:, 6:].mean(axis=(1, 2, 3))).astype(np.float32)
    return x, y


def test_dp_step_fast_path_equals_vectorized_path_clipped_sum():
    lr, n, expected_batch = 0.5, 400, 40
    specs = {"image": tf.TensorSpec((None, 12, 12, 1), tf.float32)}
    x, y = _image_data(16, seed=10)
    xt, yt = {"image": tf.constant(x)}, tf.constant(y.reshape(-1, 1))
    tf.random.set_seed(11)
    base = _binary_cnn()
    assert trainer_mod.supports_fast_gradient_clipping(base) and not trainer_mod.supports_fused_dense(base)
    init = [v.numpy().copy() for v in base.trainable_variables]
    norms = _naive_norms(lambda xx, training: base({"image": xx}, training=training),
                         tf.keras.losses.BinaryCrossentropy(from_logits=True, reduction="none"),
                         xt["image"], yt, base.trainable_variables)
    clip = float(np.median(norms))   # some examples are clipped, some are not
    plan = {"noise_multiplier": 0.0, "l2_norm_clip": clip, "learning_rate": lr, "args": {"momentum": 0.0},
            "sampling_rate": expected_batch / n, "num_rows": n}
    updates = {}
    for path in ("fast_gradient_clipping", "vectorized_optimizer"):
        for v, w in zip(base.trainable_variables, init):
            v.assign(w)
        st = trainer_mod._DPStepper(base, path, plan, specs)
        st.step(xt, yt)
        updates[path] = [w - v.numpy() for v, w in zip(base.trainable_variables, init)]
    for f, v in zip(updates["fast_gradient_clipping"], updates["vectorized_optimizer"]):
        np.testing.assert_allclose(f, v, rtol=RTOL, atol=RTOL * np.abs(v).max())
        assert np.abs(v).max() > 0


def test_conv_configs_outside_the_rule_fall_back_and_say_why():
    img = tf.keras.Input((8, 8, 4), name="image")
    h = tf.keras.layers.Conv2D(4, 3, groups=2, name="grouped")(img)
    model = tf.keras.Model({"image": img}, tf.keras.layers.Dense(1)(tf.keras.layers.Flatten()(h)))
    assert not trainer_mod.supports_fast_gradient_clipping(model)
    assert conv_clipping.unsupported_layers(model) == [
        "Conv2D layer 'grouped' uses groups=2; only groups=1 is supported"]
    with pytest.raises(NotImplementedError, match="groups=2"):
        conv_clipping.conv2d_layer_computation(model.get_layer("grouped"), (tf.zeros((1, 8, 8, 4)),), {},
                                               tf.GradientTape())
    # Conv2DTranspose subclasses Conv2D but is another class: not taken for a Conv2D by the registry
    t = tf.keras.Input((4, 4, 1))
    tm = tf.keras.Model(t, tf.keras.layers.Conv2DTranspose(2, 3)(t))
    assert "Conv2DTranspose" in conv_clipping.unsupported_layers(tm)[0]


def test_trainer_trains_a_cnn_on_the_fast_path_under_auto(tmp_path):
    args = {"noise_multiplier": 0.8, "batch_size": 40, "epochs": 2, "learning_rate": 1.0, "seed": 0,
            "mia": False}
    plan = plan_training(plan_inputs(args, 400))
    assert plan.internal["args"]["dp_path"] == "auto"
    xtr, ytr = _image_data(400, 12)
    xev, yev = _image_data(100, 13)
    ctx = TrainerContext(dataset_name="synthetic", train_features={"image": xtr}, train_labels=ytr,
                         eval_features={"image": xev}, eval_labels=yev, build_model=_binary_cnn, args=args,
                         plan=plan, scratch_dir=str(tmp_path), log=lambda m: None)
    out = DPSGDTrainer().train(ctx)
    assert out.public_details == {"dp_path": "fast_gradient_clipping"}
    assert np.isfinite(out.private_details["eval_loss"])


def test_a_layer_called_twice_is_refused_because_the_per_call_rules_would_under_estimate_its_norm():
    """Attack: one Conv2D applied twice (shared weights). TF Privacy's registry computes one norm per call, so the
    per-example norm of the summed gradient is under-estimated and clipping to C would not bound it. The model must
    therefore not take the fast path."""
    tf.random.set_seed(3)
    inp = tf.keras.Input((8, 8, 2))
    shared = tf.keras.layers.Conv2D(2, 3, padding="same", activation="tanh", name="shared")
    h = tf.keras.layers.Flatten()(shared(shared(inp)))
    model = tf.keras.Model(inp, tf.keras.layers.Dense(3, trainable=False)(h))
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(6, 8, 8, 2)).astype(np.float32))
    y = tf.constant(rng.integers(0, 3, size=6))
    loss = _sparse_ce()
    per_call = clip_grads.compute_gradient_norms(model, conv_clipping.make_layer_registry(), x, y,
                                                 per_example_loss_fn=lambda yt, yp, w: loss(yt, yp)).numpy()
    true = _naive_norms(model, loss, x, y)
    assert np.any(np.abs(per_call - true) > 1e-3 * true)  # the per-call rule is wrong here: refusing is required
    assert any("called 2 times" in r for r in conv_clipping.unsupported_layers(model))
    assert not trainer_mod.supports_fast_gradient_clipping(model)
