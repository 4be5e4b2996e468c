"""DP-SGD benchmark on Adult: speed of the DP paths and utility at several epsilons.

    PYTHONPATH=. python simulations/bench_dp.py speed   [--epochs 3]
    PYTHONPATH=. python simulations/bench_dp.py utility [--eps 0.5 1 3 8] [--epochs 20] ...
    PYTHONPATH=. python simulations/bench_dp.py all

Features are built here with numpy (the pipeline's transform is not used): the 6 numeric columns
z-scored (capital-gain / capital-loss through log1p first), the 8 categorical columns one-hot
(vocabulary from the training file, '?' kept as its own category). NOTE: the z-score statistics and
vocabularies come from the training data and are not themselves differentially private; the
pipeline's transform is responsible for that in production. Train = adult.data (32,561 rows),
eval = adult.test (16,281 rows). Same MLP everywhere: Dense(hidden, relu) -> Dense(1) logit.

All timings are wall-clock seconds per epoch in one process on this machine (CPU), the first
epoch (tracing) excluded, batch 256.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

NUMERIC = {"age": 0, "fnlwgt": 2, "education-num": 4, "capital-gain": 10, "capital-loss": 11,
           "hours-per-week": 12}
CATEGORICAL = {"workclass": 1, "education": 3, "marital-status": 5, "occupation": 6,
               "relationship": 7, "race": 8, "sex": 9, "native-country": 13}


def _read(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("|"):
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 15:
                rows.append(parts)
    return rows


def load_adult(data_dir=os.path.join(REPO, "data", "adult")):
    """(x_train, y_train, x_test, y_test) as float32 arrays."""
    train, test = _read(os.path.join(data_dir, "adult.data")), _read(os.path.join(data_dir,
                                                                                  "adult.test"))

    def numeric(rows):
        cols = []
        for name, i in NUMERIC.items():
            v = np.array([float(r[i]) for r in rows], np.float64)
            if name in ("capital-gain", "capital-loss", "fnlwgt"):
                v = np.log1p(v)
            cols.append(v)
        return np.stack(cols, axis=1)

    ntr, nte = numeric(train), numeric(test)
    mu, sd = ntr.mean(0), ntr.std(0) + 1e-8
    ntr, nte = (ntr - mu) / sd, (nte - mu) / sd
    cats_tr, cats_te = [], []
    for _, i in CATEGORICAL.items():
        vocab = sorted({r[i] for r in train})
        index = {v: k for k, v in enumerate(vocab)}
        for rows, out in ((train, cats_tr), (test, cats_te)):
            oh = np.zeros((len(rows), len(vocab)), np.float64)
            for k, r in enumerate(rows):
                j = index.get(r[i])
                if j is not None:
                    oh[k, j] = 1.0
            out.append(oh)
    xtr = np.concatenate([ntr] + cats_tr, axis=1).astype(np.float32)
    xte = np.concatenate([nte] + cats_te, axis=1).astype(np.float32)
    ytr = np.array([r[14].rstrip(".") == ">50K" for r in train], np.float32)
    yte = np.array([r[14].rstrip(".") == ">50K" for r in test], np.float32)
    return xtr, ytr, xte, yte


def make_builder(dim, hidden):
    def build():
        import tensorflow as tf
        inp = tf.keras.Input(shape=(dim,), name="x", dtype=tf.float32)
        h = tf.keras.layers.Dense(hidden, activation="relu")(inp) if hidden else inp
        out = tf.keras.layers.Dense(1)(h)
        return tf.keras.Model(inputs={"x": inp}, outputs=out)
    return build


def _context(xtr, ytr, xte, yte, build, args, workdir, fingerprint="adult-bench"):
    from pipeline.trainers.base import TrainerContext
    return TrainerContext(dataset_name="adult", dataset_fingerprint=fingerprint,
                          train_features={"x": xtr}, train_labels=ytr,
                          eval_features={"x": xte}, eval_labels=yte, build_model=build,
                          args=args, workdir=workdir, log=lambda m: None)


class _EpochTimer:
    def __init__(self):
        self.times, self._t = [], None

    def callback(self):
        import tensorflow as tf
        outer = self

        class CB(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer._t = time.time()

            def on_epoch_end(self, epoch, logs=None):
                outer.times.append(time.time() - outer._t)
        return CB()


def _median_after_first(times):
    t = list(times)[1:] or list(times)
    return float(np.median(t))


def bench_speed(data, hidden=64, epochs=3, batch=256, noise=1.0, clip=1.0):
    import tensorflow as tf
    from tensorflow_privacy.privacy.optimizers import dp_optimizer_keras
    from dp_training.trainer import DPSGDTrainer
    xtr, ytr, xte, yte = data
    n = xtr.shape[0]
    nb = (n // batch) * batch  # whole batches only (DPKerasSGDOptimizer needs equal microbatches)
    res = {}

    build = make_builder(xtr.shape[1], hidden)
    m = build()
    m.compile(optimizer=tf.keras.optimizers.SGD(0.1),
              loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
    t = _EpochTimer()
    m.fit({"x": xtr[:nb]}, ytr[:nb], batch_size=batch, epochs=epochs, verbose=0,
          callbacks=[t.callback()])
    res["non_private_keras"] = _median_after_first(t.times)

    m = build()
    opt = dp_optimizer_keras.DPKerasSGDOptimizer(l2_norm_clip=clip, noise_multiplier=noise,
                                                 num_microbatches=batch, learning_rate=0.1)
    m.compile(optimizer=opt, loss=tf.keras.losses.BinaryCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE))
    t = _EpochTimer()
    m.fit({"x": xtr[:nb]}, ytr[:nb], batch_size=batch, epochs=epochs, verbose=0,
          callbacks=[t.callback()])
    res["tfp_DPKerasSGDOptimizer"] = _median_after_first(t.times)

    for path in ("fast_gradient_clipping", "vectorized_optimizer"):
        for sampling in ("poisson", "shuffle"):
            with tempfile.TemporaryDirectory() as wd:
                out = DPSGDTrainer().train(_context(
                    xtr, ytr, xte, yte, build,
                    {"noise_multiplier": noise, "l2_norm_clip": clip, "batch_size": batch,
                     "epochs": epochs, "dp_path": path, "sampling": sampling, "mia": False,
                     "learning_rate": 0.1, "accountant": "rdp"}, wd))
            secs = [float(s) for s in out.details["epoch_seconds"].split(",")]
            res[f"dp_sgd_{path}_{sampling}"] = _median_after_first(secs)
    base = res["non_private_keras"]
    print(f"\nSeconds per epoch on Adult ({n} rows, batch {batch}, MLP hidden={hidden}), "
          "first epoch excluded:")
    print(f"{'path':52s} {'s/epoch':>8s} {'x non-private':>14s} {'x DPKerasSGD':>13s}")
    for k, v in res.items():
        print(f"{k:52s} {v:8.3f} {v / base:14.2f} {v / res['tfp_DPKerasSGDOptimizer']:13.3f}")
    return res


def bench_utility(data, eps_list, hidden=64, epochs=20, batch=256, clip=1.0, lr=1.0,
                  momentum=0.9, sampling="poisson", delta=1e-5, accountant="pld",
                  np_epochs=20, seeds=(0,)):
    import tensorflow as tf
    from dp_training.trainer import DPSGDTrainer
    xtr, ytr, xte, yte = data
    build = make_builder(xtr.shape[1], hidden)
    rows = []
    accs = []
    for seed in seeds:
        tf.random.set_seed(seed)
        m = build()
        m.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                  loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
        m.fit({"x": xtr}, ytr, batch_size=batch, epochs=np_epochs, verbose=0)
        logits = np.asarray(m({"x": xte}, training=False)).reshape(-1)
        accs.append(float(((logits > 0) == (yte > 0.5)).mean()))
    rows.append({"epsilon": "non-private", "accuracy": float(np.mean(accs)), "accuracies": accs,
                 "noise_multiplier": 0.0, "mia_auc": None})
    print(f"non-private: accuracy {np.mean(accs):.4f} {accs}", flush=True)
    for eps in eps_list:
        accs, mias = [], []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as wd:
                out = DPSGDTrainer().train(_context(
                    xtr, ytr, xte, yte, build,
                    {"target_epsilon": eps, "delta": delta, "l2_norm_clip": clip,
                     "batch_size": batch, "epochs": epochs, "learning_rate": lr,
                     "momentum": momentum, "sampling": sampling, "accountant": accountant,
                     "seed": seed}, wd))
            accs.append(out.details["eval_accuracy"])
            mias.append(out.privacy.get("mia_auc"))
        row = {"epsilon": eps, "achieved_epsilon": out.privacy["epsilon"],
               "accuracy": float(np.mean(accs)), "accuracies": accs,
               "noise_multiplier": out.privacy["noise_multiplier"],
               "mia_auc": float(np.mean(mias)), "steps": out.privacy["steps"],
               "dp_path": out.details["dp_path"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nUtility on Adult test ({xte.shape[0]} rows), delta={delta:g}, {accountant}, {sampling}, "
          f"clip={clip}, batch={batch}, lr={lr}, momentum={momentum}, epochs={epochs}, "
          f"MLP hidden={hidden}, seeds={list(seeds)}:")
    print(f"{'epsilon':>12s} {'sigma':>7s} {'accuracy':>9s} {'MIA AUC':>8s}")
    for r in rows:
        mia = "-" if r["mia_auc"] is None else f"{r['mia_auc']:.4f}"
        print(f"{str(r['epsilon']):>12s} {r['noise_multiplier']:7.3f} {r['accuracy']:9.4f} {mia:>8s}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["speed", "utility", "all"])
    p.add_argument("--eps", type=float, nargs="+", default=[0.5, 1.0, 3.0, 8.0])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--sampling", default="poisson")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--np-epochs", type=int, default=20)
    a = p.parse_args(argv)
    data = load_adult()
    if a.what in ("speed", "all"):
        bench_speed(data, hidden=a.hidden, epochs=a.epochs or 3, batch=a.batch)
    if a.what in ("utility", "all"):
        bench_utility(data, a.eps, hidden=a.hidden, epochs=a.epochs or 20, batch=a.batch,
                      clip=a.clip, lr=a.lr, momentum=a.momentum, sampling=a.sampling,
                      seeds=a.seeds, np_epochs=a.np_epochs)


if __name__ == "__main__":
    main()
