"""DP-SGD benchmark on Adult through the privacy layer: utility with preprocessing inside epsilon under the
honest relation, DP vs non-private epoch time, and the empirical audit's lower bound vs the stated epsilon.

    PYTHONPATH=. python simulations/bench_dp.py utility [--eps 1 3] [--seeds 0 1 2] [--json FILE]
    PYTHONPATH=. python simulations/bench_dp.py tune    [--eps 1 3]       # on a validation split of adult.data
    PYTHONPATH=. python simulations/bench_dp.py speed   [--epochs 21] [--batch 2048] [--parts]
    PYTHONPATH=. python simulations/bench_dp.py audit   [--canaries 1000]
    PYTHONPATH=. python simulations/bench_dp.py all

Every private run here is the pipeline's own path minus TFX: the one reader (``core.dataset.read_rows``),
the public transform (``core.features``), and ``dp_training.protocol.run_private_training`` (plan from
the public planning size, DP normalisation composed with DP-SGD, ledger, guarantee) with a throw-away ledger.
Epsilon is the guarantee's: preprocessing + training, add/remove-one row, n private (q, steps and delta from
``public_row_estimate`` = 30,000), delta 1e-5. Train = adult.data (32,561 rows), test = adult.test (16,281).

Hyper-parameters are never chosen on the test split: ``tune`` splits adult.data into 80 % train / 20 %
validation (seeded) and reports validation accuracy. Tuning on the private data is itself not covered by epsilon,
so the dp_sgd kind's defaults do NOT come from it (issue 17.10): they are Tramer & Boneh 2021's published recipe
(``dp_training/trainer.py``); ``validate`` is a sanity check of those defaults on the validation split.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DELTA = 1e-5


def load(data_dir=os.path.join(REPO, "data", "adult")):
    from core.dataset import load_dataset, read_rows
    from core.features import transform_columns

    spec = load_dataset(data_dir)
    out = []
    for split in ("train", "eval"):
        rows = read_rows(spec, split)
        out.append((transform_columns(spec, rows.columns), rows.labels))
    return spec, out[0], out[1]


def _subset(xy, idx):
    x, y = xy
    return {k: v[idx] for k, v in x.items()}, y[idx]


def _accuracy(model, xy):
    x, y = xy
    logits = np.asarray(model(x, training=False)).reshape(-1)
    return float(((logits > 0) == (y > 0.5)).mean())


def _auc(model, xy):
    from sklearn.metrics import roc_auc_score
    x, y = xy
    return float(roc_auc_score(y, np.asarray(model(x, training=False)).reshape(-1)))


HIDDEN = (64, 64)   # the pipeline's default model (RunConfig.hidden_units)


def private_run(spec, train, test, trainer_args, privacy_args, kind=None, log=lambda m: None):
    """One run through the privacy layer with its own throw-away ledger; returns (model, guarantee, result)."""
    from dp_training.ledger import Ledger
    from dp_training.protocol import run_private_training
    from dp_training.trainer import DPSGDTrainer

    with tempfile.TemporaryDirectory() as wd:
        result = run_private_training(spec, "dp_sgd", trainer_args, {"delta": DELTA, **privacy_args}, train[0],
                                      train[1], test[0], test[1], scratch_dir=os.path.join(wd, "scratch"),
                                      kind=kind or DPSGDTrainer(), log=log, hidden_units=HIDDEN,
                                      ledger=Ledger(os.path.join(wd, "ledger.sqlite")))
    return result.outcome.model, result.guarantee, result


def non_private(spec, train, test, epochs=20, batch=256, seed=0):
    import tensorflow as tf
    from dp_training.model import bucket_sizes, build_model
    from dp_training.preprocessing import NormalizationPlan, release_normalization
    from core.features import numeric_key

    tf.random.set_seed(seed)
    keys = tuple(numeric_key(c) for c in spec.numeric_features)
    stats = release_normalization(NormalizationPlan(keys, 0.0, None), {k: train[0][k] for k in keys})
    m = build_model(spec, bucket_sizes(spec), stats, HIDDEN)
    m.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
    m.fit(train[0], train[1], batch_size=batch, epochs=epochs, verbose=0)
    return m


DP_ARGS = {"mia": False}


def bench_utility(spec, train, test, eps_list, seeds, args):
    rows = []
    accs = [_accuracy(non_private(spec, train, test, seed=s), test) for s in seeds]
    rows.append({"epsilon": "non-private", "accuracy_mean": float(np.mean(accs)), "accuracies": accs})
    print(f"non-private (same model and features, exact normalisation): accuracy {np.mean(accs):.4f} {accs}",
          flush=True)
    for eps in eps_list:
        accs, aucs, achieved = [], [], []
        for seed in seeds:
            model, g, _ = private_run(spec, train, test, {**DP_ARGS, **args, "seed": seed}, {"target_epsilon": eps})
            accs.append(_accuracy(model, test))
            aucs.append(_auc(model, test))
            achieved.append(g.epsilon)
        row = {"epsilon": eps, "achieved_epsilon": max(achieved), "relation": g.relation,
               "accuracy_mean": float(np.mean(accs)), "accuracies": accs, "auc_mean": float(np.mean(aucs)),
               "noise_multiplier": g.parameters["noise_multiplier"],
               "preprocessing_noise_multiplier": g.parameters.get("preprocessing_noise_multiplier"),
               "steps": g.parameters["steps"], "args": {**DP_ARGS, **args}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nAdult test accuracy ({len(test[1])} rows), epsilon = preprocessing + DP-SGD, delta {DELTA:g}, "
          f"add/remove-one row, n private; seeds {list(seeds)}")
    print(f"{'epsilon':>12s} {'sigma':>7s} {'accuracy':>9s} {'auc':>7s}")
    for r in rows[1:]:
        print(f"{r['epsilon']:>12g} {r['noise_multiplier']:7.3f} {r['accuracy_mean']:9.4f} {r['auc_mean']:7.4f}")
    print(f"{'non-private':>12s} {'-':>7s} {rows[0]['accuracy_mean']:9.4f}")
    return rows


GRID = [dict(l2_norm_clip=c, batch_size=b, epochs=e, learning_rate=lr)
        for c in (0.5, 1.0) for b in (512, 1024, 2048) for e in (20, 40) for lr in (1.0, 2.0)]


def validation_split(train):
    """80 % / 20 % of the training file (seeded): what hyper-parameters are chosen on."""
    rng = np.random.default_rng(1234)
    perm = rng.permutation(len(train[1]))
    cut = int(0.8 * len(perm))
    return _subset(train, perm[:cut]), _subset(train, perm[cut:])


def bench_tune(spec, train, test, eps_list, seed=0):
    """Grid on a validation split of the training file (never the test split)."""
    tr, va = validation_split(train)
    out = []
    for eps in eps_list:
        for args in GRID:
            model, g, _ = private_run(spec, tr, va, {**DP_ARGS, **args, "seed": seed}, {"target_epsilon": eps})
            row = {"epsilon": eps, **args, "validation_accuracy": _accuracy(model, va)}
            out.append(row)
            print(json.dumps(row), flush=True)
    for eps in eps_list:
        best = max((r for r in out if r["epsilon"] == eps), key=lambda r: r["validation_accuracy"])
        print(f"best at epsilon {eps:g} on validation: {best}")
    return out


def _np_step(spec, x, y):
    """The non-private baseline: the same model, the Keras loss and SGD with momentum, the same in-graph gather."""
    import tensorflow as tf
    from dp_training.model import bucket_sizes, build_model

    model = build_model(spec, bucket_sizes(spec))
    opt = tf.keras.optimizers.SGD(0.1, momentum=0.9)
    loss_fn = tf.keras.losses.BinaryCrossentropy(from_logits=True)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def step(idx):
        with tf.GradientTape() as tape:
            loss = loss_fn(tf.gather(y, idx), model({k: tf.gather(v, idx) for k, v in x.items()}, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    step = step.get_concrete_function()   # called as the trainer calls its step: a concrete function, tensors in
    return lambda idx: step(tf.constant(idx, tf.int64)) if idx.size else None


def _tf_philox_normals():
    """The trainer's previous sampler (diagnostics only): ``n -> N(0, 1)[n]``, four fresh TensorFlow Philox
    generators' normals summed and halved."""
    import tensorflow as tf
    from dp_training import secure_noise

    gens = [tf.random.Generator.from_non_deterministic_state(alg="philox") for _ in range(secure_noise.N_STREAMS)]
    return lambda n: tf.add_n([g.normal([n]) for g in gens]) * 0.5


def _dp_stepper(spec, x, y, batch, zero_noise=False, noise=None):
    """``(path, step(idx), model)``: the trainer's own DP step (``_DPStepper`` on the path ``train`` picks, rows
    bound in-graph) with the dp_sgd defaults (clip, learning rate, momentum) and sigma 1, traced. Diagnostics
    only: ``zero_noise`` (how much of the step is the noise) traces it with the noise replaced by zeros;
    ``noise="tf_philox"`` with the previous sampler (TensorFlow's Philox normals, four streams summed, halved)."""
    from unittest import mock

    import tensorflow as tf
    from dp_training import secure_noise, trainer as trainer_mod
    from dp_training.model import bucket_sizes, build_model

    n = len(y)
    model = build_model(spec, bucket_sizes(spec))
    path = "fused_dense" if trainer_mod.supports_fused_dense(model) else "fast_gradient_clipping"
    d = trainer_mod.DEFAULTS
    plan = {"noise_multiplier": 1.0, "l2_norm_clip": d["l2_norm_clip"], "learning_rate": d["learning_rate"],
            "args": {"momentum": d["momentum"]}, "sampling_rate": batch / n, "num_rows": n}
    specs = {k: tf.TensorSpec((None,) + v.shape[1:], tf.as_dtype(v.dtype)) for k, v in x.items()}
    stepper = trainer_mod._DPStepper(model, path, plan, specs)
    philox_normals = _tf_philox_normals()

    def tf_philox(self, tensors, std, words):
        z = philox_normals(sum(t.shape.num_elements() for t in tensors)) * std
        return [tf.reshape(p, t.shape) for p, t in zip(tf.split(z, [t.shape.num_elements() for t in tensors]),
                                                       tensors)]

    like = (lambda self, tensors, std, words: [tf.zeros_like(t) for t in tensors]) if zero_noise else (
        tf_philox if noise == "tf_philox" else None)
    # trace (the noise is drawn inside the traced step: the diagnostic's noise must be in place while it traces;
    # bind_rows traces the row step at once)
    with mock.patch.object(secure_noise.GaussianNoise, "like", like) if like else contextlib.nullcontext():
        stepper.bind_rows(x, y)
        stepper.step_rows(np.arange(min(batch, n), dtype=np.int64))
        stepper.noise_step()
    if like:   # ... and no random words drawn on the host either
        zeros = np.zeros(stepper._words_spec.shape, np.uint32)  # pylint: disable=protected-access
        stepper._words = lambda: zeros  # pylint: disable=protected-access
    def run(idx):
        return stepper.step_rows(idx) if idx.size else stepper.noise_step()

    run.stepper = stepper
    return path, run, model


def noise_draw_seconds(total, reps=500):
    """CPU seconds per draw of ``total`` noise values, alternating in one process: the trainer's noise (AES-256-CTR
    words on the host, Box-Muller in one traced call) and TensorFlow's Philox normal sampler on four streams (what
    the trainer drew before; its scalar Box-Muller per pair of words), both summed over four draws and halved."""
    import tensorflow as tf
    from dp_training import secure_noise

    noise, shape = secure_noise.GaussianNoise(), [tf.zeros([total])]
    ours = tf.function(lambda w: noise.like(shape, 1.0, w)[0],
                       input_signature=[tf.TensorSpec(secure_noise.words_shape(total), tf.uint32)])
    philox_normals = _tf_philox_normals()
    philox = tf.function(lambda: philox_normals(total))
    draws = {"AES-256-CTR + vectorised Box-Muller (now)": lambda: ours(noise.words(total)),
             "TensorFlow Philox normal sampler x4 (before)": philox}
    times = {k: [] for k in draws}
    for k, f in draws.items():
        f()
    for _ in range(5):
        for k, f in draws.items():
            c0 = time.process_time()
            for _ in range(reps):
                f()
            times[k].append((time.process_time() - c0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_speed(spec, train, test, epochs=6, batch=2048, parts=False):
    """CPU and wall seconds per epoch, side by side in one process: a non-private SGD step and the trainer's DP
    step on the same model, the same Poisson batches and the same in-graph gather. Epochs alternate (NP, DP, DP,
    NP, ...) so both see the same load; medians of epochs 2..; the ratios are DP / non-private. ``parts`` adds the
    DP step with its noise replaced by zeros (a diagnostic: the noise's share of the step)."""
    from dp_training import trainer as trainer_mod

    n = len(train[1])
    x = trainer_mod._as_inputs(train[0])
    y = np.asarray(train[1], np.float32).reshape(-1, 1)
    import tensorflow as tf
    xt, yt = {k: tf.constant(v) for k, v in x.items()}, tf.constant(y)
    runs = {"non-private": _np_step(spec, xt, yt)}
    path, runs["DP-SGD"], dp_model = _dp_stepper(spec, x, y, batch)
    if parts:
        runs["DP-SGD, noise zeroed (diagnostic)"] = _dp_stepper(spec, x, y, batch, zero_noise=True)[1]
        runs["DP-SGD, TF Philox sampler (before)"] = _dp_stepper(spec, x, y, batch, noise="tf_philox")[1]
    rng = np.random.default_rng(0)
    steps_per_epoch = n // batch
    cpu = {k: [] for k in runs}
    wall = {k: [] for k in runs}
    load = [os.getloadavg()[0]]
    names = list(runs)
    for e in range(epochs):
        batches = [i.astype(np.int64) for i in trainer_mod.batch_indices(n, batch, steps_per_epoch, "poisson", rng)]
        for name in (names if e % 2 == 0 else names[::-1]):
            c0, w0 = time.process_time(), time.perf_counter()
            for idx in batches:
                runs[name](idx)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
        load.append(os.getloadavg()[0])
    med = {k: (statistics.median(cpu[k][1:]), statistics.median(wall[k][1:])) for k in runs}
    c0, w0 = med["non-private"]
    print(f"\nSeconds per epoch on Adult ({n} rows, expected batch {batch}, {steps_per_epoch} Poisson steps), "
          f"epochs alternating, median of epochs 2..{epochs}; DP path {path}; load average "
          f"{min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores:")
    print(f"  {'':36s} {'CPU s':>8s} {'ratio':>6s} {'wall s':>8s} {'ratio':>6s}")
    for k, (c, w) in med.items():
        print(f"  {k:36s} {c:8.4f} {c / c0:5.2f}x {w:8.4f} {w / w0:5.2f}x")
    if parts:
        noise = (med["DP-SGD"][0] - med["DP-SGD, noise zeroed (diagnostic)"][0]) / steps_per_epoch
        print(f"  the noise: {1e3 * noise:.2f} ms of CPU per step ({noise * steps_per_epoch / c0:.2f}x of the "
              f"non-private epoch); the clipping: {med['DP-SGD, noise zeroed (diagnostic)'][0] / c0 - 1:+.2f}x")
        total = sum(int(np.prod(v.shape)) for v in dp_model.trainable_variables)
        draw = noise_draw_seconds(total)
        print(f"  one step's noise alone ({total} values, load {os.getloadavg()[0]:.1f}): " + "; ".join(
            f"{k} {1e3 * v:.3f} ms" for k, v in draw.items()))
    return {"path": path, "batch": batch, "epochs": epochs, "load_average": load,
            "cpu_seconds": cpu, "wall_seconds": wall,
            "cpu_ratio": med["DP-SGD"][0] / c0, "wall_ratio": med["DP-SGD"][1] / w0}


def bench_audit(spec, train, test, canaries=1000, eps_list=(1.0, 3.0), args=None):
    """Stated epsilon vs the one-run audit's empirical lower bound, including a deliberately broken run."""
    from dp_training.trainer import DPSGDTrainer

    class NoiseSwitchedOff(DPSGDTrainer):  # a bug: plans and reports sigma, trains with none
        def train(self, context):
            internal = dict(context.plan.internal, noise_multiplier=0.0)
            plan = dataclasses.replace(context.plan, internal=internal)
            outcome = super().train(dataclasses.replace(context, plan=plan))
            outcome.released_event = context.plan.event   # ... and reports the planned noise
            return outcome

    settings = [("full Adult", train, {**DP_ARGS, **(args or {}), "seed": 0}, canaries, None),
                # where a black-box one-run audit has power: 300 real rows, 400 canaries, many small steps
                ("300 Adult rows", _subset(train, np.arange(300)),
                 {**DP_ARGS, "epochs": 60, "batch_size": 64, "learning_rate": 0.1, "l2_norm_clip": 5.0, "seed": 0},
                 400, 1500)]
    rows = []
    for data_label, data, run_args, m, planning in settings:
        run_spec = spec if planning is None else dataclasses.replace(
            spec, privacy=dataclasses.replace(spec.privacy, public_row_estimate=planning))
        for label, kind, eps in ([(f"DP-SGD epsilon {e:g}", None, e) for e in eps_list]
                                 + [("broken: noise switched off, claims epsilon 1", NoiseSwitchedOff(), 1.0)]):
            model, g, _ = private_run(run_spec, data, test, run_args, {"target_epsilon": eps, "audit_canaries": m},
                                      kind=kind)
            rows.append({"data": data_label, "run": label, "stated_epsilon": g.epsilon,
                         "lower_bound": g.audit["epsilon_lower_bound"], "canaries": m,
                         "test_accuracy": _accuracy(model, test)})
            print(json.dumps(rows[-1]), flush=True)
    print("\nOne-run audit (Steinke et al. 2023), 95% confidence:")
    print(f"{'data':16s} {'canaries':>8s} {'run':48s} {'stated':>7s} {'lower bound':>12s}")
    for r in rows:
        print(f"{r['data']:16s} {r['canaries']:8d} {r['run']:48s} {r['stated_epsilon']:7.3g} {r['lower_bound']:12.3g}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["utility", "validate", "tune", "speed", "audit", "all"])
    p.add_argument("--eps", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--hidden", type=int, nargs="*", default=None, help="hidden layer widths (default 64 64)")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--preprocessing-epsilon-share", type=float, default=None)
    p.add_argument("--parts", action="store_true", help="speed: also time the DP step with its noise zeroed")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    spec, train, test = load()
    global HIDDEN
    if a.hidden is not None:
        HIDDEN = tuple(a.hidden)
    args = {k: v for k, v in {"epochs": a.epochs, "batch_size": a.batch, "l2_norm_clip": a.clip,
                              "learning_rate": a.lr, "momentum": a.momentum}.items() if v is not None}
    if a.preprocessing_epsilon_share is not None:
        from dp_training.protocol import options as privacy_options
        privacy_options.PREPROCESSING_SHARE = a.preprocessing_epsilon_share
    results = {}
    if a.what in ("tune",):
        results["tune"] = bench_tune(spec, train, test, a.eps)
    if a.what in ("speed", "all"):
        results["speed"] = bench_speed(spec, train, test, epochs=a.epochs or 21, batch=a.batch or 2048,
                                       parts=a.parts)
    if a.what == "validate":  # one setting on the validation split (a sanity check, never the defaults' source)
        tr, va = validation_split(train)
        results["validate"] = bench_utility(spec, tr, va, a.eps, a.seeds, args)
    if a.what in ("utility", "all"):
        results["utility"] = bench_utility(spec, train, test, a.eps, a.seeds, args)
    if a.what in ("audit", "all"):
        results["audit"] = bench_audit(spec, train, test, a.canaries, tuple(a.eps), args)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
