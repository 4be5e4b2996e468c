"""Empirical privacy audit benchmark: stated epsilon vs the one-run canary lower bound.

Command (from the repository root):

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 $(scripts/setup_env.sh platform)/bin/python \
        simulations/bench_audit.py [--canaries 1000] [--rows 1000] [--steps 1000] [--seeds 1]

For each configuration the same small MLP is trained once with full-batch DP-GD (TF Privacy's
``DPModel``: per-example clipping by fast gradient clipping, Gaussian noise on the clipped sum) on a
synthetic tabular data set with ``--canaries`` canaries, each inserted with probability 1/2
(``dp_training.audit``). Rows:

* ``non-private``: noise 0, stated epsilon inf;
* ``broken (claims eps=1)``: noise 0, but the stated epsilon is the one of the noise multiplier that a
  correct run at epsilon 1 would use (what a mis-wired noise flag would print);
* ``dp eps=E``: noise multiplier calibrated so the full run is (E, delta)-DP (exact mu-GDP accounting of
  T full-batch Gaussian steps: mu = sqrt(T) / sigma).

The audit's lower bound uses Theorem 3 of Steinke, Nasr & Jagielski (2023) at 95% confidence, with a
union bound over the default (k_+, k_-) candidates. ``train_with_canaries`` is also used by
``tests/dp_training/test_audit.py``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dp_training import audit  # noqa: E402

NUMERIC = ("age_z", "hours_z", "gain_z", "score_z")
CATEGORICAL = {"work_id": 8, "region_id": 12}
LAYOUT: Dict[str, Optional[int]] = {**{k: None for k in NUMERIC}, **CATEGORICAL}


def make_data(n: int, seed: int) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """A small synthetic tabular data set in the platform's transformed layout ({name_z}, {name_id})."""
    rng = np.random.default_rng(seed)
    x = {k: rng.normal(size=(n, 1)).astype(np.float32) for k in NUMERIC}
    x.update({k: rng.integers(0, b, size=(n, 1)).astype(np.int64) for k, b in CATEGORICAL.items()})
    logit = (1.2 * x["age_z"][:, 0] - 0.8 * x["hours_z"][:, 0] + 0.5 * x["gain_z"][:, 0]
             + 0.7 * (x["work_id"][:, 0] == 3) - 0.4 * (x["region_id"][:, 0] % 3 == 0) - 0.2)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return x, y


def build_model(hidden: int = 64, seed: int = 0):
    """Same shape as pipeline.model.build_model: numerics + one-hot categoricals -> Dense(ReLU) -> logit."""
    import tensorflow as tf
    inputs, parts = {}, []
    for name, buckets in LAYOUT.items():
        if buckets is None:
            inputs[name] = tf.keras.Input(shape=(1,), name=name, dtype=tf.float32)
            parts.append(inputs[name])
        else:
            inputs[name] = tf.keras.Input(shape=(1,), name=name, dtype=tf.int64)
            parts.append(tf.keras.layers.CategoryEncoding(num_tokens=buckets, output_mode="one_hot")(inputs[name]))
    x = tf.keras.layers.Concatenate()(parts)
    init = tf.keras.initializers.GlorotUniform
    x = tf.keras.layers.Dense(hidden, activation="relu", kernel_initializer=init(seed))(x)
    x = tf.keras.layers.Dense(hidden, activation="relu", kernel_initializer=init(seed + 1))(x)
    out = tf.keras.layers.Dense(1, kernel_initializer=init(seed + 2))(x)
    return tf.keras.Model(inputs=inputs, outputs=out)


def stated_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` full-batch Gaussian steps (add/remove-one, sensitivity = clip): mu-GDP."""
    if noise_multiplier <= 0:
        return math.inf
    return audit.gaussian_epsilon(math.sqrt(steps) / noise_multiplier, delta)


def noise_for_epsilon(epsilon: float, steps: int, delta: float) -> float:
    return math.sqrt(steps) / audit.gaussian_mu_for_epsilon(epsilon, delta)


def train_dp_gd(features, labels, noise_multiplier: float, steps: int, clip: float = 1.0,
                learning_rate: float = 5.0, normaliser: Optional[float] = None, hidden: int = 64,
                seed: int = 0):
    """Full-batch DP-GD with TF Privacy's ``DPModel`` (fast gradient clipping, SUM loss): every step
    adds N(0, (sigma C)^2) to the sum of per-example gradients clipped to C, then divides by the
    constant ``normaliser`` (a public expected row count, never the realised one) via the learning
    rate. noise_multiplier 0 = clipped GD without noise. Returns the trained functional model."""
    import tensorflow as tf
    from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry
    from tensorflow_privacy.privacy.keras_models import dp_keras_model
    tf.keras.utils.set_random_seed(seed)
    base = build_model(hidden, seed)
    model = dp_keras_model.DPModel(l2_norm_clip=clip, noise_multiplier=float(noise_multiplier),
                                   layer_registry=layer_registry.make_default_layer_registry(),
                                   use_xla=False, inputs=base.inputs, outputs=base.outputs)
    norm = float(normaliser if normaliser is not None else labels.shape[0])
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate=learning_rate / norm, momentum=0.9),
                  loss=tf.keras.losses.BinaryCrossentropy(from_logits=True,
                                                          reduction=tf.keras.losses.Reduction.SUM))
    xs = {k: tf.constant(v) for k, v in features.items()}
    ys = tf.constant(labels.reshape(-1, 1).astype(np.float32))
    step = tf.function(lambda: model.train_step((xs, ys)))
    for _ in range(int(steps)):
        step()
    return base


def predict_fn(model):
    def predict(features):
        return model({k: np.asarray(v) for k, v in features.items()}, training=False).numpy().reshape(-1)
    return predict


def train_with_canaries(noise_multiplier: float, stated: float, num_rows: int = 500,
                        num_canaries: int = 400, steps: int = 1000, delta: float = 1e-5,
                        seed: int = 0, candidates=None, **train_kwargs):
    """Builds data + canaries, trains once, audits. Returns (AuditResult, seconds, eval accuracy)."""
    rng = np.random.default_rng(seed)
    x, y = make_data(num_rows, seed)
    canaries = audit.make_canaries(LAYOUT, num_canaries, rng)
    xt, yt, included = audit.insert(x, y, canaries, rng)
    t0 = time.time()
    # The normaliser is public: the real row count plus the expected number of canaries.
    model = train_dp_gd(xt, yt, noise_multiplier, steps, normaliser=num_rows + num_canaries / 2,
                        seed=seed, **train_kwargs)
    seconds = time.time() - t0
    result = audit.run_audit(predict_fn(model), canaries, included, delta=delta,
                             candidates=candidates, stated_epsilon=stated)
    xe, ye = make_data(2000, seed + 1000)
    acc = float(np.mean((predict_fn(model)(xe) > 0) == (ye > 0.5)))
    return result, seconds, acc


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0])
    a = p.parse_args(argv)
    configs = [("non-private", 0.0, math.inf),
               ("broken (claims eps=1)", 0.0, 1.0)]
    for e in a.epsilons:
        configs.append((f"dp eps={e:g}", noise_for_epsilon(e, a.steps, a.delta), e))
    print(f"rows={a.rows} canaries={a.canaries} steps={a.steps} delta={a.delta:g} "
          f"confidence=0.95 (union bound over {len(audit.candidate_guesses(a.canaries))} (k+,k-) pairs)")
    print(f"| config | noise multiplier | stated epsilon | empirical lower bound | guesses | correct | "
          f"eval accuracy | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, sigma, stated in configs:
        for s in range(a.seeds):
            r, sec, acc = train_with_canaries(sigma, stated, a.rows, a.canaries, a.steps, a.delta, seed=s)
            flag = " **> stated**" if r.contradicts_stated else ""
            print(f"| {name} | {sigma:.3f} | {stated:g} | {r.epsilon_lower_bound:.3f}{flag} | {r.guesses} | "
                  f"{r.correct} | {acc:.3f} | {sec:.1f} |", flush=True)


if __name__ == "__main__":
    main()
