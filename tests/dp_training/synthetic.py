"""Small synthetic data sets, plans and TrainerContexts for the dp_training tests."""
from __future__ import annotations

import dp_accounting
import numpy as np

from dp_training.contract import PlanInputs, TrainerContext
from core.dataset import PrivacyDeclaration


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


def plan_inputs(args, planning_rows=600, *, relation="add_or_remove_one", target_epsilon=None, delta=None,
                accountant="rdp", base_event=None, unit="row"):
    source = PrivacyDeclaration(source_id="synthetic", unit=unit, relation=relation,
                                public_row_estimate=planning_rows)
    return PlanInputs(kind="dp_sgd", dataset_name="synthetic", source=source, planning_rows=planning_rows,
                      args=dict(args), accountant=accountant,
                      delta=delta if delta is not None else 1.0 / (10 * planning_rows),
                      base_event=base_event or dp_accounting.NoOpDpEvent(), target_epsilon=target_epsilon)


def make_context(tmp_path, args, plan, n_train=600, n_eval=300, seed=0, builder=build_model, log=None):
    xtr, ytr = make_data(n_train, seed)
    xev, yev = make_data(n_eval, seed + 1)
    logs = []
    ctx = TrainerContext(dataset_name="synthetic", train_features=xtr, train_labels=ytr, eval_features=xev,
                         eval_labels=yev, build_model=builder, args=args, plan=plan, scratch_dir=str(tmp_path),
                         log=log or logs.append)
    return ctx, logs
