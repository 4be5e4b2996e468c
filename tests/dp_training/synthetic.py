"""Small synthetic data sets and TrainerContexts for the dp_training tests."""
from __future__ import annotations

import numpy as np

from pipeline.trainers.base import TrainerContext


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    num = rng.normal(size=(n, 4)).astype(np.float32)
    cat = rng.integers(0, 5, size=(n, 1)).astype(np.int64)
    logit = 1.5 * num[:, 0] - num[:, 1] + 0.8 * (cat[:, 0] == 2) - 0.3
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return {"num": num, "cat": cat}, labels


def build_model(hidden: int = 8):
    import tensorflow as tf
    num = tf.keras.Input(shape=(4,), name="num", dtype=tf.float32)
    cat = tf.keras.Input(shape=(1,), name="cat", dtype=tf.int64)
    enc = tf.keras.layers.CategoryEncoding(num_tokens=5, output_mode="one_hot")(cat)
    x = tf.keras.layers.Concatenate()([num, enc])
    if hidden:
        x = tf.keras.layers.Dense(hidden, activation="relu")(x)
    out = tf.keras.layers.Dense(1)(x)
    return tf.keras.Model(inputs={"num": num, "cat": cat}, outputs=out)


def make_context(workdir, args, n_train=600, n_eval=300, fingerprint="fp-synthetic", seed=0,
                 builder=build_model):
    xtr, ytr = make_data(n_train, seed)
    xev, yev = make_data(n_eval, seed + 1)
    logs = []
    ctx = TrainerContext(dataset_name="synthetic", dataset_fingerprint=fingerprint,
                         train_features=xtr, train_labels=ytr, eval_features=xev, eval_labels=yev,
                         build_model=builder, args=args, workdir=str(workdir), log=logs.append)
    return ctx, logs
