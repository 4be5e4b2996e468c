"""The ``encrypted_model/`` exchange format (pure Python + numpy; importable in both environments).

A directory holding:

* ``model.json``::

    {"format": "privtrain-encrypted-mlp/1", "input_dim": D,
     "layers": [{"units": 64, "activation": "relu"}, ..., {"units": 1, "activation": "linear"}],
     "output": "logit",
     "input_box": {"low": [...], "high": [...]},      # the public ranges clamped to inside the MPC
     "certificate": {...}}                           # the owner's truncation certificate (encrypted_serving.bounds)

* ``weights.npz``: for layer i (0-based, in order) ``dense_{i}/kernel`` float32 [fan_in, units] and
  ``dense_{i}/bias`` float32 [units].
* ``preprocessing.json``: client-side preprocessing (see ``encrypted_serving.preprocessing``).

The last layer must be linear with one unit: its output is a logit; the probability is sigmoid(logit),
applied by the prediction client in plaintext after it alone reconstructs the logit.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

FORMAT = "privtrain-encrypted-mlp/1"
MODEL_JSON = "model.json"
WEIGHTS_NPZ = "weights.npz"
PREPROCESSING_JSON = "preprocessing.json"
ACTIVATIONS = ("relu", "linear")


class ModelFormatError(ValueError):
    """An encrypted_model directory is missing, malformed or inconsistent; the message says what."""


def kernel_key(i: int) -> str:
    return "dense_%d/kernel" % i


def bias_key(i: int) -> str:
    return "dense_%d/bias" % i


def validate_config(config: dict) -> dict:
    if not isinstance(config, dict):
        raise ModelFormatError("model.json must hold a JSON object, got %r" % type(config).__name__)
    if config.get("format") != FORMAT:
        raise ModelFormatError("model.json: format must be %r, got %r" % (FORMAT, config.get("format")))
    d = config.get("input_dim")
    if not isinstance(d, int) or d <= 0:
        raise ModelFormatError("model.json: input_dim must be a positive integer, got %r" % (d,))
    layers = config.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ModelFormatError("model.json: layers must be a non-empty list")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("units"), int) or layer["units"] <= 0:
            raise ModelFormatError("model.json: layers[%d] needs a positive integer 'units'" % i)
        if layer.get("activation") not in ACTIVATIONS:
            raise ModelFormatError("model.json: layers[%d].activation must be one of %s, got %r"
                                   % (i, ACTIVATIONS, layer.get("activation")))
    if layers[-1]["units"] != 1 or layers[-1]["activation"] != "linear":
        raise ModelFormatError("model.json: the last layer must be {'units': 1, 'activation': 'linear'} (a logit)")
    if config.get("output") != "logit":
        raise ModelFormatError("model.json: output must be 'logit', got %r" % (config.get("output"),))
    return config


def validate_weights(config: dict, weights: Dict[str, np.ndarray]) -> None:
    fan_in = config["input_dim"]
    expected = set()
    for i, layer in enumerate(config["layers"]):
        k, b = kernel_key(i), bias_key(i)
        expected |= {k, b}
        if k not in weights or b not in weights:
            raise ModelFormatError("weights.npz: missing %s or %s" % (k, b))
        if tuple(weights[k].shape) != (fan_in, layer["units"]):
            raise ModelFormatError("weights.npz: %s has shape %s, expected %s"
                                   % (k, tuple(weights[k].shape), (fan_in, layer["units"])))
        if tuple(weights[b].shape) != (layer["units"],):
            raise ModelFormatError("weights.npz: %s has shape %s, expected %s"
                                   % (b, tuple(weights[b].shape), (layer["units"],)))
        if not (np.all(np.isfinite(weights[k])) and np.all(np.isfinite(weights[b]))):
            raise ModelFormatError("weights.npz: layer %d holds non-finite values" % i)
        fan_in = layer["units"]
    extra = set(weights) - expected
    if extra:
        raise ModelFormatError("weights.npz: unexpected arrays %s" % sorted(extra))


def make_config(input_dim: int, layers: List[dict]) -> dict:
    return validate_config({"format": FORMAT, "input_dim": int(input_dim),
                            "layers": [{"units": int(l["units"]), "activation": l["activation"]} for l in layers],
                            "output": "logit"})


def save_model(directory: str, config: dict, weights: Dict[str, np.ndarray],
               preprocessing: Optional[list] = None) -> str:
    """Write an encrypted_model directory (atomically per file). Returns the directory."""
    validate_config(config)
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    validate_weights(config, weights)
    if preprocessing is not None:
        # the public input box the service clamps to, and the owner's certificate that no truncation can fail on it
        from encrypted_serving import bounds
        from encrypted_serving import preprocessing as pp
        pp.validate_spec(preprocessing, config["input_dim"])
        config = bounds.attach(config, weights, preprocessing)
    os.makedirs(directory, exist_ok=True)
    _atomic_write_text(os.path.join(directory, MODEL_JSON), json.dumps(config, indent=2) + "\n")
    tmp = os.path.join(directory, ".weights.tmp.npz")
    np.savez(tmp, **weights)
    os.replace(tmp, os.path.join(directory, WEIGHTS_NPZ))
    if preprocessing is not None:
        _atomic_write_text(os.path.join(directory, PREPROCESSING_JSON), json.dumps(preprocessing, indent=2) + "\n")
    return directory


def load_config(directory: str) -> dict:
    path = os.path.join(directory, MODEL_JSON)
    if not os.path.isfile(path):
        raise ModelFormatError("no %s in %s: not an encrypted_model directory (run the export first)"
                               % (MODEL_JSON, directory))
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise ModelFormatError("%s is not valid JSON: %s" % (path, e)) from e
    return validate_config(config)


def load_weights(directory: str, config: Optional[dict] = None) -> Dict[str, np.ndarray]:
    config = config or load_config(directory)
    path = os.path.join(directory, WEIGHTS_NPZ)
    if not os.path.isfile(path):
        raise ModelFormatError("no %s in %s" % (WEIGHTS_NPZ, directory))
    with np.load(path, allow_pickle=False) as npz:
        weights = {k: np.asarray(npz[k], dtype=np.float32) for k in npz.files}
    validate_weights(config, weights)
    return weights


def load_preprocessing(directory: str, config: Optional[dict] = None) -> list:
    from encrypted_serving import preprocessing as pp
    config = config or load_config(directory)
    path = os.path.join(directory, PREPROCESSING_JSON)
    if not os.path.isfile(path):
        raise ModelFormatError("no %s in %s" % (PREPROCESSING_JSON, directory))
    return pp.load_spec(path, expected_dim=config["input_dim"])


def forward_logits(config: dict, weights: Dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Plaintext reference forward pass (float64): returns logits of shape [n]."""
    h = np.asarray(x, dtype=np.float64)
    for i, layer in enumerate(config["layers"]):
        h = h @ weights[kernel_key(i)].astype(np.float64) + weights[bias_key(i)].astype(np.float64)
        if layer["activation"] == "relu":
            h = np.maximum(h, 0.0)
    return h[:, 0]


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
