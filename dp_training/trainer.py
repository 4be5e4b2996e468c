"""The ``dp_sgd`` trainer kind: DP-SGD with TF Privacy. It plans its event from public inputs, trains, and
reports the event it released; the pipeline's executor owns the ledger and the guarantee (``dp_training.contract``).

Code paths (``details['dp_path']``):

``fast_gradient_clipping``
    TF Privacy's ``DPModel`` (``tensorflow_privacy.privacy.keras_models.dp_keras_model``) with
    ``dp_training.conv_clipping.make_layer_registry()``: TF Privacy's default layer registry (Dense,
    Embedding) plus Conv2D (ghost clipping for convolutions, registered through TF Privacy's registry API):
    per-example gradient norms are computed with the "ghost norm" trick, without materialising per-example
    gradients. Used when every layer with trainable weights is registered (our models: Dense / Conv2D layers
    plus parameter-free CategoryEncoding/Concatenate/pooling/Flatten) and the model is functional.
``vectorized_optimizer``
    Otherwise TF Privacy's ``VectorizedDPKerasSGDOptimizer`` (per-example Jacobian + clip).

What the accounting assumes, and how the trainer makes it true
--------------------------------------------------------------
* Per-example clipping to ``l2_norm_clip`` (C); Gaussian noise of std ``noise_multiplier * C``
  added once to the *sum* of clipped gradients per step (TF Privacy does this in both paths).
* ``sampling="poisson"``: every step draws a fresh batch that includes each training row
  independently with probability ``q = batch_size / N`` where ``N`` is the data set's *public* planning
  size (``public_row_estimate`` under add/remove-one; the exact count under replace-one, where it is
  public), so q, the number of steps and delta never depend on the private row count. Batch sizes vary,
  and may be 0 (an empty batch still releases a noise-only step). The noisy sum is divided by the
  nominal expected batch size ``q * N = batch_size``, a public constant, never by the realised batch
  size (dividing by the realised size would make the update depend on a non-private count). For the fast path this is done by using a SUM
  loss reduction (so TF Privacy adds noise of std ``sigma * C`` to the clipped sum) and a learning
  rate ``lr / (q n)``, which for (momentum) SGD is exactly the same update as dividing the gradient;
  for the vectorized path the optimizer's mean over the realised batch is rescaled by
  ``B_t / (q n)``, exactly undoing it.
* ``sampling="shuffle"``: each epoch is a fresh permutation cut into ``n // batch_size`` batches of
  exactly ``batch_size`` rows (the remainder is dropped); accounted with no amplification (one
  Gaussian release per epoch), see ``dp_training.sgd_events``. Only under replace-one (n public, so
  the batch layout is the same for neighbours; the sensitivity is 2C, which the accountant applies).
* The epsilon returned is computed from the steps actually run.

Not covered by the guarantee, so kept in the private details (the workdir), never published: the
membership-inference AUC (computed on raw training rows), timings, losses, empty-batch counts.

The noise: every path clips with its own code (fused, TF Privacy's fast clipping, TF Privacy's vectorized
optimizer with its noise set to 0) and adds noise drawn by ``dp_training.secure_noise.GaussianNoise``: the sum
of four normals per value from AES-256-CTR keyed with 256 bits from ``secrets`` (Opacus' secure_mode), held in
process memory only, never from TensorFlow's process RNG nor from ``seed``. Caveat: floating-point effects of
sampling a Gaussian.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from typing import Any, ClassVar, Dict, Mapping, Optional

import numpy as np

from dp_training import sgd_events as accounting, calibration, events, secure_noise
from dp_training.progress import RateLimitedLog
from dp_training.contract import (ArgumentError, KindConfig, PlanInputs, TrainerContext, TrainerKind, TrainingInterrupted,
                                  TrainingOutcome, TrainingPlan, parse_bool, parse_choice, parse_number, parse_whole)

DEFAULT_TARGET_EPSILON = 3.0
DEFAULTS: Dict[str, Any] = {
    "noise_multiplier": None,        # None: calibrate to the run's target epsilon
    # Published, data-independent defaults (issue 17.10): Tramer & Boneh 2021's DP-SGD recipe (ftramer/
    # Handcrafted-DP README: end-to-end models, batch 2048, lr 4, momentum 0.9, clip 0.1, 40 epochs; the same as
    # dp_training.images.IMAGE_DEFAULTS["cnn"]), never chosen on a data set's rows (docs/dp_training.md).
    "l2_norm_clip": 0.1,
    "batch_size": None,              # None: 2048, or a tenth of the public planning size when that is smaller
    "epochs": 40,
    "learning_rate": 4.0,
    "momentum": 0.9,
    "sampling": "poisson",
    "dp_path": "auto",               # auto | fast_gradient_clipping | vectorized_optimizer
    "seed": None,                    # tests only: reproducible batches (never the noise)
    "mia": True,
    "mia_max_rows": 10000,
}
# The clock of the step lines' rate limit (a test replaces it with a fake one).
_clock = time.monotonic
DP_PATHS = ("auto", "fused_dense", "fast_gradient_clipping", "vectorized_optimizer")
DEFAULT_BATCH_SIZE = 2048


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the dp_sgd trainer's flags to ``privtrain run`` (the run's privacy flags are the pipeline's)."""
    g = parser.add_argument_group("dp_sgd trainer (differentially private SGD)")
    g.add_argument("--noise-multiplier", type=float, default=None,
                   help="Gaussian noise std / clip norm (default: calibrated to --target-epsilon).")
    g.add_argument("--l2-norm-clip", type=float, default=DEFAULTS["l2_norm_clip"],
                   help="per-example gradient L2 clip norm (default %(default)s).")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"expected (poisson) or exact (shuffle) batch size (default {DEFAULT_BATCH_SIZE}, or a "
                        "tenth of the data set's public planning size when that is smaller).")
    g.add_argument("--epochs", type=float, default=DEFAULTS["epochs"],
                   help="passes over the data's public planning size (default %(default)s).")
    g.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"],
                   help="SGD learning rate (default %(default)s).")
    g.add_argument("--momentum", type=float, default=DEFAULTS["momentum"],
                   help="SGD momentum (default %(default)s).")
    # "fixed" is accepted too: the federated trainer uses that name for fixed-size sampling and
    # the pipeline's CLI declares a shared flag once; for dp_sgd it means "shuffle".
    g.add_argument("--sampling", choices=accounting.SAMPLINGS + ("fixed",),
                   default=DEFAULTS["sampling"],
                   help="poisson: amplified, variable-size batches; shuffle (dp_sgd) / fixed: "
                        "fixed-size shuffled batches, accounted without amplification, only under "
                        "replace-one (default %(default)s).")
    g.add_argument("--dp-path", choices=DP_PATHS, default="auto",
                   help="force a DP code path (default: fast gradient clipping when supported).")
    g.add_argument("--no-mia", action="store_true",
                   help="skip the post-training membership inference check (private, workdir only).")


def trainer_args(namespace: argparse.Namespace) -> Dict[str, Any]:
    """The trainer-args dict from parsed ``add_arguments`` flags."""
    out = dict(DEFAULTS)
    for key in ("noise_multiplier", "l2_norm_clip", "batch_size", "epochs", "learning_rate", "momentum",
                "sampling", "dp_path"):
        if getattr(namespace, key, None) is not None:
            out[key] = getattr(namespace, key)
    if out["sampling"] == "fixed":
        out["sampling"] = "shuffle"
    if getattr(namespace, "no_mia", False):
        out["mia"] = False
    return out


# ------------------------------------------------------------------------------------------------
# The kind's typed config (parsed and validated once: command line, study TOML and Python alike)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DPSGDConfig(KindConfig):
    """The dp_sgd arguments, typed (``DEFAULTS`` documents them). ``noise_multiplier`` None (or ``"auto"``):
    calibrated to the run's target epsilon; a number (also a numeric string) must be > 0. Always private."""

    kind: ClassVar[str] = "dp_sgd"
    noise_multiplier: Optional[float] = DEFAULTS["noise_multiplier"]
    l2_norm_clip: float = DEFAULTS["l2_norm_clip"]
    batch_size: Optional[int] = DEFAULTS["batch_size"]
    epochs: float = DEFAULTS["epochs"]
    learning_rate: float = DEFAULTS["learning_rate"]
    momentum: float = DEFAULTS["momentum"]
    sampling: str = DEFAULTS["sampling"]
    dp_path: str = DEFAULTS["dp_path"]
    seed: Optional[int] = DEFAULTS["seed"]
    mia: bool = DEFAULTS["mia"]
    mia_max_rows: int = DEFAULTS["mia_max_rows"]

    def __post_init__(self):
        k = self.kind
        z = self.noise_multiplier
        if isinstance(z, str) and z.strip().lower() == "auto":
            z = None
        if z is not None:
            z = parse_number(k, "noise_multiplier", z, minimum=0.0)
            if z == 0:
                raise ArgumentError("noise_multiplier 0 gives no privacy (epsilon = inf); use a non-private trainer "
                                 "(with --allow-non-private if the data set has a budget) or pass a positive noise "
                                 "multiplier / a target epsilon.")
        self._set("noise_multiplier", z)
        self._set("l2_norm_clip", parse_number(k, "l2_norm_clip", self.l2_norm_clip, above=0.0))
        if self.batch_size is not None:
            self._set("batch_size", parse_whole(k, "batch_size", self.batch_size, minimum=1))
        self._set("epochs", parse_number(k, "epochs", self.epochs, above=0.0))
        self._set("learning_rate", parse_number(k, "learning_rate", self.learning_rate, above=0.0))
        self._set("momentum", parse_number(k, "momentum", self.momentum, minimum=0.0))
        sampling = "shuffle" if self.sampling == "fixed" else self.sampling
        self._set("sampling", parse_choice(k, "sampling", sampling, accounting.SAMPLINGS))
        self._set("dp_path", parse_choice(k, "dp_path", self.dp_path, DP_PATHS))
        if self.seed is not None:
            self._set("seed", parse_whole(k, "seed", self.seed))
        self._set("mia", parse_bool(k, "mia", self.mia))
        self._set("mia_max_rows", parse_whole(k, "mia_max_rows", self.mia_max_rows, minimum=1))

    @property
    def private(self) -> bool:
        return True

    @property
    def noise_given(self) -> bool:
        return self.noise_multiplier is not None


# ------------------------------------------------------------------------------------------------
# Planning (public inputs only)
# ------------------------------------------------------------------------------------------------
def plan_training(inputs: PlanInputs) -> TrainingPlan:
    """q, steps and the noise multiplier from public inputs (calibrated so that the run's whole release,
    ``inputs.base_event`` plus DP-SGD, meets ``inputs.target_epsilon``)."""
    config = DPSGDConfig.parse(inputs.config if inputs.config is not None else inputs.args)
    a = config.to_args()
    n = int(inputs.planning_rows)
    if n <= 0:
        raise ValueError("the data set's public planning size is 0; dp_sgd needs at least one training row.")
    bs = a["batch_size"]
    if bs is None:
        bs = max(1, min(DEFAULT_BATCH_SIZE, n // 10))
    if isinstance(bs, bool) or int(bs) != bs or bs < 1:
        raise ValueError(f"batch_size must be a positive integer, got {bs!r}.")
    bs = int(bs)
    if bs > n:
        raise ValueError(f"batch_size {bs} exceeds the data set's planning size of {n} rows; pass "
                         f"--batch-size <= {n}.")
    if not a["epochs"] or float(a["epochs"]) <= 0:
        raise ValueError(f"epochs must be > 0, got {a['epochs']!r}.")
    clip = accounting._check_number("l2_norm_clip", a["l2_norm_clip"], "pass e.g. 1.0.")
    if not clip > 0 or math.isinf(clip):
        raise ValueError(f"l2_norm_clip must be a finite number > 0, got {a['l2_norm_clip']!r}; "
                         "pass e.g. --l2-norm-clip 1.0.")
    lr = accounting._check_number("learning_rate", a["learning_rate"], "pass e.g. 0.5.")
    if not lr > 0:
        raise ValueError(f"learning_rate must be > 0, got {a['learning_rate']!r}.")
    if a["dp_path"] not in DP_PATHS:
        raise ValueError(f"dp_path must be one of {DP_PATHS}, got {a['dp_path']!r}.")
    accounting.validate_parameters(0.0, 1.0, 0, None, inputs.accountant, a["sampling"])
    if inputs.source.unit != "row":
        raise ValueError(f"dp_sgd accounts per training row, but this data set's privacy unit is "
                         f"{inputs.source.unit!r}; use --trainer federated with --partition "
                         f"{inputs.source.unit} (one client per {inputs.source.unit_name}).")
    if a["sampling"] == "shuffle" and inputs.relation != events.REPLACE_ONE:
        raise ValueError("--sampling shuffle is accounted per epoch with a fixed batch layout, which needs the "
                         "number of rows to be public (relation replace_one); under add_or_remove_one use "
                         "--sampling poisson.")

    q = bs / n
    epochs = float(a["epochs"])
    if a["sampling"] == "poisson":
        steps_per_epoch = n / bs
        steps = max(1, int(round(epochs * n / bs)))
    else:
        steps_per_epoch = n // bs
        if not float(epochs).is_integer():
            raise ValueError(f"with --sampling shuffle, epochs must be a whole number (got {epochs}).")
        steps = int(epochs) * steps_per_epoch

    sigma = a["noise_multiplier"]
    target = inputs.target_epsilon
    calibrated = False
    if sigma is not None and target is not None:
        raise ValueError("give either --noise-multiplier or --target-epsilon, not both "
                         f"(got {sigma!r} and {target!r}).")
    if sigma is None:
        target = DEFAULT_TARGET_EPSILON if target is None else target
        sigma = calibration.calibrate_noise_multiplier(
            target, q, steps, inputs.delta, inputs.accountant, a["sampling"], relation=inputs.relation,
            base_event=inputs.base_event)
        calibrated = True
    else:
        accounting.validate_parameters(sigma, q, steps, inputs.delta)
        if float(sigma) <= 0:
            raise ValueError("noise_multiplier 0 gives no privacy (epsilon = inf); use a "
                             "non-private trainer (with --allow-non-private if the data set has a "
                             "budget) or pass a positive noise multiplier / a target epsilon.")
    sigma = float(sigma)
    # shuffle: one Gaussian per epoch actually run (epochs x (n // bs) steps, a fresh permutation each)
    event = accounting.dp_event(sigma, q, steps, a["sampling"],
                                per_epoch=None if a["sampling"] == "poisson" else steps_per_epoch)
    mechanism = ("DP-SGD, Poisson-sampled Gaussian per step" if a["sampling"] == "poisson"
                 else "DP-SGD, one Gaussian per epoch (shuffled fixed batches, no amplification)")
    public = {"noise_multiplier": sigma, "l2_norm_clip": float(clip), "sampling": a["sampling"],
              "sampling_rate": q, "steps": steps, "epochs": epochs, "expected_batch_size": bs,
              "planning_rows": n, "learning_rate": float(lr), "momentum": float(a["momentum"] or 0.0),
              "optimizer": "SGD", "noise_calibrated": calibrated,
              "gradient_normalization": "noisy clipped sum divided by the nominal expected batch size"}
    internal = {"args": a, "num_rows": n, "batch_size": bs, "sampling_rate": q, "steps": steps,
                "steps_per_epoch": steps_per_epoch, "noise_multiplier": sigma, "l2_norm_clip": float(clip),
                "learning_rate": float(lr)}
    notes = ()
    if a["seed"] is not None:  # tests and benchmarks: the batches are reproducible from the seed
        notes = ("a seed was given: the batches are reproducible from it (the noise is not: it is keyed from OS "
                 "entropy); the guarantee holds only while the seed stays secret (it is not published)",)
    return TrainingPlan(event=event, private=config.private, mechanism=mechanism, public=public, internal=internal,
                        notes=notes)


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, steps: int, sampling: str,
                  rng: np.random.Generator, sampling_rate: Optional[float] = None):
    """Yields one index array per step: Poisson (rate ``sampling_rate``, default batch_size/n) or shuffled
    fixed batches."""
    if sampling == "poisson":
        q = batch_size / n if sampling_rate is None else float(sampling_rate)
        for _ in range(steps):
            yield np.flatnonzero(rng.random(n) < q)
    else:
        per_epoch = n // batch_size
        done = 0
        while done < steps:
            perm = rng.permutation(n)
            for b in range(per_epoch):
                if done >= steps:
                    break
                yield perm[b * batch_size:(b + 1) * batch_size]
                done += 1


# ------------------------------------------------------------------------------------------------
# The DP step functions
# ------------------------------------------------------------------------------------------------
def supports_fast_gradient_clipping(model) -> bool:
    """True when fast gradient clipping (TF Privacy's registry + Conv2D, ``dp_training.conv_clipping``) covers
    every trainable layer of ``model``."""
    from tensorflow_privacy.privacy.fast_gradient_clipping import gradient_clipping_utils as gcu
    from dp_training import conv_clipping
    return bool(not conv_clipping.unsupported_layers(model) and gcu.has_internal_compute_graph(model))


def dense_head(model):
    """``(feature_fn, dense_layers)`` when ``model`` is a parameter-free feature map followed by a chain of Dense
    layers (ReLU or linear) ending in the logits (one: binary; several: multi-class, e.g. a linear head on
    ScatterNet features) — else None. ``feature_fn(x)`` computes
    the first Dense layer's input."""
    import tensorflow as tf

    dense = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)]
    if not dense or any(layer.trainable_weights for layer in model.layers
                        if not isinstance(layer, tf.keras.layers.Dense)):
        return None
    for prev, layer in zip(dense, dense[1:]):
        if layer.input is not prev.output:
            return None
    if model.outputs[0] is not dense[-1].output:
        return None
    if any(layer.activation not in (tf.keras.activations.relu, tf.keras.activations.linear) or not layer.use_bias
           for layer in dense):
        return None
    first_input = dense[0].input
    names = [getattr(t, "name", "").split(":")[0] for t in model.inputs]
    if any(first_input is t for t in model.inputs):
        key = model.input_names[[i for i, t in enumerate(model.inputs) if t is first_input][0]]
        return (lambda x: x[key]), dense
    features = tf.keras.Model(model.inputs, first_input)
    del names
    return (lambda x: features(x, training=False)), dense


def num_outputs(model) -> int:
    """1: one logit (binary label, sigmoid cross-entropy); k > 1: k logits (labels 0..k-1, softmax cross-entropy)."""
    return int(model.outputs[0].shape[-1])


def per_example_loss(tf, logits, y):
    """Per-example cross-entropy: sigmoid for one logit, softmax (labels are class ids in y[:, 0]) otherwise."""
    if logits.shape[-1] == 1:
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)[:, 0]
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y[:, 0], tf.int32), logits=logits)


def supports_fused_dense(model) -> bool:
    return dense_head(model) is not None


class _DPStepper:
    """Builds the DP step of one path; ``step(x, y)`` and ``noise_step()`` apply one update."""

    def __init__(self, base_model, path: str, plan: Dict[str, Any], feature_specs):
        import tensorflow as tf
        self.tf = tf
        self.path = path
        sigma = plan["noise_multiplier"]
        clip = plan["l2_norm_clip"]
        lr = plan["learning_rate"]
        mom = float(plan["args"]["momentum"] or 0.0)
        self.expected_batch = float(plan["sampling_rate"] * plan["num_rows"])
        self.sigma, self.clip = sigma, clip
        # Every path clips with its own code but draws its noise here: AES-256-CTR keyed from `secrets`
        # (dp_training.secure_noise), never TensorFlow's process RNG (32-bit seeded, or the public seed). The
        # random words are drawn on the host per step and enter the traced step as one input (`words`).
        noise = secure_noise.GaussianNoise()
        head = dense_head(base_model) if path == "fused_dense" else None
        # the words of one step: exactly the values the path noises (fused: the Dense chain; else every trainable
        # variable, which TF Privacy's DPModel shares with base_model); `like` refuses any other count
        noised = ([v for layer in head[1] for v in (layer.kernel, layer.bias)] if head
                  else base_model.trainable_variables)
        total = sum(int(v.shape.num_elements()) for v in noised)
        self._words = lambda: noise.words(total)
        words_spec = tf.TensorSpec(secure_noise.words_shape(total), tf.uint32)
        label_spec = tf.TensorSpec([None, 1], tf.float32)
        if path == "fused_dense":
            # Per-example gradients of a Dense chain are outer products a_i (x) d_i (layer input, gradient at the
            # layer's pre-activation): one forward and one backward pass to the pre-activations give every
            # per-example norm (||a_i||^2 ||d_i||^2 + ||d_i||^2 per layer) and the clipped sum A^T diag(c) D
            # directly, with no second backward pass (the "ghost" trick of fast gradient clipping, fused).
            feature_fn, dense = head
            self.train_model = base_model
            # The 1 / (expected batch size) normalisation is folded into the learning rate (SGD with momentum is
            # linear in the gradient): the step adds N(0, (sigma C)^2) to the clipped sum and applies it.
            self.optimizer = tf.keras.optimizers.SGD(learning_rate=lr / self.expected_batch, momentum=mom)
            variables = noised
            std = sigma * clip

            def fused_step(x, y, words):
                a = feature_fn(x)
                inputs, pre = [], []
                with tf.GradientTape() as tape:
                    h = a
                    for layer in dense:
                        inputs.append(h)
                        z = tf.nn.bias_add(tf.matmul(h, layer.kernel), layer.bias)
                        pre.append(z)
                        h = layer.activation(z)
                    per_example = per_example_loss(tf, h, y)
                    total = tf.reduce_sum(per_example)
                deltas = tape.gradient(total, pre)
                # squared per-example norm: sum over layers of (||a_i||^2 + 1) ||d_i||^2 (kernel and bias)
                sq = tf.add_n([(tf.reduce_sum(tf.square(ai), axis=1) + 1.0) * tf.reduce_sum(tf.square(di), axis=1)
                               for ai, di in zip(inputs, deltas)])
                factor = tf.expand_dims(clip * tf.math.rsqrt(tf.maximum(sq, clip * clip)), 1)  # min(1, C/||g||)
                grads = []
                for ai, di in zip(inputs, deltas):
                    cd = di * factor
                    grads += [tf.matmul(ai, cd, transpose_a=True), tf.reduce_sum(cd, axis=0)]
                self.optimizer.apply_gradients(zip([g + z for g, z in zip(grads, noise.like(grads, std, words))],
                                                   variables))
                return {"loss": tf.reduce_mean(per_example)}

            self._step = tf.function(fused_step, input_signature=[feature_specs, label_spec, words_spec])
            self._noise_scale = 1.0  # the optimizer's lr already divides by the expected batch
            self._variables = variables
        elif path == "fast_gradient_clipping":
            from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads
            from tensorflow_privacy.privacy.keras_models import dp_keras_model
            from dp_training import conv_clipping
            registry = conv_clipping.make_layer_registry()
            # TF Privacy's DPModel with noise 0 is only the clipping model (its train_step would draw the noise
            # with tf.random.normal): the step below clips with TF Privacy's fast (ghost) clipping and adds ours.
            self.train_model = dp_keras_model.DPModel(
                l2_norm_clip=clip, noise_multiplier=0.0, layer_registry=registry, use_xla=False,
                inputs=base_model.inputs, outputs=base_model.outputs)
            if not self.train_model._enable_fast_peg_computation:  # pylint: disable=protected-access
                raise RuntimeError("TF Privacy's DPModel did not enable fast gradient clipping.")
            # SUM reduction: the clipped gradients are the *sum* over the batch, N(0, (sigma C)^2) is added to
            # it; the 1 / (expected batch size) normalisation is folded into the learning rate.
            self.optimizer = tf.keras.optimizers.SGD(learning_rate=lr / self.expected_batch,
                                                     momentum=mom)
            loss_cls = (tf.keras.losses.BinaryCrossentropy if num_outputs(base_model) == 1
                        else tf.keras.losses.SparseCategoricalCrossentropy)
            sum_loss = loss_cls(from_logits=True, reduction=tf.keras.losses.Reduction.SUM)
            self.train_model.compile(optimizer=self.optimizer, loss=sum_loss)
            dp_model, opt, std = self.train_model, self.optimizer, sigma * clip

            def fgc_step(x, y, words):
                clipped, _, clipped_loss = clip_grads.compute_clipped_gradients_and_outputs(
                    input_model=dp_model, l2_norm_clip=clip, layer_registry=registry, x_batch=x, y_batch=y,
                    clipping_loss=sum_loss)
                clipped = list(clipped)
                opt.apply_gradients(zip([g + z for g, z in zip(clipped, noise.like(clipped, std, words))],
                                        dp_model.trainable_variables))
                return {"loss": clipped_loss}

            self._step = tf.function(fgc_step, input_signature=[feature_specs, label_spec, words_spec])
            self._noise_scale = 1.0  # the optimizer's lr already divides by the expected batch
        else:
            from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras_vectorized as dpv
            self.train_model = base_model
            # noise 0: TF Privacy's optimizer only clips (its own noise would be tf.random.normal); ours is added
            self.optimizer = dpv.VectorizedDPKerasSGDOptimizer(
                l2_norm_clip=clip, noise_multiplier=0.0, num_microbatches=None,
                learning_rate=lr, momentum=mom)
            model, opt, expected, std = base_model, self.optimizer, self.expected_batch, sigma * clip

            def vec_step(x, y, words):
                with tf.GradientTape() as tape:
                    logits = model(x, training=True)
                    per_example = per_example_loss(tf, logits, y)
                # TF Privacy: (sum of clipped grads) / B_t ...
                gv = opt._compute_gradients(  # pylint: disable=protected-access
                    per_example, model.trainable_variables, tape=tape)
                # ... rescaled to (sum + N(0, (sigma C)^2)) / (q n): divide by the expected batch size.
                b = tf.cast(tf.shape(y)[0], tf.float32)
                grads = [g * b for g, _ in gv]
                noisy = [(g + z) / expected for g, z in zip(grads, noise.like(grads, std, words))]
                opt.apply_gradients([(g, v) for g, (_, v) in zip(noisy, gv)])
                return {"loss": tf.reduce_mean(per_example)}

            self._step = tf.function(vec_step, input_signature=[feature_specs, label_spec, words_spec])
            self._noise_scale = 1.0 / self.expected_batch

        variables = getattr(self, "_variables", None) or self.train_model.trainable_variables
        noise_scale = self._noise_scale
        std = sigma * clip
        optimizer = self.optimizer

        def noise_step(words):
            grads = noise.like(variables, std, words) if noise_scale == 1.0 else [
                z * noise_scale for z in noise.like(variables, std, words)]
            optimizer.apply_gradients(zip(grads, variables))
            return tf.constant(0.0)

        self._noise_step = tf.function(noise_step, input_signature=[words_spec])
        self._words_spec = words_spec

    def step(self, x, y):
        return self._step(x, y, self._words())

    def bind_rows(self, x: Dict[str, np.ndarray], y: np.ndarray) -> None:
        """Keeps the training rows as tensors, so that ``step_rows(idx)`` gathers a batch inside the graph
        (one small index tensor crosses from Python per step, not every feature column)."""
        tf, step = self.tf, self._step
        xs = {k: tf.constant(v) for k, v in x.items()}
        ys = tf.constant(y)
        # called as a concrete function with tensors: no Python signature binding per step (~0.1 ms)
        self._step_rows = tf.function(
            lambda idx, words: step({k: tf.gather(v, idx) for k, v in xs.items()}, tf.gather(ys, idx), words),
            input_signature=[tf.TensorSpec([None], tf.int64), self._words_spec]).get_concrete_function()

    def step_rows(self, idx: np.ndarray):
        tf = self.tf
        return self._step_rows(tf.constant(idx, tf.int64), tf.constant(self._words()))

    def noise_step(self):
        if self.path == "vectorized_optimizer":
            # An empty Poisson batch still releases a noisy update; TF Privacy's optimizer asserts
            # that its DP gradient method ran before apply_gradients: the noise here *is* that step.
            self.optimizer._was_dp_gradients_called = True  # pylint: disable=protected-access
        return self._noise_step(self._words())


# ------------------------------------------------------------------------------------------------
# Membership inference audit
# ------------------------------------------------------------------------------------------------
def _bce_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    y = labels.astype(np.float64)
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def membership_inference_auc(logits_train, labels_train, logits_test, labels_test,
                             seed: Optional[int] = 0) -> Dict[str, Any]:
    """Loss-threshold membership inference attack AUC (and the attack that got the max AUC).

    TF Privacy's ``privacy_tests.membership_inference_attack`` (TF Privacy 0.9 moved it out of its wheel
    into the ``tensorflow-empirical-privacy`` package, which the platform lock pins).
    """
    from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack import (  # noqa
        data_structures as mia_ds, membership_inference_attack as mia)

    logits_train = np.asarray(logits_train, np.float64)
    logits_test = np.asarray(logits_test, np.float64)
    if logits_train.ndim == 1 or logits_train.shape[-1] == 1:
        logits_train, logits_test = logits_train.reshape(-1), logits_test.reshape(-1)
    labels_train = np.asarray(labels_train).reshape(-1).astype(int)
    labels_test = np.asarray(labels_test).reshape(-1).astype(int)
    two = (lambda z: np.stack([np.zeros_like(z), z], axis=1)) if logits_train.ndim == 1 else (lambda z: z)  # noqa
    inp = mia_ds.AttackInputData(logits_train=two(logits_train), logits_test=two(logits_test),
                                 loss_train=_ce_from_logits(logits_train, labels_train),
                                 loss_test=_ce_from_logits(logits_test, labels_test),
                                 labels_train=labels_train, labels_test=labels_test)
    # Its epsilon lower bound divides by empty confusion-matrix cells on small inputs; the AUC is unaffected.
    with np.errstate(divide="ignore", invalid="ignore"):
        res = mia.run_attacks(inp, mia_ds.SlicingSpec(entire_dataset=True),
                              attack_types=[mia_ds.AttackType.THRESHOLD_ATTACK])
    best = res.get_result_with_max_auc()
    return {"mia_auc": float(best.get_auc()), "mia_attack": str(best.attack_type),
            "mia_implementation": "tensorflow_privacy.privacy_tests"}


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
def _as_inputs(features: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    out = {}
    for k, v in features.items():
        v = np.asarray(v)
        if v.dtype == np.float64:
            v = v.astype(np.float32)
        if v.ndim == 1:
            v = v.reshape(-1, 1)
        out[k] = v
    return out


def _predict_logits(model, features: Dict[str, np.ndarray], batch: int = 4096) -> np.ndarray:
    """[n] logits of a one-logit model, [n, k] of a k-class one."""
    n = next(iter(features.values())).shape[0]
    k = num_outputs(model)
    outs = []
    for s in range(0, n, batch):
        out = np.asarray(model({k_: np.asarray(v[s:s + batch]) for k_, v in features.items()}, training=False))
        outs.append(out.reshape(-1) if k == 1 else out.reshape(-1, k))
    if outs:
        return np.concatenate(outs)
    return np.zeros((0,) if k == 1 else (0, k), np.float32)


def _ce_from_logits(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy of [n] (binary) or [n, k] (class ids in ``labels``) logits."""
    if logits.ndim == 1:
        return _bce_from_logits(logits, labels)
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(z)), labels.astype(int)]


def _correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    if logits.ndim == 1:
        return (logits > 0) == (labels > 0.5)
    return logits.argmax(axis=1) == labels.astype(int)


class DPSGDTrainer(TrainerKind):
    """Trainer kind ``dp_sgd`` (see the module docstring)."""

    name = "dp_sgd"
    Config = DPSGDConfig
    epsilon_axis = "required"

    def study_args(self, settings, target_epsilon=None, partition=None, spec=None):
        return {**DEFAULTS, "mia": False, **dict(settings)}   # the MIA check is private and slow: off unless set

    def add_arguments(self, parser) -> None:
        add_arguments(parser)

    def from_arguments(self, namespace) -> DPSGDConfig:
        return DPSGDConfig.parse(trainer_args(namespace))

    def summary_lines(self, parameters: Mapping[str, Any]):
        p = parameters
        if "steps" not in p:
            return []
        return [f"noise multiplier {p['noise_multiplier']:.4g}, clip {p.get('l2_norm_clip', '-')}, "
                f"sampling rate {p.get('sampling_rate', 0):.4g} ({p.get('sampling', '-')}), "
                f"{p.get('steps', '-')} steps, planned on {p.get('planning_rows', '-')} rows (public figure)"]

    def plan(self, inputs: PlanInputs) -> TrainingPlan:
        return plan_training(inputs)

    def train(self, context: TrainerContext) -> TrainingOutcome:
        import tensorflow as tf

        log = context.log
        plan = dict(context.plan.internal)
        a = plan["args"]
        n = context.num_train_rows
        if n == 0:
            raise ValueError("the training split is empty; dp_sgd needs at least one training row.")
        steps_done = 0

        def released(steps: int):
            return accounting.dp_event(plan["noise_multiplier"], plan["sampling_rate"], steps, a["sampling"],
                                       per_epoch=None if a["sampling"] == "poisson" else plan["steps_per_epoch"])

        try:
            if a["seed"] is not None:  # TensorFlow's seeded ops and the batches; the DP noise never comes from it
                tf.random.set_seed(int(a["seed"]))
            rng = np.random.default_rng(a["seed"])
            x_train = _as_inputs(context.train_features)
            y_train = np.asarray(context.train_labels, np.float32).reshape(-1, 1)
            base = context.build_model()
            names = list(getattr(base, "input_names", None) or [])
            if names and all(k in x_train for k in names):
                x_train = {k: x_train[k] for k in names}  # only what the model consumes
            fast_ok = supports_fast_gradient_clipping(base)
            path = a["dp_path"]
            if path == "auto":
                path = ("fused_dense" if supports_fused_dense(base) else
                        "fast_gradient_clipping" if fast_ok else "vectorized_optimizer")
            elif path == "fused_dense" and not supports_fused_dense(base):
                raise ValueError("dp_path=fused_dense requested but the model is not a parameter-free feature map "
                                 "followed by a chain of Dense layers.")
            elif path == "fast_gradient_clipping" and not fast_ok:
                from dp_training import conv_clipping
                raise ValueError("dp_path=fast_gradient_clipping requested but the model has trainable layers "
                                 "outside the fast-clipping registry (" +
                                 "; ".join(conv_clipping.unsupported_layers(base)
                                           or ["the model is not a functional Keras model"]) +
                                 "); use dp_path=auto.")
            specs = {k: tf.TensorSpec((None,) + v.shape[1:], tf.as_dtype(v.dtype))
                     for k, v in x_train.items()}
            stepper = _DPStepper(base, path, plan, specs)
            stepper.bind_rows(x_train, y_train)
            log(f"dp_sgd: {path}, {plan['steps']} steps, sigma={plan['noise_multiplier']:.4f}, "
                f"C={plan['l2_norm_clip']:g}, expected batch {plan['batch_size']}")
            t0 = t_epoch = time.time()
            step_lines = RateLimitedLog(log, clock=_clock)
            epoch_seconds = []
            spe = max(1, int(round(plan["steps_per_epoch"])))
            empty = 0
            q_actual = plan["batch_size"] / plan["num_rows"]   # rate from the public planning size
            for idx in batch_indices(n, plan["batch_size"], plan["steps"], a["sampling"], rng,
                                     sampling_rate=q_actual):
                steps_done += 1  # counted before the update: never under-count released steps
                if idx.size == 0:
                    stepper.noise_step()
                    empty += 1
                else:
                    stepper.step_rows(idx)
                last = steps_done == plan["steps"]
                if steps_done % spe == 0 or last:
                    now = time.time()
                    epoch_seconds.append(now - t_epoch)
                    t_epoch = now
                if step_lines.due(final=last):   # one line every few seconds at most (the last step always)
                    step_lines(f"dp_sgd: step {steps_done}/{plan['steps']} ({time.time() - t0:.1f}s)", final=last)
            train_seconds = time.time() - t0
        except BaseException as exc:  # report what was released, then stop
            raise TrainingInterrupted(released(steps_done), exc) from exc

        model = base
        public = {"dp_path": path}
        private: Dict[str, Any] = {
            "train_seconds": round(train_seconds, 3),
            "seconds_per_epoch": round(train_seconds * spe / max(1, steps_done), 4),
            "empty_batches": empty, "train_rows": n,
            "epoch_seconds": [round(x, 3) for x in epoch_seconds]}
        x_eval = _as_inputs(context.eval_features)
        if all(k in x_eval for k in x_train):
            x_eval = {k: x_eval[k] for k in x_train}
        y_eval = np.asarray(context.eval_labels, np.float32).reshape(-1)
        n_eval = y_eval.shape[0]
        if n_eval:
            logits_eval = _predict_logits(model, x_eval)
            private["eval_loss"] = float(_ce_from_logits(logits_eval, y_eval).mean())
            private["eval_accuracy"] = float(_correct(logits_eval, y_eval).mean())
        if a["mia"] and n_eval:
            m = min(int(a["mia_max_rows"]), n, n_eval)
            mrng = np.random.default_rng(0)
            tr = mrng.choice(n, m, replace=False)
            ev_idx = mrng.choice(n_eval, m, replace=False)
            logits_tr = _predict_logits(model, {k: v[tr] for k, v in x_train.items()})
            res = membership_inference_auc(logits_tr, y_train.reshape(-1)[tr],
                                           _predict_logits(model, {k: v[ev_idx] for k, v in x_eval.items()}),
                                           y_eval[ev_idx])
            res["mia_rows"] = m
            private.update(res)
            log("dp_sgd: membership inference check done (its AUC is computed on training rows: private, in "
                "private_details.json in the workdir)")
        return TrainingOutcome(model=model, released_event=released(steps_done), public_details=public,
                               private_details=private)


__all__ = ["DPSGDTrainer", "DPSGDConfig", "add_arguments", "trainer_args", "plan_training",
           "membership_inference_auc", "batch_indices", "supports_fast_gradient_clipping"]
