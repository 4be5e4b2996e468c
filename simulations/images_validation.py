"""Hyper-parameter search for ScatterNet + GroupNorm + linear on a VALIDATION split carved from Fashion-MNIST's
60,000 training images (never the test split): a fixed random 10,000 (seed 12345) are held out, DP-SGD trains on
the other 50,000 with the noise calibrated by the platform's accountant (PLD, Poisson, add/remove-one) for 50,000
rows at the target epsilon, delta 1e-5.

The step is a NumPy replica of the Trainer's ``fused_dense`` step (per-example clipping of the linear layer's
gradient to C, Gaussian noise N(0, (sigma C)^2) on the clipped sum, SGD with momentum and learning rate lr / B) on
the per-example GroupNorm'd features, so a grid point takes about a minute here; it also scores exponential moving
averages of the iterates (post-processing). docs/image_data.md lists what it found.

    PYTHONPATH=. python simulations/images_validation.py --grid 8192:16:40,8192:16:60 [--eps 3] [--seeds 0]
    PYTHONPATH=. python simulations/images_validation.py --schedules constant,cosine,cosine+2 --momentum 0.9,0.95 \
        [--nesterov] --seeds 0,1,2

``--grid``: comma-separated ``batch:learning_rate:epochs``. ``--schedules``: comma-separated learning-rate
schedules over the run's steps (``schedule_factors``): ``constant``, ``cosine`` / ``linear`` (decay to 0),
``step`` (x0.1 at 50 % and 75 % of the steps), each optionally ``+W``: a linear warm-up over the first W epochs.
The schedule is a public choice made before training (the accountant depends only on sigma, q and the steps), so
it costs no privacy. ``--momentum``: comma-separated values in [0, 1); ``--nesterov``: Nesterov momentum, as
``tf.keras.optimizers.SGD(nesterov=True)``. ``--clip``: the clipping norm C (with the published C = 0.1 nearly
every example is clipped; keep lr x C fixed to compare clipping levels at the same step size). ``--pool K``: average
the ScatterNet maps over K x K blocks before the GroupNorm (fewer features, less noise in total); ``--blur A``:
blur each map by ``[A, 1, A] / (1 + 2A)`` along rows and columns (keeps the features, smooths what the weights'
noise can reach). Every grid point, schedule, momentum and seed is run (the product).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VALIDATION_ROWS, SPLIT_SEED, DELTA = 10000, 12345, 1e-5
SCHEDULES = ("constant", "cosine", "linear", "step")
MOMENTUM_HELP = "give comma-separated values in [0, 1), e.g. --momentum 0.9,0.95"
SCHEDULE_HELP = "use one of constant, cosine, linear, step, optionally with +W for W >= 0 warm-up epochs (e.g. cosine+2)"


class OptionError(ValueError):
    """A bad command-line value: main prints its message as one line and exits 2."""


def parse_schedule(text: str) -> tuple[str, float]:
    """``"cosine+2"`` -> ``("cosine", 2.0)``; ``"step"`` -> ``("step", 0.0)``."""
    name, plus, warm = text.strip().partition("+")
    if name not in SCHEDULES:
        raise OptionError(f"--schedules: unknown schedule {text.strip()!r}; {SCHEDULE_HELP}")
    if not plus:
        return name, 0.0
    try:
        epochs = float(warm)
    except ValueError:
        raise OptionError(f"--schedules: {text.strip()!r}: the warm-up {warm!r} is not a number of epochs; "
                          f"{SCHEDULE_HELP}") from None
    if not np.isfinite(epochs) or epochs < 0:
        raise OptionError(f"--schedules: {text.strip()!r}: the warm-up must be a finite number of epochs >= 0; "
                          f"{SCHEDULE_HELP}")
    return name, epochs


def parse_schedules(text: str) -> list[tuple[str, float]]:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise OptionError(f"--schedules: no schedule given; {SCHEDULE_HELP}")
    return [parse_schedule(t) for t in items]


def parse_value(flag: str, text: str, kind, allowed, bounds: str, help_text: str):
    """``kind(text)`` if it is one and ``allowed`` holds, else an OptionError naming ``flag``, what is wrong
    (``bounds``: e.g. "outside [0, 1)") and the fix."""
    try:
        value = kind(text)
    except ValueError:
        raise OptionError(f"{flag}: {text!r} is not {'a whole number' if kind is int else 'a number'}; "
                          f"{help_text}") from None
    if not allowed(value):
        raise OptionError(f"{flag}: {text} is {bounds}; {help_text}")
    return value


def parse_momenta(text: str) -> list[float]:
    out = [parse_value("--momentum", item, float, lambda m: 0.0 <= m < 1.0, "outside [0, 1)", MOMENTUM_HELP)
           for item in (t.strip() for t in text.split(",") if t.strip())]
    if not out:
        raise OptionError(f"--momentum: no value given; {MOMENTUM_HELP}")
    return out


def schedule_factors(name: str, warmup_epochs: float, steps: int, steps_per_epoch: float) -> np.ndarray:
    """The learning rate of each of ``steps`` steps as a fraction of the base rate.

    Warm-up: ``w = round(warmup_epochs * steps_per_epoch)`` steps (capped at ``steps``), step t < w at (t + 1) / w.
    After it, with s = t - w steps into the T = steps - w remaining: ``constant`` 1, ``cosine``
    (1 + cos(pi s / T)) / 2, ``linear`` 1 - s / T (both reach 0 one step after the last), ``step`` 1, then 0.1 from
    step ``steps // 2`` and 0.01 from step ``(3 * steps) // 4`` (50 % and 75 % of all the steps, warm-up included).
    """
    if name not in SCHEDULES:
        raise OptionError(f"--schedules: unknown schedule {name!r}; {SCHEDULE_HELP}")
    t = np.arange(steps, dtype=np.float64)
    w = min(int(round(warmup_epochs * steps_per_epoch)), steps)
    s, total = t - w, max(steps - w, 1)
    if name == "constant":
        f = np.ones(steps)
    elif name == "cosine":
        f = 0.5 * (1 + np.cos(np.pi * s / total))
    elif name == "linear":
        f = 1 - s / total
    else:
        f = np.where(t >= (3 * steps) // 4, 0.01, np.where(t >= steps // 2, 0.1, 1.0))
    if w:
        f = np.where(t < w, (t + 1) / w, f)
    return f


def momentum_step(w, velocity, grad, lr, momentum, nesterov):
    """One step of ``tf.keras.optimizers.SGD`` (dense gradients): v <- m v - lr g; w <- w + v, or with Nesterov
    w <- w + m v - lr g (v the new velocity). For a constant lr this is the same as v <- m v + g; w <- w - lr v."""
    velocity = momentum * velocity - lr * grad
    if nesterov:
        return w + momentum * velocity - lr * grad, velocity
    return w + velocity, velocity


def group_norm(features: np.ndarray, groups: int, eps: float = 1e-5) -> np.ndarray:
    """Per example: [n, channels, h, w] -> [n, channels * h * w], each group standardised by its own statistics."""
    r = np.asarray(features, np.float32).reshape(len(features), groups, -1)
    out = (r - r.mean(-1, keepdims=True)) / np.sqrt(r.var(-1, keepdims=True) + eps)
    return out.reshape(len(features), -1).astype(np.float32)


TRANSFORMS = {"none": lambda s: s, "sqrt": np.sqrt, "log": lambda s: np.log(s + 1e-3)}


def parse_pool(text: str) -> int:
    return parse_value("--pool", text, int, lambda k: k >= 1, "below 1",
                       "give a whole number >= 1 of pixels per side, e.g. --pool 2 (1: no pooling)")


def average_pool(features: np.ndarray, k: int) -> np.ndarray:
    """``[n, channels, h, w]`` -> ``[n, channels, ceil(h/k), ceil(w/k)]``: the mean of each k x k block, the maps
    padded at their far edges by repeating the last row/column (a per-example, parameter-free map: no privacy cost).
    Fewer features, so less noise in total for the linear layer, at the price of spatial detail."""
    if k == 1:
        return features
    ph, pw = (-features.shape[2]) % k, (-features.shape[3]) % k
    f = np.pad(features, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
    n, c, h, w = f.shape
    return f.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5))


def parse_blur(text: str) -> float:
    return parse_value("--blur", text, float, lambda a: 0.0 <= a <= 1.0, "outside [0, 1]",
                       "give a number in [0, 1], e.g. --blur 0.25 (0: no blur)")


def blur(features: np.ndarray, alpha: float) -> np.ndarray:
    """``[n, channels, h, w]``, each map blurred by the separable kernel ``[alpha, 1, alpha] / (1 + 2 alpha)``
    along rows then columns, edges replicated (per example, parameter-free). For a linear layer on top this is the
    same as smoothing its weights: the high spatial frequencies of the DP noise no longer reach the logits, nor
    does the signal's fine detail."""
    if alpha == 0.0:
        return features
    f = np.pad(features, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    rows = (alpha * f[:, :, :-2, :] + f[:, :, 1:-1, :] + alpha * f[:, :, 2:, :]) / (1 + 2 * alpha)
    return (alpha * rows[:, :, :, :-2] + rows[:, :, :, 1:-1] + alpha * rows[:, :, :, 2:]) / (1 + 2 * alpha)


def validation_split(cache: str, groups: int, transform: str = "none", flips: bool = False, pool: int = 1,
                     blur_alpha: float = 0.0):
    """(train, train labels, validation, validation labels[, the training rows' mirrored images' features])."""
    from dp_training.images import scattering_features
    from simulations.bench_images import load

    _, x, y, _, _ = load()            # the test images are loaded by the helper but never used here

    def feats(pixels):
        scattered = np.asarray(scattering_features(pixels, cache), np.float32)
        return group_norm(TRANSFORMS[transform](average_pool(blur(scattered, blur_alpha), pool)), groups)

    features = feats(x)
    y = np.asarray(y, np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    va, tr = perm[:VALIDATION_ROWS], perm[VALIDATION_ROWS:]
    out = [features[tr], y[tr], features[va], y[va]]
    del features
    if flips:                         # left-right mirrored images: a public, per-example augmentation
        out.append(feats(np.ascontiguousarray(x[:, :, ::-1, :]))[tr])
    return out


def train(xtr, ytr, xva, yva, batch, lr, epochs, seed, eps, clip, momentum, emas, init="glorot", xflip=None,
          schedule=("constant", 0.0), nesterov=False):
    """``xflip``: augmentation multiplicity 2 (De et al. 2022): each example's gradient is the mean of its own and
    its mirrored image's, clipped as one (so one example still moves the sum by at most C). ``schedule``:
    ``(name, warm-up epochs)`` (``schedule_factors``); step t uses the learning rate lr * factor[t] / batch."""
    from dp_training.calibration import calibrate_noise_multiplier

    n, d = xtr.shape
    q = batch / n
    steps = int(round(epochs * n / batch))
    sigma = calibrate_noise_multiplier(eps, q, steps, DELTA)
    rates = (lr / batch) * schedule_factors(schedule[0], schedule[1], steps, n / batch)
    rng = np.random.default_rng(seed)
    limit = np.sqrt(6 / (d + 10))                      # Keras' Glorot uniform
    w = rng.uniform(-limit, limit, (d, 10)).astype(np.float32)
    if init == "zeros":
        w[:] = 0.0
    b = np.zeros(10, np.float32)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    avg = {e: (w.copy(), b.copy()) for e in emas}
    sq_inputs = (xtr ** 2).sum(1) + 1.0                # ||a_i||^2 + 1 (kernel and bias)
    tail_w, tail_b, tail = np.zeros_like(w), np.zeros_like(b), 0   # uniform average of the last half (Polyak)
    for t in range(steps):
        idx = np.flatnonzero(rng.random(n) < q)
        a = xtr[idx]
        p = dlogits(a, w, b, ytr[idx])
        if xflip is None:
            factor = clip / np.sqrt(np.maximum(sq_inputs[idx] * (p ** 2).sum(1), clip * clip))
            dz = p * factor[:, None]
            gw = a.T @ dz
            gb = dz.sum(0)
        else:                                           # g = (a1 p1^T + a2 p2^T) / 2 (+ bias (p1 + p2) / 2)
            a2 = xflip[idx]
            p2 = dlogits(a2, w, b, ytr[idx])
            sq = (sq_inputs[idx] - 1) * (p ** 2).sum(1) + ((a2 ** 2).sum(1)) * (p2 ** 2).sum(1) \
                + 2 * (a * a2).sum(1) * (p * p2).sum(1) + ((p + p2) ** 2).sum(1)
            factor = clip / np.sqrt(np.maximum(sq / 4, clip * clip))
            gw = (a.T @ (p * factor[:, None]) + a2.T @ (p2 * factor[:, None])) / 2
            gb = ((p + p2) * factor[:, None]).sum(0) / 2
        gw = gw + rng.normal(0, sigma * clip, w.shape).astype(np.float32)
        gb = gb + rng.normal(0, sigma * clip, b.shape).astype(np.float32)
        w, vw = momentum_step(w, vw, gw, np.float32(rates[t]), np.float32(momentum), nesterov)
        b, vb = momentum_step(b, vb, gb, np.float32(rates[t]), np.float32(momentum), nesterov)
        avg = {e: (e * aw + (1 - e) * w, e * ab + (1 - e) * b) for e, (aw, ab) in avg.items()}
        if t >= steps // 2:
            tail_w, tail_b, tail = tail_w + w, tail_b + b, tail + 1

    def accuracy(w, b):
        return float(((xva @ w + b).argmax(1) == yva).mean())

    label = schedule[0] + (f"+{schedule[1]:g}" if schedule[1] else "")
    out = {"batch": batch, "lr": lr, "epochs": epochs, "schedule": label, "momentum": momentum,
           "nesterov": nesterov, "seed": seed, "sigma": round(sigma, 3),
           "validation_accuracy": accuracy(w, b)}
    out.update({f"ema_{e:g}": accuracy(*avg[e]) for e in emas})
    out["tail_average"] = accuracy(tail_w / tail, tail_b / tail)
    return out


def dlogits(a, w, b, labels):
    """d cross-entropy / d logits, per example."""
    z = a @ w + b
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="8192:16:40")
    p.add_argument("--eps", type=float, default=3.0)
    p.add_argument("--seeds", default="0")
    p.add_argument("--clip", type=float, default=0.1)
    p.add_argument("--momentum", default="0.9", help="comma-separated values in [0, 1)")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (as tf.keras SGD(nesterov=True))")
    p.add_argument("--schedules", default="constant",
                   help="comma-separated learning-rate schedules: constant, cosine, linear, step, each optionally "
                        "+W (a linear warm-up over the first W epochs), e.g. cosine+2")
    p.add_argument("--groups", type=int, default=27)
    p.add_argument("--init", choices=["glorot", "zeros"], default="glorot", help="the linear layer's kernel")
    p.add_argument("--flip-multiplicity", action="store_true",
                   help="average each example's gradient with its mirrored image's before clipping")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default="none",
                   help="a per-example map of the ScatterNet features before the GroupNorm")
    p.add_argument("--pool", default="1",
                   help="average-pool the ScatterNet maps in K x K blocks before the GroupNorm (1: none)")
    p.add_argument("--blur", default="0",
                   help="blur each ScatterNet map by [A, 1, A] / (1 + 2A) along rows and columns (0: none)")
    p.add_argument("--ema", default="0.9,0.95,0.98")
    p.add_argument("--cache", default=os.path.join(REPO, "bench-results", "cache"))
    a = p.parse_args(argv)
    try:                              # checked before the data load (a minute), one line each
        schedules, momenta = parse_schedules(a.schedules), parse_momenta(a.momentum)
        pool, blur_alpha = parse_pool(a.pool), parse_blur(a.blur)
        grid = [point.split(":") for point in a.grid.split(",")]
        for (name, warm), (_, _, epochs) in ((s, g) for s in schedules for g in grid):
            if warm >= float(epochs):
                raise OptionError(f"--schedules: {name}+{warm:g}: the warm-up ({warm:g} epochs) is not shorter than "
                                  f"the run ({epochs} epochs); use a warm-up shorter than --grid's epochs")
    except OptionError as e:
        print(f"images_validation.py: {e}", file=sys.stderr)
        return 2
    data = validation_split(a.cache, a.groups, a.transform, a.flip_multiplicity, pool, blur_alpha)
    xflip = data.pop() if a.flip_multiplicity else None
    emas = [float(e) for e in a.ema.split(",") if e]
    for batch, lr, epochs in grid:
        for schedule in schedules:
            for momentum in momenta:
                for seed in a.seeds.split(","):
                    t0 = time.time()
                    r = train(*data, int(batch), float(lr), float(epochs), int(seed), a.eps, a.clip, momentum, emas,
                              a.init, xflip, schedule, a.nesterov)
                    r.update({"groups": a.groups, "pool": pool, "blur": blur_alpha, "transform": a.transform,
                              "init": a.init, "flips": a.flip_multiplicity, "seconds": round(time.time() - t0),
                              "load_average": round(os.getloadavg()[0], 2)})
                    print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
