"""Models for image data sets (``dataset.json`` ``"kind": "image"``), chosen with ``--model``:

``scatternet_linear`` (default)
    ScatterNet features (kymatio 0.3's Keras ``Scattering2D``, J=2: 81 channels of 7x7 for a 28x28 grey image;
    no trainable weights, no data dependence) -> a per-example GroupNorm (27 groups of 3 channels, no affine
    weights: each image is standardised by its own statistics, so it costs no privacy and the whole epsilon goes
    to DP-SGD; Tramèr & Boneh 2021's Fashion-MNIST setting) -> one Dense layer (the logits). Trains on cached
    features on the fused Dense fast path of DP-SGD.
``scatternet_linear_dpnorm``
    the same linear model with the per-channel standardisation of Tramèr & Boneh's ``BN`` option instead of the
    GroupNorm: DP means and variances of the features (``dp_training.preprocessing.release_channel_moments``,
    released and charged by the privacy protocol as its preprocessing release, composed with DP-SGD).
``scatternet_cnn``
    the DP-standardised ScatterNet features (as ``scatternet_linear_dpnorm``) -> Conv2D(16, 3, stride 2) ->
    Conv2D(32, 3) -> Dense(32) -> logits, tanh activations (Tramèr & Boneh 2021's ScatterNet+CNN for MNIST-sized
    images).
``cnn``
    Papernot et al. 2021's end-to-end CNN with tempered sigmoids (tanh) on the pixels: Conv2D(16, 8, stride 2)
    -> MaxPool(2, stride 1) -> Conv2D(32, 4, stride 2) -> MaxPool(2, stride 1) -> Dense(32) -> logits.

The CNNs are plain Keras Conv2D/MaxPool2D/Flatten/Dense layers, so DP-SGD trains them on TF Privacy's fast
gradient clipping path with the Conv2D ghost-norm rule of its layer registry (``dp_training/conv_clipping.py``).

The scattering transform is computed once per data set and cached in the workdir (keyed by the images' content
hash, J, the shape and kymatio's version; it is derived from private rows and is never published). The exported
model contains the scattering layer and takes raw pixels (``image_serving_model``).

Hyper-parameters (``IMAGE_DEFAULTS``): Tramèr & Boneh's published Fashion-MNIST settings (their repository
ftramer/Handcrafted-DP, README: ScatterNet+linear batch 8192, lr 16, ``--input_norm=GroupNorm --num_groups=27``;
CNNs batch 2048, lr 4; 40 epochs, momentum 0.9, clip 0.1), not chosen on the test split.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

MODELS = ("scatternet_linear", "scatternet_linear_dpnorm", "scatternet_cnn", "cnn")
DEFAULT_MODEL = "scatternet_linear"
SCATTERING_J = 2
SCATTERING_KEY = "scattering"     # model input: ScatterNet features [n, channels, h/4, w/4]
PIXELS_KEY = "pixels"             # model input: pixels scaled to [0, 1], [n, h, w, channels]
# Per model: the dp_sgd trainer's defaults (Tramèr & Boneh 2021, Fashion-MNIST; see the module docstring).
IMAGE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "scatternet_linear": {"batch_size": 8192, "learning_rate": 16.0, "epochs": 40, "momentum": 0.9,
                          "l2_norm_clip": 0.1},
    "scatternet_cnn": {"batch_size": 2048, "learning_rate": 4.0, "epochs": 40, "momentum": 0.9, "l2_norm_clip": 0.1},
    "cnn": {"batch_size": 2048, "learning_rate": 4.0, "epochs": 40, "momentum": 0.9, "l2_norm_clip": 0.1},
}
# the same linear model and settings; only the normalisation differs (NORMALIZATION)
IMAGE_DEFAULTS["scatternet_linear_dpnorm"] = dict(IMAGE_DEFAULTS["scatternet_linear"])


# How each model standardises its ScatterNet features: "group_norm" (per example, no privacy cost),
# "dp_channel_moments" (DP per-channel statistics: the privacy protocol's preprocessing release) or None (pixels).
NORMALIZATION: Dict[str, Optional[str]] = {
    "scatternet_linear": "group_norm", "scatternet_linear_dpnorm": "dp_channel_moments",
    "scatternet_cnn": "dp_channel_moments", "cnn": None}
GROUP_NORM_GROUPS = 27        # Tramèr & Boneh's --num_groups for Fashion-MNIST: 3 of the 81 channels per group
GROUP_NORM_EPSILON = 1e-5     # PyTorch's GroupNorm default, as in their code


def check_model(name: str) -> str:
    if name not in MODELS:
        raise ValueError(f"unknown image model {name!r}; pass --model with one of {', '.join(MODELS)}")
    return name


def uses_scattering(model: str) -> bool:
    return model.startswith("scatternet")


def uses_dp_normalization(model: str) -> bool:
    """True when ``model`` standardises with DP per-channel statistics (a preprocessing release of the plan)."""
    return NORMALIZATION[check_model(model)] == "dp_channel_moments"


def scaled_pixels(images: np.ndarray, low: int, high: int) -> np.ndarray:
    """The public transform: uint8 pixels [n, h, w, c] -> float32 in [0, 1] by the declared pixel range."""
    x = (np.asarray(images, np.float32) - float(low)) / float(high - low)
    return np.clip(x, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------------------
# ScatterNet features
# ------------------------------------------------------------------------------------------------------------
SCATTERING_L = 8                  # kymatio's default number of angles


def scattering_channels(shape: Tuple[int, ...], J: int = SCATTERING_J, L: int = SCATTERING_L) -> int:
    """The number of ScatterNet feature channels of ``[h, w, c]`` images (public: from the declared shape):
    ``c`` times kymatio's second-order count ``1 + J L + L^2 J (J - 1) / 2`` (81 for J=2, L=8)."""
    c = int(shape[-1])
    return c * (1 + J * L + L * L * J * (J - 1) // 2)


def scattering_layer(shape: Tuple[int, int], J: int = SCATTERING_J):
    from kymatio.keras import Scattering2D

    return Scattering2D(J=J)   # the Keras frontend takes the shape from its first input


def scatter(pixels, scattering):
    """[n, h, w, c] in [0, 1] -> ScatterNet features [n, c * channels, h / 2^J, w / 2^J] (a TF function)."""
    import tensorflow as tf

    x = tf.transpose(pixels, [0, 3, 1, 2])           # [n, c, h, w]: kymatio scatters the last two axes
    s = scattering(x)                                 # [n, c, K, h', w']
    shape = tf.shape(s)
    return tf.reshape(s, [shape[0], shape[1] * shape[2], shape[3], shape[4]])


def scattering_cache_name(pixels: np.ndarray, J: int = SCATTERING_J) -> str:
    """The cache file's name: J, the shape, kymatio's version and the pixels' content hash."""
    import kymatio

    key = hashlib.sha256(np.ascontiguousarray(pixels, np.float32).tobytes()).hexdigest()[:20]
    return f"scattering-J{J}-{'x'.join(map(str, pixels.shape))}-kymatio{kymatio.__version__}-{key}.npy"


def scattering_features(pixels: np.ndarray, cache_dir: Optional[str], J: int = SCATTERING_J, batch: int = 256,
                        log: Callable[[str], None] = lambda m: None) -> np.ndarray:
    """ScatterNet features of ``pixels`` ([n, h, w, c] float32 in [0, 1]), from ``cache_dir`` when computed
    before (key: content hash of the pixels, J, shape, kymatio's version). ``batch``: images per call; small
    batches keep kymatio's many FFT intermediates in the CPU's caches (256 computed Fashion-MNIST's 70,000 images
    about a quarter faster than 1000 on this 2-core machine)."""
    import tensorflow as tf

    pixels = np.ascontiguousarray(pixels, np.float32)
    name = scattering_cache_name(pixels, J)
    path = os.path.join(cache_dir, name) if cache_dir else None
    if path and os.path.isfile(path):
        log("images: ScatterNet features from the workdir's cache")  # the file name holds n and a content hash
        return np.load(path, mmap_mode="r")
    layer = scattering_layer(pixels.shape[1:3], J)
    fn = tf.function(lambda x: scatter(x, layer),
                     input_signature=[tf.TensorSpec([None] + list(pixels.shape[1:]), tf.float32)])
    out = np.concatenate([fn(pixels[s:s + batch]).numpy() for s in range(0, len(pixels), batch)])
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp.npy"
        np.save(tmp, out)
        os.replace(tmp, path)
        log("images: ScatterNet features computed and cached in the workdir")  # not n: it is private
    return out


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------
def build_image_model(model: str, input_shape: Tuple[int, ...], num_classes: int, channel_stats=None,
                      seed: int = 0):
    """The trainable model over its input (``SCATTERING_KEY`` features or ``PIXELS_KEY`` pixels) -> logits.
    ``channel_stats``: the released DP channel moments (``dp_channel_moments`` models only; ignored otherwise)."""
    import tensorflow as tf

    L = tf.keras.layers
    init = tf.keras.initializers.GlorotUniform
    check_model(model)
    if uses_scattering(model):
        inputs = tf.keras.Input(shape=input_shape, name=SCATTERING_KEY, dtype=tf.float32)
        if NORMALIZATION[model] == "group_norm":
            # per example: each image's channels standardised by that image's own group statistics (no weights)
            x = L.GroupNormalization(groups=GROUP_NORM_GROUPS, axis=1, epsilon=GROUP_NORM_EPSILON, center=False,
                                     scale=False, name="scattering_group_norm")(inputs)
        else:
            k = input_shape[0]
            mean = list(channel_stats.mean) if channel_stats is not None else [0.0] * k
            var = list(channel_stats.variance) if channel_stats is not None else [1.0] * k
            x = L.Normalization(axis=1, mean=mean, variance=var, name="scattering_dp_norm")(inputs)
        if model.startswith("scatternet_linear"):
            x = L.Flatten(name="flatten")(x)
        else:
            x = L.Permute((2, 3, 1), name="channels_last")(x)
            x = L.ZeroPadding2D(1)(x)
            x = L.Conv2D(16, 3, strides=2, activation="tanh", kernel_initializer=init(seed), name="conv_0")(x)
            x = L.ZeroPadding2D(1)(x)
            x = L.Conv2D(32, 3, activation="tanh", kernel_initializer=init(seed + 1), name="conv_1")(x)
            x = L.Flatten(name="flatten")(x)
            x = L.Dense(32, activation="tanh", kernel_initializer=init(seed + 2), name="dense_0")(x)
    else:
        inputs = tf.keras.Input(shape=input_shape, name=PIXELS_KEY, dtype=tf.float32)
        x = L.ZeroPadding2D(2)(inputs)
        x = L.Conv2D(16, 8, strides=2, activation="tanh", kernel_initializer=init(seed), name="conv_0")(x)
        x = L.MaxPool2D(2, strides=1)(x)
        x = L.Conv2D(32, 4, strides=2, activation="tanh", kernel_initializer=init(seed + 1), name="conv_1")(x)
        x = L.MaxPool2D(2, strides=1)(x)
        x = L.Flatten(name="flatten")(x)
        x = L.Dense(32, activation="tanh", kernel_initializer=init(seed + 2), name="dense_0")(x)
    logits = L.Dense(num_classes, kernel_initializer=init(seed + 99), name="logits")(x)
    return tf.keras.Model(inputs=inputs, outputs=logits, name=model)


def image_serving_model(model, model_name: str, shape: Tuple[int, int, int], low: int, high: int):
    """Raw pixels [n, h, w, c] (float32 in the declared pixel range) -> logits: the public scaling, the ScatterNet
    (for the scatternet models) and the trained ``model``, as one Keras model."""
    import tensorflow as tf

    raw = tf.keras.Input(shape=shape, name="image", dtype=tf.float32)
    x = tf.keras.layers.Lambda(lambda t: tf.clip_by_value((t - float(low)) / float(high - low), 0.0, 1.0),
                               name="scale_pixels")(raw)
    if uses_scattering(model_name):
        layer = scattering_layer(shape[:2])
        x = tf.keras.layers.Lambda(lambda t: scatter(t, layer), name="scatternet")(x)
    return tf.keras.Model(raw, model(x), name=f"{model_name}_on_pixels")


# ------------------------------------------------------------------------------------------------------------
# The DP normalisation of ScatterNet features, as the privacy protocol's preprocessing release
# ------------------------------------------------------------------------------------------------------------
class ChannelNormalization:
    """Preprocessing hook of ``dp_training.protocol.run_private_training`` for ScatterNet models: plans one key per
    channel and releases their DP moments (``release_channel_moments``, the same Gaussian mechanism and ledger
    entry as the tabular normalisation)."""

    covers = "the ScatterNet features' per-channel normalisation means and variances"

    def __init__(self, channels: int):
        self.keys = [f"scattering_channel_{i}" for i in range(channels)]
        self.private_details: Dict[str, Any] = {}

    def release(self, plan, train_x: Mapping[str, np.ndarray]):
        from dp_training.preprocessing import release_channel_moments

        # Tramer & Boneh's published treatment: variance = noisy second moment - mean^2, floored (MIN_VARIANCE), no
        # clamp. The earlier standard-deviation clamp (preprocessing.STD_TO_MEAN) was read off Fashion-MNIST's
        # training split, a choice made on private rows outside any guarantee (issue 17.10), so it is not applied.
        stats, details = release_channel_moments(plan, train_x[SCATTERING_KEY])
        self.private_details = details
        return stats


__all__ = ["MODELS", "DEFAULT_MODEL", "IMAGE_DEFAULTS", "image_trainer_args", "run_image_training", "model_inputs", "build_image_model", "image_serving_model",
           "scattering_features", "scattering_channels", "scaled_pixels", "ChannelNormalization", "check_model", "uses_scattering",
           "uses_dp_normalization", "NORMALIZATION", "GROUP_NORM_GROUPS"]


# ------------------------------------------------------------------------------------------------------------
# One private run on image rows (the pipeline's Trainer and the benchmark both call this)
# ------------------------------------------------------------------------------------------------------------
def model_inputs(model: str, pixels: np.ndarray, cache_dir: Optional[str], log=lambda m: None) -> Dict[str, Any]:
    """What ``model`` trains on: cached ScatterNet features or the scaled pixels."""
    if uses_scattering(model):
        return {SCATTERING_KEY: scattering_features(pixels, cache_dir, log=log)}
    return {PIXELS_KEY: np.asarray(pixels, np.float32)}


def image_trainer_args(model: str, args: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The image Trainer's arguments: the model's published defaults (``IMAGE_DEFAULTS``) under the given
    trainer args, where a value equal to the dp_sgd kind's tabular default (``dp_training.trainer.DEFAULTS``,
    e.g. filled in by the command line or a study) counts as not given. Idempotent: the planner
    (``dp_training.planner``) and the Trainer may both apply it."""
    from dp_training.trainer import DEFAULTS

    given = {k: v for k, v in (args or {}).items()
             if v is not None and not (k in IMAGE_DEFAULTS[check_model(model)] and k in DEFAULTS and v == DEFAULTS[k])}
    out = dict(IMAGE_DEFAULTS[model])
    out.update(given)
    return out


def run_image_training(spec, model: str, kind_name: str, kind, trainer_args: Mapping[str, Any],
                       privacy_args: Optional[Mapping[str, Any]], train_pixels: np.ndarray, train_labels,
                       eval_pixels: np.ndarray, eval_labels, scratch_dir: str, cache_dir: Optional[str],
                       log=print, not_covered=(), ledger=None, seed: int = 0):
    """plan -> reserve -> DP channel moments (``dp_channel_moments`` models) -> train -> finish, on pixels scaled
    to [0, 1] (``scaled_pixels``). Returns ``dp_training.protocol.PrivateRunResult``; its ``normalization`` is the
    released ``ChannelStats`` (None for the GroupNorm model and the pixel CNN: nothing released before DP-SGD)."""
    from dp_training.planner import PlanOptions
    from dp_training.protocol import run_private_training

    check_model(model)
    train_x = model_inputs(model, train_pixels, cache_dir, log)
    eval_x = model_inputs(model, eval_pixels, cache_dir, log)
    key = next(iter(train_x))
    input_shape = tuple(train_x[key].shape[1:])
    preprocessing = ChannelNormalization(input_shape[0]) if uses_dp_normalization(model) else _NoPreprocessing()
    built: Dict[str, Any] = {}
    head_only = NORMALIZATION[model] == "group_norm"
    if head_only:
        # The GroupNorm and the Flatten are parameter-free and per example: their output is computed once here
        # and DP-SGD trains the Dense layer on it (the same step as through the whole model, without normalising
        # 8192 x 3969 features at every step); the run returns the whole model (``_NamedModelKind``).
        prefix = fixed_feature_model(build_image_model(model, input_shape, spec.num_classes, None, seed))
        train_x = {NORMALISED_KEY: per_example_features(prefix, train_x[SCATTERING_KEY])}
        eval_x = {NORMALISED_KEY: per_example_features(prefix, eval_x[SCATTERING_KEY])}

    def model_builder(stats):
        built["model"] = build_image_model(model, input_shape, spec.num_classes, stats, seed)
        return dense_head_model(built["model"]) if head_only else built["model"]

    return run_private_training(
        spec, kind_name, trainer_args, privacy_args, train_x, np.asarray(train_labels, np.float32), eval_x,
        np.asarray(eval_labels, np.float32), scratch_dir=scratch_dir,
        kind=_NamedModelKind(kind, model, built), log=log, not_covered=not_covered,
        ledger=ledger, preprocessing=preprocessing, plan_options=PlanOptions(image_model=model),
        model_builder=model_builder)


NORMALISED_KEY = "scattering_normalised"   # the GroupNorm model's Dense input, [n, channels * h' * w']


def fixed_feature_model(model):
    """The parameter-free per-example part of a ScatterNet linear model: its input -> the Dense layer's input."""
    import tensorflow as tf

    return tf.keras.Model(model.inputs, model.get_layer("flatten").output)


def per_example_features(prefix, features: np.ndarray, batch: int = 4096) -> np.ndarray:
    """``prefix`` (``fixed_feature_model``) applied to every row, in chunks: a per-example map, so the chunking
    changes nothing."""
    import tensorflow as tf

    fn = tf.function(lambda x: prefix(x, training=False),
                     input_signature=[tf.TensorSpec((None,) + tuple(features.shape[1:]), tf.float32)])
    return np.concatenate([fn(np.asarray(features[s:s + batch], np.float32)).numpy()
                           for s in range(0, len(features), batch)])


def dense_head_model(model):
    """A model from the Dense layer's input (``NORMALISED_KEY``) to the logits: a copy of ``model``'s Dense layer
    (same initial weights); ``load_head`` puts its trained weights back into ``model``."""
    import tensorflow as tf

    logits = model.get_layer("logits")
    inputs = tf.keras.Input(shape=tuple(model.get_layer("flatten").output.shape[1:]), name=NORMALISED_KEY)
    layer = tf.keras.layers.Dense.from_config(logits.get_config())
    head = tf.keras.Model(inputs, layer(inputs), name=f"{model.name}_head")
    layer.set_weights(logits.get_weights())
    return head


def load_head(model, head):
    """``model`` with the trained weights of its ``dense_head_model``."""
    model.get_layer("logits").set_weights(head.get_layer("logits").get_weights())
    return model


class _NamedModelKind:
    """The trainer kind, plus the image model's name in its public details (privacy.json, training.json); the
    outcome's model is the whole model built for the run (``built["model"]``; the GroupNorm model trains a copy of
    its Dense head, whose weights are loaded back)."""

    def __init__(self, inner, model: str, built: Optional[Dict[str, Any]] = None):
        self.inner, self.model, self.name = inner, model, inner.name
        self.built = built if built is not None else {}

    def config(self, args):
        return self.inner.config(args)

    def plan(self, inputs):
        return self.inner.plan(inputs)

    def train(self, context):
        outcome = self.inner.train(context)
        outcome.public_details["model"] = self.model
        if "model" in self.built and outcome.model is not self.built["model"]:
            outcome.model = load_head(self.built["model"], outcome.model)
        return outcome


class _NoPreprocessing:
    """No preprocessing release: the pixel CNN standardises nothing beyond the public scaling, the GroupNorm
    model standardises each image by its own statistics (inside the model)."""

    keys: Tuple[str, ...] = ()
    covers = None

    def release(self, plan, train_x):
        return None
