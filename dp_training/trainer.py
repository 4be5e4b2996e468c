"""The ``dp_sgd`` trainer kind: DP-SGD with TF Privacy, honest accounting and a budget ledger.

Code paths (``details['dp_path']``):

``fast_gradient_clipping``
    TF Privacy's ``DPModel`` (``tensorflow_privacy.privacy.keras_models.dp_keras_model``) with the
    default layer registry (Dense, Embedding) of ``fast_gradient_clipping.layer_registry``: per-example
    gradient norms are computed with the "ghost norm" trick, without materialising per-example
    gradients. Used when every layer with trainable weights is registered (our models: Dense layers
    plus parameter-free CategoryEncoding/Concatenate) and the model is functional.
``vectorized_optimizer``
    Otherwise TF Privacy's ``VectorizedDPKerasSGDOptimizer`` (per-example Jacobian + clip).

What the accounting assumes, and how the trainer makes it true
--------------------------------------------------------------
* Per-example clipping to ``l2_norm_clip`` (C); Gaussian noise of std ``noise_multiplier * C``
  added once to the *sum* of clipped gradients per step (TF Privacy does this in both paths).
* ``sampling="poisson"``: every step draws a fresh batch that includes each training row
  independently with probability ``q = batch_size / n`` (so batch sizes vary, and may be 0; an
  empty batch still releases a noise-only step). The noisy sum is divided by the *expected* batch
  size ``q * n``, a constant, never by the realised batch size (dividing by the realised size would
  make the update depend on a non-private count). For the fast path this is done by using a SUM
  loss reduction (so TF Privacy adds noise of std ``sigma * C`` to the clipped sum) and a learning
  rate ``lr / (q n)``, which for (momentum) SGD is exactly the same update as dividing the gradient;
  for the vectorized path the optimizer's mean over the realised batch is rescaled by
  ``B_t / (q n)``, exactly undoing it.
* ``sampling="shuffle"``: each epoch is a fresh permutation cut into ``n // batch_size`` batches of
  exactly ``batch_size`` rows (the remainder is dropped); accounted with no amplification (one
  Gaussian release per epoch), see ``dp_training.accounting``.
* The epsilon returned is computed from the steps actually run.

Not covered by the guarantee: ``privacy['mia_auc']`` (an audit statistic computed on the raw
training rows) and floating-point / PRNG caveats of ``tf.random.normal`` (not a cryptographic
sampler). Do not publish the MIA figures as if they were DP outputs.
"""
from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Any, Dict, Mapping, Optional

import numpy as np

from dp_training import accounting, calibration
from dp_training.ledger import PlannedRun, PrivacyLedger

DEFAULT_TARGET_EPSILON = 3.0
DEFAULTS: Dict[str, Any] = {
    "noise_multiplier": None,
    "target_epsilon": None,          # None and no noise multiplier -> DEFAULT_TARGET_EPSILON
    "delta": None,                   # None -> 1 / (10 n)
    # Tuned on Adult (simulations/bench_dp.py, docs/dp_training.md): clip 0.5, expected batch 512,
    # 20 epochs, SGD lr 1.0 with momentum 0.9.
    "l2_norm_clip": 0.5,
    "batch_size": 512,
    "epochs": 20,
    "learning_rate": 1.0,
    "momentum": 0.9,
    "accountant": "pld",
    "sampling": "poisson",
    "budget_epsilon": None,
    "budget_delta": None,            # None -> the run's delta
    "dp_path": "auto",               # auto | fast_gradient_clipping | vectorized_optimizer
    "seed": None,                    # for tests only: makes batches and noise reproducible
    "mia": True,
    "mia_max_rows": 10000,
    "run_id": None,
}
DP_PATHS = ("auto", "fast_gradient_clipping", "vectorized_optimizer")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the dp_sgd trainer's flags to ``privtrain run`` (--allow-non-private is the pipeline's)."""
    g = parser.add_argument_group("dp_sgd trainer (differentially private SGD)")
    g.add_argument("--noise-multiplier", type=float, default=None,
                   help="Gaussian noise std / clip norm. Give this or --target-epsilon "
                        f"(default: calibrate for epsilon {DEFAULT_TARGET_EPSILON:g}).")
    g.add_argument("--target-epsilon", type=float, default=None,
                   help="calibrate the smallest noise multiplier meeting this epsilon "
                        f"(default {DEFAULT_TARGET_EPSILON:g} when no noise multiplier is given).")
    g.add_argument("--delta", type=float, default=None,
                   help="delta of the guarantee (default 1/(10 n) for n training rows).")
    g.add_argument("--l2-norm-clip", type=float, default=DEFAULTS["l2_norm_clip"],
                   help="per-example gradient L2 clip norm (default %(default)s).")
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="expected (poisson) or exact (shuffle) batch size (default %(default)s).")
    g.add_argument("--epochs", type=float, default=DEFAULTS["epochs"],
                   help="passes over the data; steps = epochs * n / batch size "
                        "(default %(default)s).")
    g.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"],
                   help="SGD learning rate (default %(default)s).")
    g.add_argument("--momentum", type=float, default=DEFAULTS["momentum"],
                   help="SGD momentum (default %(default)s).")
    g.add_argument("--accountant", choices=accounting.ACCOUNTANTS, default=DEFAULTS["accountant"],
                   help="privacy accountant (default %(default)s).")
    # "fixed" is accepted too: the federated trainer uses that name for fixed-size sampling and
    # the pipeline's CLI declares a shared flag once; for dp_sgd it means "shuffle".
    g.add_argument("--sampling", choices=accounting.SAMPLINGS + ("fixed",),
                   default=DEFAULTS["sampling"],
                   help="poisson: amplified, variable-size batches; shuffle (dp_sgd) / fixed: "
                        "fixed-size shuffled batches, accounted without amplification "
                        "(default %(default)s).")
    g.add_argument("--budget-epsilon", type=float, default=None,
                   help="set this data set's total privacy budget in the ledger if it has none.")
    g.add_argument("--dp-path", choices=DP_PATHS, default="auto",
                   help="force a DP code path (default: fast gradient clipping when supported).")
    g.add_argument("--no-mia", action="store_true",
                   help="skip the post-training membership inference audit.")


def trainer_args(namespace: argparse.Namespace) -> Dict[str, Any]:
    """The trainer-args dict (``TrainerContext.args``) from parsed ``add_arguments`` flags."""
    out = dict(DEFAULTS)
    for key in ("noise_multiplier", "target_epsilon", "delta", "l2_norm_clip", "batch_size",
                "epochs", "learning_rate", "momentum", "accountant", "sampling", "budget_epsilon",
                "dp_path"):
        if getattr(namespace, key, None) is not None:
            out[key] = getattr(namespace, key)
    if out["sampling"] == "fixed":
        out["sampling"] = "shuffle"
    if getattr(namespace, "no_mia", False):
        out["mia"] = False
    return out


# ------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------
def _resolve_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    unknown = set(args) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown dp_sgd trainer args {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    a = dict(DEFAULTS)
    a.update({k: v for k, v in args.items() if v is not None})
    return a


def plan_training(args: Mapping[str, Any], num_rows: int) -> Dict[str, Any]:
    """Works out q, steps, delta and the noise multiplier (calibrating it if needed).

    Returns a dict with keys: sampling_rate, steps, steps_per_epoch, delta, noise_multiplier,
    target_epsilon, calibrated, planned_epsilon, warnings (list of str) and the resolved args.
    """
    a = _resolve_args(args)
    n = int(num_rows)
    if n <= 0:
        raise ValueError("the training split is empty; dp_sgd needs at least one training row.")
    bs = a["batch_size"]
    if isinstance(bs, bool) or int(bs) != bs or bs < 1:
        raise ValueError(f"batch_size must be a positive integer, got {bs!r}.")
    bs = int(bs)
    if bs > n:
        raise ValueError(f"batch_size {bs} exceeds the {n} training rows; pass --batch-size <= {n}.")
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
    accounting.validate_parameters(0.0, 1.0, 0, None, a["accountant"], a["sampling"])

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

    notes = []
    delta = a["delta"]
    if delta is None:
        delta = 1.0 / (10 * n)
    accounting.validate_parameters(0.0, q, steps, delta)
    if delta >= 1.0 / n:
        notes.append(f"delta={delta:g} >= 1/n = {1.0 / n:.3g}: a mechanism that publishes one random "
                     "row satisfies such a guarantee; use delta << 1/n (default 1/(10 n)).")

    sigma = a["noise_multiplier"]
    target = a["target_epsilon"]
    calibrated = False
    if sigma is not None and target is not None:
        raise ValueError("give either noise_multiplier or target_epsilon, not both "
                         f"(got {sigma!r} and {target!r}).")
    if sigma is None:
        target = DEFAULT_TARGET_EPSILON if target is None else target
        sigma = calibration.calibrate_noise_multiplier(target, q, steps, delta, a["accountant"],
                                                       a["sampling"])
        calibrated = True
    else:
        accounting.validate_parameters(sigma, q, steps, delta)
        if float(sigma) == 0:
            raise ValueError("noise_multiplier 0 gives no privacy (epsilon = inf); use a "
                             "non-private trainer (with --allow-non-private if the data set has a "
                             "budget) or pass a positive noise multiplier / a target epsilon.")
    sigma = float(sigma)
    eps = accounting.compute_epsilon(sigma, q, steps, delta, a["accountant"], a["sampling"])
    return {"args": a, "num_rows": n, "batch_size": bs, "sampling_rate": q, "steps": steps,
            "steps_per_epoch": steps_per_epoch, "delta": float(delta), "noise_multiplier": sigma,
            "target_epsilon": None if target is None else float(target), "calibrated": calibrated,
            "planned_epsilon": eps, "warnings": notes, "l2_norm_clip": float(clip),
            "learning_rate": float(lr)}


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, steps: int, sampling: str,
                  rng: np.random.Generator):
    """Yields one index array per step: Poisson (rate batch_size/n) or shuffled fixed batches."""
    if sampling == "poisson":
        q = batch_size / n
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
    """True when TF Privacy's fast gradient clipping covers every trainable layer of ``model``."""
    from tensorflow_privacy.privacy.fast_gradient_clipping import gradient_clipping_utils as gcu
    from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry
    reg = layer_registry.make_default_layer_registry()
    return bool(gcu.all_trainable_layers_are_registered(model, reg)
                and gcu.has_internal_compute_graph(model))


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
        label_spec = tf.TensorSpec([None, 1], tf.float32)
        if path == "fast_gradient_clipping":
            from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry
            from tensorflow_privacy.privacy.keras_models import dp_keras_model
            self.train_model = dp_keras_model.DPModel(
                l2_norm_clip=clip, noise_multiplier=sigma,
                layer_registry=layer_registry.make_default_layer_registry(), use_xla=False,
                inputs=base_model.inputs, outputs=base_model.outputs)
            if not self.train_model._enable_fast_peg_computation:  # pylint: disable=protected-access
                raise RuntimeError("TF Privacy's DPModel did not enable fast gradient clipping.")
            # SUM reduction: TF Privacy adds N(0, (sigma C)^2) to the *sum* of clipped gradients;
            # the 1 / (expected batch size) normalisation is folded into the learning rate.
            self.optimizer = tf.keras.optimizers.SGD(learning_rate=lr / self.expected_batch,
                                                     momentum=mom)
            self.train_model.compile(
                optimizer=self.optimizer,
                loss=tf.keras.losses.BinaryCrossentropy(
                    from_logits=True, reduction=tf.keras.losses.Reduction.SUM))
            self._step = tf.function(lambda x, y: self.train_model.train_step((x, y)),
                                     input_signature=[feature_specs, label_spec])
            self._noise_scale = 1.0  # the optimizer's lr already divides by the expected batch
        else:
            from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras_vectorized as dpv
            self.train_model = base_model
            self.optimizer = dpv.VectorizedDPKerasSGDOptimizer(
                l2_norm_clip=clip, noise_multiplier=sigma, num_microbatches=None,
                learning_rate=lr, momentum=mom)
            loss_none = tf.keras.losses.BinaryCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
            model, opt, expected = base_model, self.optimizer, self.expected_batch

            def vec_step(x, y):
                with tf.GradientTape() as tape:
                    logits = model(x, training=True)
                    per_example = loss_none(y, logits)
                # TF Privacy: (sum of clipped grads + N(0, (sigma C)^2)) / B_t ...
                gv = opt._compute_gradients(  # pylint: disable=protected-access
                    per_example, model.trainable_variables, tape=tape)
                # ... rescaled to (sum + noise) / (q n): divide by the expected batch size.
                b = tf.cast(tf.shape(y)[0], tf.float32)
                opt.apply_gradients([(g * (b / expected), v) for g, v in gv])
                return {"loss": tf.reduce_mean(per_example)}

            self._step = tf.function(vec_step, input_signature=[feature_specs, label_spec])
            self._noise_scale = 1.0 / self.expected_batch

        variables = self.train_model.trainable_variables
        noise_scale = self._noise_scale
        std = sigma * clip
        optimizer = self.optimizer

        def noise_step():
            grads = [tf.random.normal(tf.shape(v), stddev=std) * noise_scale for v in variables]
            optimizer.apply_gradients(zip(grads, variables))
            return tf.constant(0.0)

        self._noise_step = tf.function(noise_step)

    def step(self, x, y):
        return self._step(x, y)

    def bind_rows(self, x: Dict[str, np.ndarray], y: np.ndarray) -> None:
        """Keeps the training rows as tensors, so that ``step_rows(idx)`` gathers a batch inside the graph
        (one small index tensor crosses from Python per step, not every feature column)."""
        tf, step = self.tf, self._step
        xs = {k: tf.constant(v) for k, v in x.items()}
        ys = tf.constant(y)
        self._step_rows = tf.function(
            lambda idx: step({k: tf.gather(v, idx) for k, v in xs.items()}, tf.gather(ys, idx)),
            input_signature=[tf.TensorSpec([None], tf.int64)])

    def step_rows(self, idx: np.ndarray):
        return self._step_rows(idx.astype(np.int64))

    def noise_step(self):
        if self.path == "vectorized_optimizer":
            # An empty Poisson batch still releases a noisy update; TF Privacy's optimizer asserts
            # that its DP gradient method ran before apply_gradients: the noise here *is* that step.
            self.optimizer._was_dp_gradients_called = True  # pylint: disable=protected-access
        return self._noise_step()


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

    logits_train = np.asarray(logits_train, np.float64).reshape(-1)
    logits_test = np.asarray(logits_test, np.float64).reshape(-1)
    labels_train = np.asarray(labels_train).reshape(-1).astype(int)
    labels_test = np.asarray(labels_test).reshape(-1).astype(int)
    two = lambda z: np.stack([np.zeros_like(z), z], axis=1)  # noqa: E731  one logit -> two-class logits
    inp = mia_ds.AttackInputData(logits_train=two(logits_train), logits_test=two(logits_test),
                                 loss_train=_bce_from_logits(logits_train, labels_train),
                                 loss_test=_bce_from_logits(logits_test, labels_test),
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
    n = next(iter(features.values())).shape[0]
    outs = []
    for s in range(0, n, batch):
        outs.append(np.asarray(model({k: v[s:s + batch] for k, v in features.items()},
                                     training=False)).reshape(-1))
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


class DPSGDTrainer:
    """Trainer kind ``dp_sgd`` (see the module docstring)."""

    name = "dp_sgd"

    def train(self, context):
        import tensorflow as tf
        from pipeline.trainers.base import TrainingOutcome

        log = context.log
        n = context.num_train_rows
        plan = plan_training(context.args, n)
        a = plan["args"]
        for note in plan["warnings"]:
            warnings.warn(note)
            log(f"WARNING: {note}")
        if plan["calibrated"]:
            log(f"dp_sgd: calibrated noise multiplier {plan['noise_multiplier']:.4f} for target "
                f"epsilon {plan['target_epsilon']:g} at delta {plan['delta']:.3g} "
                f"({plan['steps']} steps, q={plan['sampling_rate']:.5f}, {a['sampling']}, "
                f"{a['accountant']})")

        # Ledger: budget, then check + reserve before any training.
        ledger = PrivacyLedger(context.workdir)
        fp = context.dataset_fingerprint
        if a["budget_epsilon"] is not None:
            existing = ledger.get_budget(fp)
            b_delta = a["budget_delta"] if a["budget_delta"] is not None else plan["delta"]
            if existing is None:
                ledger.set_budget(fp, a["budget_epsilon"], b_delta, a["accountant"],
                                  context.dataset_name)
                log(f"dp_sgd: set privacy budget epsilon={a['budget_epsilon']:g} "
                    f"delta={b_delta:.3g} for data set {fp}")
            elif not math.isclose(existing.epsilon, float(a["budget_epsilon"])):
                raise ValueError(
                    f"data set {fp} already has a privacy budget of epsilon={existing.epsilon:g} "
                    f"(delta={existing.delta:g}); --budget-epsilon {a['budget_epsilon']:g} would "
                    "change it. Changing a budget must be explicit: "
                    "dp_training.ledger.PrivacyLedger(workdir).set_budget(...).")
        planned = PlannedRun(fingerprint=fp, noise_multiplier=plan["noise_multiplier"],
                             sampling_rate=plan["sampling_rate"], steps=plan["steps"],
                             delta=plan["delta"], sampling=a["sampling"],
                             accountant=a["accountant"], trainer=self.name,
                             dataset_name=context.dataset_name)
        run_id = ledger.begin_run(planned, run_id=a["run_id"])

        steps_done = 0
        try:
            if a["seed"] is not None:
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
                path = "fast_gradient_clipping" if fast_ok else "vectorized_optimizer"
            elif path == "fast_gradient_clipping" and not fast_ok:
                raise ValueError("dp_path=fast_gradient_clipping requested but the model has "
                                 "trainable layers outside TF Privacy's layer registry.")
            specs = {k: tf.TensorSpec((None,) + v.shape[1:], tf.as_dtype(v.dtype))
                     for k, v in x_train.items()}
            stepper = _DPStepper(base, path, plan, specs)
            stepper.bind_rows(x_train, y_train)
            log(f"dp_sgd: {path}, {plan['steps']} steps, sigma={plan['noise_multiplier']:.4f}, "
                f"C={plan['l2_norm_clip']:g}, expected batch {plan['batch_size']}, "
                f"planned epsilon {plan['planned_epsilon']:.4f} (delta {plan['delta']:.3g})")
            t0 = t_epoch = time.time()
            epoch_seconds = []
            spe = max(1, int(round(plan["steps_per_epoch"])))
            empty = 0
            for idx in batch_indices(n, plan["batch_size"], plan["steps"], a["sampling"], rng):
                steps_done += 1  # counted before the update: never under-count released steps
                if idx.size == 0:
                    stepper.noise_step()
                    empty += 1
                else:
                    stepper.step_rows(idx)
                if steps_done % spe == 0 or steps_done == plan["steps"]:
                    now = time.time()
                    epoch_seconds.append(now - t_epoch)
                    t_epoch = now
                    log(f"dp_sgd: step {steps_done}/{plan['steps']} "
                        f"({now - t0:.1f}s)")
            train_seconds = time.time() - t0
        except BaseException as exc:  # record what was spent, then re-raise
            status = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
            try:
                ledger.finish_run(run_id, status, steps_done,
                                  extra={"error": f"{type(exc).__name__}: {exc}"[:500]})
                log(f"dp_sgd: run {run_id} {status} after {steps_done} step(s); recorded in the "
                    "privacy ledger")
            except Exception as rec_exc:  # pragma: no cover - keep the original error
                log(f"dp_sgd: could not record the {status} run in the ledger: {rec_exc}")
            raise

        eps = accounting.compute_epsilon(plan["noise_multiplier"], plan["sampling_rate"],
                                         steps_done, plan["delta"], a["accountant"], a["sampling"])
        ledger.finish_run(run_id, "completed", steps_done, epsilon=eps,
                          extra={"dp_path": path})
        if ledger.get_budget(fp) is None:  # no budget: report the spend in this run's terms
            spend = ledger.spent(fp, delta=plan["delta"], accountant=a["accountant"])
        else:
            spend = ledger.spent(fp)

        model = base
        x_eval = _as_inputs(context.eval_features)
        if all(k in x_eval for k in x_train):
            x_eval = {k: x_eval[k] for k in x_train}
        y_eval = np.asarray(context.eval_labels, np.float32).reshape(-1)
        details: Dict[str, Any] = {"dp_path": path, "train_seconds": round(train_seconds, 3),
                                   "seconds_per_epoch": round(train_seconds * spe / max(1, steps_done), 4),
                                   "learning_rate": plan["learning_rate"],
                                   "momentum": float(a["momentum"] or 0.0),
                                   "optimizer": "SGD", "empty_batches": empty,
                                   "ledger_run_id": run_id,
                                   "epoch_seconds": ",".join(f"{x:.3f}" for x in epoch_seconds)}
        n_eval = y_eval.shape[0]
        if n_eval:
            logits_eval = _predict_logits(model, x_eval)
            loss_eval = _bce_from_logits(logits_eval, y_eval)
            details["eval_loss"] = float(loss_eval.mean())
            details["eval_accuracy"] = float(((logits_eval > 0) == (y_eval > 0.5)).mean())

        sampling = a["sampling"]
        privacy: Dict[str, Any] = {
            "epsilon": eps,
            "delta": plan["delta"],
            "accountant": a["accountant"],
            "noise_multiplier": plan["noise_multiplier"],
            "l2_norm_clip": plan["l2_norm_clip"],
            "sampling_rate": plan["sampling_rate"],
            "sampling_method": accounting.SAMPLING_METHOD_LABELS[sampling],
            "sampling": sampling,
            "steps": steps_done,
            "epochs": (steps_done * plan["sampling_rate"] if sampling == "poisson"
                       else accounting.epochs_for_steps(steps_done, plan["sampling_rate"])),
            "train_rows": n,
            "batch_size": plan["batch_size"],
            "target_epsilon": plan["target_epsilon"],
            "noise_calibrated": plan["calibrated"],
            "neighboring_relation": ("add_or_remove_one" if sampling == "poisson"
                                     else "zero_out_one"),
            "gradient_normalization": "divided by the expected batch size q*n",
            "epsilon_rdp": accounting.compute_epsilon(
                plan["noise_multiplier"], plan["sampling_rate"], steps_done, plan["delta"],
                "rdp", sampling),
            "ledger_run_id": run_id,
            "ledger_spent_epsilon": spend.epsilon,
            "ledger_budget_epsilon": spend.budget_epsilon,
            "dataset_fingerprint": fp,
        }
        if a["mia"] and n_eval:
            m = min(int(a["mia_max_rows"]), n, n_eval)
            mrng = np.random.default_rng(0)
            tr = mrng.choice(n, m, replace=False)
            ev = mrng.choice(n_eval, m, replace=False)
            logits_tr = _predict_logits(model, {k: v[tr] for k, v in x_train.items()})
            res = membership_inference_auc(logits_tr, y_train.reshape(-1)[tr],
                                           _predict_logits(model, {k: v[ev] for k, v in x_eval.items()}),
                                           y_eval[ev])
            res["mia_rows"] = m
            privacy.update(res)
            log(f"dp_sgd: membership inference audit AUC {res['mia_auc']:.4f} (0.5 = chance)")
        log(f"dp_sgd: done, epsilon {eps:.4f} at delta {plan['delta']:.3g} ({a['accountant']}); "
            f"data set spend {spend.epsilon:.4f}"
            + (f" of {spend.budget_epsilon:g}" if spend.budget_epsilon is not None else ""))
        return TrainingOutcome(model=model, privacy=privacy, details=details)


__all__ = ["DPSGDTrainer", "add_arguments", "trainer_args", "plan_training",
           "membership_inference_auc", "batch_indices", "supports_fast_gradient_clipping"]
