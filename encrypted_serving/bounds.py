"""The public input box and the model owner's truncation certificate (pure numpy; both environments).

Why: TF-Encrypted's ABY3 truncates every fixed-point product with its "heuristic" method, which adds
``2**62`` (in ring units) and assumes the result's top bit is 0: a matmul output (2 x 16 fractional bits in the
ring) must satisfy ``|x| < 2**(62 - 2*16) = 2**30``. Outside that, truncation fails with a probability that
depends on the (secret) weights, so a client sending huge values could learn about the weights from how often
outputs break (issue 19, item 2). Hence:

* ``input_box(spec)``: per model-input column, the public range the service clamps to **inside the MPC**
  (numeric: the z-score of the public clip range the pipeline ships, or ``[-DEFAULT_Z_BOUND, DEFAULT_Z_BOUND]``
  without one; one-hot columns: [0, 1]); always widened to contain 0 (the clamp circuit needs lo <= 0 <= hi).
* ``certify(config, weights, low, high)``: the model owner's exporter, holding the plaintext weights, bounds
  every layer's matmul output over the whole box by interval arithmetic and refuses (ModelFormatError) if any
  bound reaches the truncation bound; the certificate is recorded in model.json.
* ``check(config)``: what the service checks at load without the weights (a certificate for exactly this box
  (its sha256 is in the certificate),
  fixed-point format and bound, every recorded bound below it); ``verify(config, weights)``: the model owner's
  side re-derives the certificate from the weights it uploads.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Tuple

import numpy as np

from encrypted_serving.model_format import ModelFormatError

FRACTIONAL_BITS = 16          # TFE 0.9.1 fixed64_heuristic
RING_BITS = 64
TRUNCATION_BOUND = 2.0 ** (RING_BITS - 2 - 2 * FRACTIONAL_BITS)    # 2**30: |matmul output| the truncation handles
DEFAULT_Z_BOUND = 20.0        # numeric columns without a public clip range: |z| <= 20 standard deviations
SAFETY = 1.01                 # margin for fixed-point rounding of weights and inputs
METHOD = "interval-arithmetic/1"


class BoundsError(ModelFormatError):
    """Missing, inconsistent or failing input box / certificate; the message says what and how to fix it."""


def input_box(spec: list, default_z: float = DEFAULT_Z_BOUND) -> Tuple[np.ndarray, np.ndarray]:
    """(low, high) float64 vectors of the model-input width, in model-input (z-score / one-hot) units."""
    lows: List[float] = []
    highs: List[float] = []
    for e in spec:
        if e["kind"] == "numeric":
            mean, std = float(e["mean"]), float(e["std"])
            clip = e.get("clip")
            if clip is not None:
                ends = [(float(c) - mean) / std if std > 0 else float(c) - mean for c in clip]
                lo, hi = min(ends), max(ends)
            else:
                lo, hi = -float(default_z), float(default_z)
            lows.append(lo)
            highs.append(hi)
        else:
            width = len(e["vocabulary"]) + 1
            lows += [0.0] * width
            highs += [1.0] * width
    low, high = np.minimum(np.array(lows), 0.0), np.maximum(np.array(highs), 0.0)
    return low, high


def clamp(x: np.ndarray, low, high) -> np.ndarray:
    """The plaintext meaning of the MPC clamp (reference for tests and the model owner)."""
    return np.minimum(np.maximum(np.asarray(x, dtype=np.float64), low), high)


def weights_digest(config: dict, weights: Dict[str, np.ndarray]) -> str:
    from encrypted_serving import model_format as mf
    h = hashlib.sha256()
    for i in range(len(config["layers"])):
        for k in (mf.kernel_key(i), mf.bias_key(i)):
            h.update(np.ascontiguousarray(weights[k], dtype="<f4").tobytes())
    return h.hexdigest()


def layer_bounds(config: dict, weights: Dict[str, np.ndarray], low, high) -> List[float]:
    """max |h @ W_i| over the box, for every layer i (interval arithmetic, float64)."""
    from encrypted_serving import model_format as mf
    lo, hi = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    out = []
    for i, layer in enumerate(config["layers"]):
        w = weights[mf.kernel_key(i)].astype(np.float64)
        b = weights[mf.bias_key(i)].astype(np.float64)
        c, r = (lo + hi) / 2.0, (hi - lo) / 2.0
        mid, rad = c @ w, r @ np.abs(w)
        out.append(float(np.max(np.abs(mid) + rad)))
        lo, hi = mid - rad + b, mid + rad + b
        if layer["activation"] == "relu":
            lo, hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
    return out


def certify(config: dict, weights: Dict[str, np.ndarray], low, high) -> dict:
    """The certificate, or BoundsError naming the layer whose pre-activation can reach the truncation bound."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if low.shape != (config["input_dim"],) or high.shape != low.shape:
        raise BoundsError("the input box has %s columns, the model %d" % (low.shape, config["input_dim"]))
    bounds = layer_bounds(config, weights, low, high)
    for i, b in enumerate(bounds):
        if not np.isfinite(b) or b * SAFETY >= TRUNCATION_BOUND:
            raise BoundsError("refusing to export: layer %d's pre-activation can reach %.3g on the clamped input "
                              "box, at or above TF-Encrypted's truncation bound 2**30 (16 fractional bits): "
                              "shrink the weights or the public input ranges" % (i, b))
    return {"method": METHOD, "fractional_bits": FRACTIONAL_BITS, "ring_bits": RING_BITS,
            "truncation_bound": TRUNCATION_BOUND, "safety_factor": SAFETY,
            "max_abs_pre_activation": bounds, "weights_sha256": weights_digest(config, weights),
            "input_box_sha256": box_digest(low, high)}


def box_digest(low, high) -> str:
    """sha256 of the input box the bounds hold on (float64 little-endian, low then high): binds box and certificate."""
    h = hashlib.sha256()
    for v in (low, high):
        h.update(np.ascontiguousarray(v, dtype="<f8").tobytes())
    return h.hexdigest()


def attach(config: dict, weights: Dict[str, np.ndarray], spec: list) -> dict:
    """config + its input box and certificate (what the exporter writes to model.json)."""
    low, high = input_box(spec)
    out = dict(config)
    out["input_box"] = {"low": [float(v) for v in low], "high": [float(v) for v in high]}
    out["certificate"] = certify(config, weights, low, high)
    return out


def box_of(config: dict) -> Tuple[np.ndarray, np.ndarray]:
    box = config.get("input_box")
    if not isinstance(box, dict) or "low" not in box or "high" not in box:
        raise BoundsError("model.json has no input_box: re-export the model with this version (python -m "
                          "encrypted_serving.export) so that inputs are clamped and the model is certified")
    low, high = np.asarray(box["low"], dtype=np.float64), np.asarray(box["high"], dtype=np.float64)
    d = config["input_dim"]
    if low.shape != (d,) or high.shape != (d,) or not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise BoundsError("model.json: input_box needs %d finite low and high values" % d)
    if np.any(low > 0) or np.any(high < 0):
        raise BoundsError("model.json: input_box must contain 0 in every column (low <= 0 <= high)")
    if np.any(np.abs(np.concatenate([low, high])) >= 2.0 ** (RING_BITS - 3 - FRACTIONAL_BITS)):
        raise BoundsError("model.json: input_box values too large for the fixed-point ring")
    return low, high


def check(config: dict) -> None:
    """The service's load-time check (no weights needed): raises BoundsError with one line."""
    low, high = box_of(config)
    cert = config.get("certificate")
    if not isinstance(cert, dict):
        raise BoundsError("model.json has no truncation certificate: re-export the model with this version")
    if cert.get("input_box_sha256") != box_digest(low, high):    # e.g. a box widened after the export
        raise BoundsError("model.json: the truncation certificate was made for another input_box (%s): restore "
                          "model.json or re-export the model" % ("changed since the export"
                                                                 if cert.get("input_box_sha256") else "not recorded"))
    want = {"method": METHOD, "fractional_bits": FRACTIONAL_BITS, "ring_bits": RING_BITS,
            "truncation_bound": TRUNCATION_BOUND}
    bad = [k for k, v in want.items() if cert.get(k) != v]
    if bad:
        raise BoundsError("model.json: the truncation certificate was made for another fixed-point format (%s); "
                          "re-export the model" % ", ".join("%s=%r" % (k, cert.get(k)) for k in bad))
    bounds = cert.get("max_abs_pre_activation")
    if not isinstance(bounds, list) or len(bounds) != len(config["layers"]):
        raise BoundsError("model.json: the certificate needs one bound per layer")
    over = [i for i, b in enumerate(bounds) if not isinstance(b, (int, float)) or not b * SAFETY < TRUNCATION_BOUND]
    if over:
        raise BoundsError("model.json: the certificate does not keep layer(s) %s below the truncation bound 2**30"
                          % over)


def verify(config: dict, weights: Dict[str, np.ndarray]) -> None:
    """The model owner's check before uploading: the certificate holds for exactly these weights and box."""
    check(config)
    low, high = box_of(config)
    cert = certify(config, weights, low, high)
    if cert["weights_sha256"] != config["certificate"].get("weights_sha256"):
        raise BoundsError("model.json's truncation certificate was made for other weights: re-export the model")
