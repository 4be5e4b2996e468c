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


def validation_split(cache: str, groups: int, transform: str = "none", flips: bool = False):
    """(train, train labels, validation, validation labels[, the training rows' mirrored images' features])."""
    from dp_training.images import scattering_features
    from simulations.bench_images import load

    _, x, y, _, _ = load()            # the test images are loaded by the helper but never used here

    def feats(pixels):
        return group_norm(TRANSFORMS[transform](np.asarray(scattering_features(pixels, cache), np.float32)), groups)

    features = feats(x)
    y = np.asarray(y, np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    va, tr = perm[:VALIDATION_ROWS], perm[VALIDATION_ROWS:]
    out = [features[tr], y[tr], features[va], y[va]]
    del features
    if flips:                         # left-right mirrored images: a public, per-example augmentation
        out.append(feats(np.ascontiguousarray(x[:, :, ::-1, :]))[tr])
    return out


def train(xtr, ytr, xva, yva, batch, lr, epochs, seed, eps, clip, momentum, emas, init="glorot", xflip=None):
    """``xflip``: augmentation multiplicity 2 (De et al. 2022): each example's gradient is the mean of its own and
    its mirrored image's, clipped as one (so one example still moves the sum by at most C)."""
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
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--groups", type=int, default=27)
    p.add_argument("--init", choices=["glorot", "zeros"], default="glorot", help="the linear layer's kernel")
    p.add_argument("--flip-multiplicity", action="store_true",
                   help="average each example's gradient with its mirrored image's before clipping")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default="none",
                   help="a per-example map of the ScatterNet features before the GroupNorm")
    p.add_argument("--ema", default="0.9,0.95,0.98")
    p.add_argument("--cache", default=os.path.join(REPO, "bench-results", "cache"))
    a = p.parse_args(argv)
    data = validation_split(a.cache, a.groups, a.transform, a.flip_multiplicity)
    xflip = data.pop() if a.flip_multiplicity else None
    emas = [float(e) for e in a.ema.split(",") if e]
    for point in a.grid.split(","):
        batch, lr, epochs = point.split(":")
        for seed in a.seeds.split(","):
            t0 = time.time()
            r = train(*data, int(batch), float(lr), float(epochs), int(seed), a.eps, a.clip, a.momentum, emas, a.init, xflip)
            r.update({"groups": a.groups, "transform": a.transform, "init": a.init, "flips": a.flip_multiplicity,
                      "seconds": round(time.time() - t0)})
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
