"""Fashion-MNIST benchmark of the image path (issue 12): DP-SGD test accuracy of the three image models at several
epsilons and seeds, DP vs non-private seconds per epoch of one model side by side, and the wall time of the full
``privtrain run --data data/fashion_mnist``.

    PYTHONPATH=. python simulations/bench_images.py utility [--models scatternet_linear] [--eps 1 2 3]
                                                            [--seeds 0 1 2] [--epochs E] [--json FILE]
    PYTHONPATH=. python simulations/bench_images.py speed   [--model scatternet_linear] [--epochs 2]
    PYTHONPATH=. python simulations/bench_images.py pipeline [--workdir DIR]     # privtrain run, timed per component

Every private run is the pipeline Trainer's own path minus TFX: the one reader (``core.dataset
.read_images``), the public pixel scaling, cached ScatterNet features, and ``dp_training.images
.run_image_training`` -> ``dp_training.protocol.run_private_training`` (plan from the public planning size
60,000; the default ScatterNet+linear's per-example GroupNorm releases nothing, the models with DP per-channel
normalisation compose it with DP-SGD; a throw-away ledger, the guarantee). Epsilon is the guarantee's (the whole
run), delta 1e-5, add/remove-one image. Train = the 60,000 training images, test = the 10,000 t10k images
(declared public).

Hyper-parameters are Tramèr & Boneh's published Fashion-MNIST settings (``dp_training.images.IMAGE_DEFAULTS``,
from their repository's README), the same at every epsilon (only the noise is recalibrated); nothing is chosen
on the test split. Anchors at epsilon 3, delta 1e-5: ScatterNet+linear 89.7%, ScatterNet+CNN 89.0%, end-to-end
CNN 86.0% (Tramèr & Boneh 2021); tempered-sigmoid CNN 86.1% at epsilon 2.93 (Papernot et al. 2021).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DELTA = 1e-5
DATA = os.path.join(REPO, "data", "fashion_mnist")


def load(data_dir: str = DATA):
    from core.dataset import load_dataset, read_images
    from dp_training.images import scaled_pixels

    spec = load_dataset(data_dir)
    tr, ev = read_images(spec, "train"), read_images(spec, "eval")
    low, high = spec.image.pixel_min, spec.image.pixel_max
    return spec, scaled_pixels(tr.images, low, high), tr.labels, scaled_pixels(ev.images, low, high), ev.labels


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_run(spec, data, model: str, eps: float, seed: int, cache_dir: str, epochs=None) -> dict:
    from dp_training.images import image_trainer_args, run_image_training
    from dp_training.ledger import Ledger
    from dp_training.trainer import DPSGDTrainer

    x, y, xe, ye = data
    args = image_trainer_args(model, {"seed": seed, "mia": False, "epochs": epochs})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        result = run_image_training(
            spec, model, "dp_sgd", DPSGDTrainer(), args, {"target_epsilon": eps, "delta": DELTA},
            x, y, xe, ye, scratch_dir=os.path.join(tmp, "scratch"), cache_dir=cache_dir, log=log_stderr,
            ledger=Ledger(os.path.join(tmp, "ledger.sqlite")), seed=seed)
        seconds = time.time() - t0
    g = result.guarantee
    d = result.outcome.private_details
    return {"model": model, "target_epsilon": eps, "seed": seed, "epsilon": g.epsilon, "delta": g.delta,
            "accountant": g.accountant, "relation": g.relation, "test_accuracy": d["eval_accuracy"],
            "epochs": args["epochs"], "dp_path": result.outcome.public_details.get("dp_path"),
            "noise_multiplier": g.parameters.get("noise_multiplier"),
            "preprocessing_noise_multiplier": g.parameters.get("preprocessing_noise_multiplier"),
            "seconds_per_epoch": d.get("seconds_per_epoch"), "run_seconds": round(seconds, 1)}


def utility(a) -> dict:
    spec, x, y, xe, ye = load()
    rows = []
    for model in a.models:
        for eps in a.eps:
            for seed in a.seeds:
                r = one_run(spec, (x, y, xe, ye), model, eps, seed, a.cache, a.epochs)
                rows.append(r)
                print(f"{model:18s} eps {r['epsilon']:.3f} (target {eps:g}, delta {r['delta']:g}, {r['accountant']}, "
                      f"{r['relation']}) seed {seed}: test accuracy {r['test_accuracy']:.4f}  "
                      f"[{r['dp_path']}, {r['epochs']:g} epochs, sigma {r['noise_multiplier']:.3f}, "
                      f"{r['seconds_per_epoch']:.2f} s/epoch, run {r['run_seconds']:.0f} s]", flush=True)
                if a.json:
                    _write(a.json, rows)
    print("\nmodel               target eps  mean acc   std     seeds")
    for model in a.models:
        for eps in a.eps:
            accs = [r["test_accuracy"] for r in rows if r["model"] == model and r["target_epsilon"] == eps]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"{model:18s}  {eps:10g}  {statistics.mean(accs):.4f}   {sd:.4f}  {len(accs)}")
    return {"runs": rows}


def speed(a) -> dict:
    """Seconds per epoch of DP-SGD (the path it picks) vs non-private SGD on the same model, same batches."""
    import tensorflow as tf

    from dp_training.images import IMAGE_DEFAULTS, NORMALISED_KEY, NORMALIZATION, build_image_model, \
        dense_head_model, fixed_feature_model, model_inputs, per_example_features
    from dp_training.preprocessing import ChannelStats
    from dp_training.trainer import DPSGDTrainer, _DPStepper, batch_indices, supports_fused_dense, \
        supports_fast_gradient_clipping

    spec, x, y, xe, ye = load()
    inputs = model_inputs(a.model, x, a.cache, log_stderr)
    key = next(iter(inputs))
    feats = np.asarray(inputs[key], np.float32)
    n = len(y)
    hp = IMAGE_DEFAULTS[a.model]
    bs = hp["batch_size"]
    k = feats.shape[1]
    stats = ChannelStats((0.0,) * k, (1.0,) * k) if key == "scattering" else None
    steps = int(round(a.epochs * n / bs))
    yl = y.astype(np.float32).reshape(-1, 1)
    out = {"model": a.model, "batch_size": bs, "epochs": a.epochs, "rows": n}

    base = build_image_model(a.model, feats.shape[1:], spec.num_classes, stats)
    if NORMALIZATION[a.model] == "group_norm":   # as the Trainer: the Dense head on the normalised features
        feats = per_example_features(fixed_feature_model(base), feats)
        key, base = NORMALISED_KEY, dense_head_model(base)
    path = ("fused_dense" if supports_fused_dense(base) else
            "fast_gradient_clipping" if supports_fast_gradient_clipping(base) else "vectorized_optimizer")
    plan = {"noise_multiplier": 1.0, "l2_norm_clip": hp["l2_norm_clip"], "learning_rate": hp["learning_rate"],
            "args": {"momentum": hp["momentum"]}, "sampling_rate": bs / n, "num_rows": n}
    specs = {key: tf.TensorSpec((None,) + feats.shape[1:], tf.float32)}
    stepper = _DPStepper(base, path, plan, specs)
    stepper.bind_rows({key: feats}, yl)
    rng = np.random.default_rng(0)
    batches = list(batch_indices(n, bs, steps, "poisson", rng))
    stepper.step_rows(batches[0])   # trace
    t0 = time.time()
    for idx in batches:
        stepper.step_rows(idx)
    dp_seconds = (time.time() - t0) / a.epochs

    plain = build_image_model(a.model, inputs[next(iter(inputs))].shape[1:], spec.num_classes, stats)
    if key == NORMALISED_KEY:
        plain = dense_head_model(plain)
    opt = tf.keras.optimizers.SGD(hp["learning_rate"], momentum=hp["momentum"])
    xs, ys = tf.constant(feats), tf.constant(y.astype(np.int32))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def plain_step(idx):
        with tf.GradientTape() as tape:
            logits = plain(tf.gather(xs, idx), training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.gather(ys, idx), logits))
        grads = tape.gradient(loss, plain.trainable_variables)
        opt.apply_gradients(zip(grads, plain.trainable_variables))
        return loss

    plain_step(batches[0].astype(np.int64))
    t0 = time.time()
    for idx in batches:
        plain_step(idx.astype(np.int64))
    plain_seconds = (time.time() - t0) / a.epochs
    out.update({"dp_path": path, "dp_seconds_per_epoch": round(dp_seconds, 3),
                "non_private_seconds_per_epoch": round(plain_seconds, 3),
                "dp_over_non_private": round(dp_seconds / plain_seconds, 2)})
    print(f"{a.model}: DP-SGD ({path}) {dp_seconds:.2f} s/epoch, non-private SGD {plain_seconds:.2f} s/epoch, "
          f"ratio {dp_seconds / plain_seconds:.2f} (batch {bs}, {a.epochs:g} epochs of {n} rows, same batches; "
          "features precomputed for both)")
    return out


def pipeline(a) -> dict:
    """The full ``privtrain run --data data/fashion_mnist --target-epsilon 3 --delta 1e-5`` (a fresh workdir and
    ledger: nothing cached), timed: wall seconds, each component's seconds, the test accuracy, the load average."""
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench-images-")
    env = dict(os.environ, PRIVTRAIN_LEDGER=os.path.join(workdir, "ledger.sqlite"), TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [os.path.join(REPO, "privtrain"), "run", "--data", DATA, "--workdir", workdir, "--target-epsilon", "3",
           "--delta", str(DELTA), "--json"] + a.extra
    load_before = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    out = {"command": " ".join(cmd), "exit_code": proc.returncode, "wall_seconds": round(seconds, 1),
           "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
    else:
        summary = json.loads(proc.stdout)
        out["component_seconds"] = {c["component"]: c["seconds"] for c in summary["components"]}
        out["test_accuracy"] = summary["metrics"]["Overall"]["sparse_categorical_accuracy"]
        print("  ".join(f"{k} {v:.1f}s" for k, v in out["component_seconds"].items() if v >= 0.05))
        print(f"test accuracy {out['test_accuracy']:.4f}")
    print(f"privtrain run --data data/fashion_mnist: exit {proc.returncode}, {seconds:.0f} s wall, load average "
          f"{load_before:.2f} before, {out['load_average_1min'][1]:.2f} after")
    return out


def _write(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main(argv=None) -> int:
    from dp_training.images import MODELS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("utility")
    u.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    u.add_argument("--eps", nargs="+", type=float, default=[1.0, 2.0, 3.0])
    u.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    u.add_argument("--epochs", type=float, default=None, help="override the published epochs (state it!)")
    s = sub.add_parser("speed")
    s.add_argument("--model", default="scatternet_linear", choices=MODELS)
    s.add_argument("--epochs", type=float, default=2.0)
    q = sub.add_parser("pipeline")
    q.add_argument("--workdir", default=None)
    q.add_argument("extra", nargs="*", help="more privtrain run flags (after --)")
    for x in (u, s, q):
        x.add_argument("--json", default=None)
        x.add_argument("--cache", default=os.path.join(REPO, "bench-results", "cache"),
                       help="ScatterNet feature cache (private: derived from the training images)")
    a = p.parse_args(argv)
    out = {"utility": utility, "speed": speed, "pipeline": pipeline}[a.cmd](a)
    if a.json:
        _write(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
