"""Speed of DP-SGD on a CNN: ghost clipping for Conv2D (the trainer's fast path) vs TF Privacy's vectorized
per-example path vs non-private SGD, side by side in one run.

    PYTHONPATH=. nice -n 10 python simulations/bench_conv_clipping.py [--batches 256 2048] [--steps 5] [--rounds 3]
        [--vectorized-steps 1] [--vectorized-max-batch 512] [--ablation] [--json FILE]

The model is Papernot et al. 2021's tempered-sigmoid (tanh) CNN for 28x28x1 images (Conv2D 16 8x8/2 same,
MaxPool 2/1, Conv2D 32 4x4/2 valid, MaxPool 2/1, Flatten, Dense 32 tanh, Dense 10; 26,010 weights). Every path
takes the *trainer's own* DP step (``dp_training.trainer._DPStepper``: TF Privacy's ``DPModel`` with
``dp_training.conv_clipping.make_layer_registry()`` for ``fast_gradient_clipping``, TF Privacy's
``VectorizedDPKerasSGDOptimizer`` for ``vectorized_optimizer``; noise on) on the same fixed batch of the given
size; non-private is a plain Keras SGD step on the same model and batch. Speed does not depend on the pixel
values, so the inputs are uniform random pixels (no data set needed). Each round times ``--steps`` steps of
every path in turn (``--vectorized-steps`` for the vectorized path, two orders of magnitude slower), interleaved
so that machine load hits all paths alike, after two warm-up steps that include the tf.function trace.
Reported: the median over rounds of seconds per step, seconds per epoch of Fashion-MNIST's 60,000 training
images (steps per epoch = 60,000 / batch), and the ratio to non-private.
TF Privacy's vectorized path takes the Jacobian of the batch's loss vector, whose intermediate tensors are
B x B x (activation size): time and memory grow with the batch squared (on this 23 GB machine batch 2048
needs a 13 GB [2048, 2048, 5, 5, 32] tensor and runs out of memory), so it is skipped above
``--vectorized-max-batch`` (512) and reported as skipped; an out-of-memory error is reported, not raised.
``--ablation`` also times the fast path with every Conv2D forced to the ghost norm or to the direct per-example
gradient (the per-layer choice of Bu et al. picks direct for conv1 and ghost for conv2).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

EPOCH_ROWS = 60_000   # Fashion-MNIST's training set


def papernot_cnn(classes: int):
    import tensorflow as tf
    img = tf.keras.Input((28, 28, 1), name="image")
    h = tf.keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="tanh")(img)
    h = tf.keras.layers.MaxPool2D(2, 1)(h)
    h = tf.keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation="tanh")(h)
    h = tf.keras.layers.MaxPool2D(2, 1)(h)
    h = tf.keras.layers.Flatten()(h)
    h = tf.keras.layers.Dense(32, activation="tanh")(h)
    return tf.keras.Model({"image": img}, tf.keras.layers.Dense(classes)(h))


def _classes() -> int:
    """10 logits when the trainer takes multi-class labels (class ids), else one logit (binary labels); the
    head's size hardly matters for speed (the conv layers dominate)."""
    from dp_training import trainer as trainer_mod
    return 10 if hasattr(trainer_mod, "num_outputs") else 1


@contextlib.contextmanager
def _forced_conv_method(method):
    from dp_training import conv_clipping
    orig = conv_clipping.make_layer_registry
    conv_clipping.make_layer_registry = functools.partial(orig, method)
    try:
        yield
    finally:
        conv_clipping.make_layer_registry = orig


def _make_step(path, batch, classes, seed=0):
    import tensorflow as tf
    from dp_training import trainer as trainer_mod

    tf.random.set_seed(seed)
    model = papernot_cnn(classes)
    rng = np.random.default_rng(seed)
    x = {"image": tf.constant(rng.random((batch, 28, 28, 1), dtype=np.float32))}
    y = tf.constant(rng.integers(0, max(classes, 2), size=(batch, 1)).astype(np.float32))
    if path == "non_private":
        opt = tf.keras.optimizers.SGD(0.1, momentum=0.9)
        loss_fn = (tf.keras.losses.BinaryCrossentropy(from_logits=True) if classes == 1 else
                   tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss
        return step
    dp_path, _, method = path.partition(":")
    plan = {"noise_multiplier": 1.0, "l2_norm_clip": 1.0, "learning_rate": 0.1, "args": {"momentum": 0.9},
            "sampling_rate": batch / EPOCH_ROWS, "num_rows": EPOCH_ROWS}
    specs = {"image": tf.TensorSpec((None, 28, 28, 1), tf.float32)}
    with _forced_conv_method(method) if method else contextlib.nullcontext():
        stepper = trainer_mod._DPStepper(model, dp_path, plan, specs)
    return lambda: stepper.step(x, y)


def bench(batches=(256, 2048), steps=5, rounds=3, ablation=False, vectorized_steps=1, vectorized_max_batch=512):
    import tensorflow as tf

    paths = ["fast_gradient_clipping", "vectorized_optimizer", "non_private"]
    if ablation:
        paths[1:1] = ["fast_gradient_clipping:ghost", "fast_gradient_clipping:direct"]
    classes = _classes()
    results = {"classes": classes, "steps": steps, "vectorized_steps": vectorized_steps, "rounds": rounds,
               "vectorized_max_batch": vectorized_max_batch, "rows": []}
    for batch in batches:
        fns, skipped = {}, {}
        for p in paths:
            if p == "vectorized_optimizer" and batch > vectorized_max_batch:
                skipped[p] = (f"not run: batch > --vectorized-max-batch {vectorized_max_batch} (its per-example "
                              f"Jacobian holds B x B x activation tensors)")
                continue
            try:
                fns[p] = _make_step(p, batch, classes)
                for _ in range(2):   # trace + warm-up
                    fns[p]()
            except tf.errors.ResourceExhaustedError as exc:
                fns.pop(p, None)
                skipped[p] = "out of memory: " + str(exc).strip().splitlines()[0][:200]
        times = {p: [] for p in fns}
        for _ in range(rounds):
            for p in fns:
                k = vectorized_steps if p == "vectorized_optimizer" else steps
                t0 = time.perf_counter()
                for _ in range(k):
                    out = fns[p]()
                _ = np.asarray(out["loss"] if isinstance(out, dict) else out)
                times[p].append((time.perf_counter() - t0) / k)
        base = statistics.median(times["non_private"])
        print(f"\nPapernot CNN, 28x28x1, batch {batch} ({classes} logits), median of {rounds} rounds x {steps} steps "
              f"({vectorized_steps} for vectorized):")
        print(f"  {'path':32s} {'s/step':>8s} {'s/epoch(60k)':>13s} {'x non-private':>14s}")
        for p in paths:
            if p in skipped:
                results["rows"].append({"batch": batch, "path": p, "skipped": skipped[p]})
                print(f"  {p:32s} {skipped[p]}", flush=True)
                continue
            s = statistics.median(times[p])
            row = {"batch": batch, "path": p, "seconds_per_step": s,
                   "seconds_per_epoch": s * EPOCH_ROWS / batch, "ratio_to_non_private": s / base,
                   "round_seconds_per_step": times[p]}
            results["rows"].append(row)
            print(f"  {p:32s} {s:8.4f} {row['seconds_per_epoch']:13.1f} {s / base:14.2f}", flush=True)
        if "vectorized_optimizer" in times:
            fast = statistics.median(times["fast_gradient_clipping"])
            vec = statistics.median(times["vectorized_optimizer"])
            print(f"  fast (ghost clipping) is {vec / fast:.1f}x faster than vectorized per-example")
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per path per round")
    ap.add_argument("--vectorized-steps", type=int, default=1,
                    help="timed steps per round for the (slow) vectorized path")
    ap.add_argument("--vectorized-max-batch", type=int, default=512,
                    help="larger batches skip the vectorized path (memory grows with the batch squared)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ablation", action="store_true", help="also force ghost-only / direct-only conv norms")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    res = bench(a.batches, a.steps, a.rounds, a.ablation, a.vectorized_steps, a.vectorized_max_batch)
    res["uptime"] = open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else None
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
