"""Hyper-parameter search for ScatterNet + GroupNorm + linear on a VALIDATION split carved from Fashion-MNIST's
60,000 training images (never the test split): a fixed random 10,000 (seed 12345) are held out, DP-SGD trains on
the other 50,000 with the noise calibrated by the platform's accountant (PLD, Poisson, add/remove-one) for 50,000
rows at the target epsilon, delta 1e-5.

The step is a NumPy replica of the Trainer's ``fused_dense`` step (per-example clipping of the linear layer's
gradient to C, Gaussian noise N(0, (sigma C)^2) on the clipped sum, SGD with momentum and learning rate lr / B) on
the per-example GroupNorm'd features, so a grid point takes about a minute here; it also scores exponential moving
averages of the iterates (post-processing). docs/image_data.md lists what it found.

    PYTHONPATH=. python simulations/images_validation.py --grid 8192:16:40,8192:16:60 [--eps 3] [--seeds 0]

``--grid``: comma-separated ``batch:learning_rate:epochs``.
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


def group_norm(features: np.ndarray, groups: int, eps: float = 1e-5) -> np.ndarray:
    """Per example: [n, channels, h, w] -> [n, channels * h * w], each group standardised by its own statistics."""
    r = np.asarray(features, np.float32).reshape(len(features), groups, -1)
    out = (r - r.mean(-1, keepdims=True)) / np.sqrt(r.var(-1, keepdims=True) + eps)
    return out.reshape(len(features), -1).astype(np.float32)


TRANSFORMS = {"none": lambda s: s, "sqrt": np.sqrt, "log": lambda s: np.log(s + 1e-3)}


def validation_split(cache: str, groups: int, transform: str = "none"):
    from dp_training.images import scattering_features
    from simulations.bench_images import load

    _, x, y, _, _ = load()            # the test images are loaded by the helper but never used here
    features = group_norm(TRANSFORMS[transform](np.asarray(scattering_features(x, cache), np.float32)), groups)
    y = np.asarray(y, np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    va, tr = perm[:VALIDATION_ROWS], perm[VALIDATION_ROWS:]
    return features[tr], y[tr], features[va], y[va]


def train(xtr, ytr, xva, yva, batch, lr, epochs, seed, eps, clip, momentum, emas, init="glorot"):
    from dp_training.calibration import calibrate_noise_multiplier

    n, d = xtr.shape
    q = batch / n
    steps = int(round(epochs * n / batch))
    sigma = calibrate_noise_multiplier(eps, q, steps, DELTA)
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
        z = a @ w + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(idx)), ytr[idx]] -= 1.0        # d loss / d logits, per example
        factor = clip / np.sqrt(np.maximum(sq_inputs[idx] * (p ** 2).sum(1), clip * clip))
        dz = p * factor[:, None]
        gw = a.T @ dz + rng.normal(0, sigma * clip, w.shape).astype(np.float32)
        gb = dz.sum(0) + rng.normal(0, sigma * clip, b.shape).astype(np.float32)
        vw, vb = momentum * vw + gw, momentum * vb + gb
        w, b = w - lr / batch * vw, b - lr / batch * vb
        avg = {e: (e * aw + (1 - e) * w, e * ab + (1 - e) * b) for e, (aw, ab) in avg.items()}
        if t >= steps // 2:
            tail_w, tail_b, tail = tail_w + w, tail_b + b, tail + 1

    def accuracy(w, b):
        return float(((xva @ w + b).argmax(1) == yva).mean())

    out = {"batch": batch, "lr": lr, "epochs": epochs, "seed": seed, "sigma": round(sigma, 3),
           "validation_accuracy": accuracy(w, b)}
    out.update({f"ema_{e:g}": accuracy(*avg[e]) for e in emas})
    out["tail_average"] = accuracy(tail_w / tail, tail_b / tail)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="8192:16:40")
    p.add_argument("--eps", type=float, default=3.0)
    p.add_argument("--seeds", default="0")
    p.add_argument("--clip", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--groups", type=int, default=27)
    p.add_argument("--init", choices=["glorot", "zeros"], default="glorot", help="the linear layer's kernel")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default="none",
                   help="a per-example map of the ScatterNet features before the GroupNorm")
    p.add_argument("--ema", default="0.9,0.95,0.98")
    p.add_argument("--cache", default=os.path.join(REPO, "bench-results", "cache"))
    a = p.parse_args(argv)
    data = validation_split(a.cache, a.groups, a.transform)
    emas = [float(e) for e in a.ema.split(",") if e]
    for point in a.grid.split(","):
        batch, lr, epochs = point.split(":")
        for seed in a.seeds.split(","):
            t0 = time.time()
            r = train(*data, int(batch), float(lr), float(epochs), int(seed), a.eps, a.clip, a.momentum, emas, a.init)
            r.update({"groups": a.groups, "transform": a.transform, "init": a.init,
                      "seconds": round(time.time() - t0)})
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
