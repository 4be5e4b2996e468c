"""``privtrain predict``: predictions for raw rows from the newest pushed model (in-process), or from the
TF-Encrypted service with ``--encrypted``."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

from core import pushed


class PredictError(RuntimeError):
    pass


def latest_pushed_model(serving_dir: str, model_name: Optional[str] = None) -> str:
    """``<serving_dir>/<name>/<newest version>`` by ``core.pushed``'s rule; the only model when none is named."""
    try:
        return pushed.select_version(serving_dir, model_name).path
    except pushed.PushedVersionError as e:
        raise PredictError(str(e)) from None


def check_input_file(path: str, limit: Optional[int] = None) -> None:
    """One line naming the problem, before any model is loaded."""
    if limit is not None and limit < 1:
        raise PredictError(f"--limit must be a positive number of rows, not {limit}")
    if not os.path.exists(path):
        raise PredictError(f"input file {path} does not exist; pass --input FILE with raw rows in the data "
                           "set's format (e.g. data/adult/adult.test)")
    if not os.path.isfile(path):
        raise PredictError(f"--input {path} is not a file; pass a file of raw rows in the data set's format")
    if not os.access(path, os.R_OK):
        raise PredictError(f"input file {path} is not readable (check its permissions)")


def predict_plain(version_dir: str, input_file: str, limit: Optional[int] = None) -> Dict[str, object]:
    import tensorflow as tf

    from encrypted_serving.preprocessing import read_raw_rows  # plain numpy, shared with the encrypted client

    version = pushed.PushedVersion(version_dir)
    spec = version.dataset_spec()   # the published dataset.json, read by core.dataset's parser
    if spec.is_image:  # an image model: the input is an IDX images file (pipeline/image_pipeline.py)
        from pipeline.image_pipeline import predict_images
        return predict_images(version_dir, spec, input_file, limit)
    rows, labels = read_raw_rows(input_file, version.dataset_description(), limit=limit)
    if not rows:
        raise PredictError(f"{input_file} holds no rows")
    features = {}
    for column in spec.feature_columns:
        values = [row.get(column.name) for row in rows]
        if column.kind == "numeric":
            features[column.name] = tf.constant(_numbers(values, column.name, input_file), tf.float32)
        else:
            features[column.name] = tf.constant(["" if v is None else v for v in values])
    model = tf.saved_model.load(version_dir)
    out = model.signatures["predict_raw"](**features)
    return {"model": version_dir, "probabilities": out["probabilities"].numpy().tolist(),
            "logits": out["logits"].numpy().tolist(), "labels": labels}


def _numbers(values, name: str, input_file: str) -> List[float]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(np.nan if v is None else float(v))
        except ValueError:
            raise PredictError(f"{input_file}: row {i + 1}: column {name!r} is numeric, not {v[:40]!r}") from None
    return out


def format_predictions(result: Dict[str, object], show: int = 20) -> str:
    if "classes" in result:  # multi-class (image) predictions
        from pipeline.image_pipeline import format_image_predictions
        return format_image_predictions(result, show)
    probabilities: List[float] = result["probabilities"]  # type: ignore[assignment]
    labels: List[Optional[int]] = result.get("labels") or [None] * len(probabilities)  # type: ignore
    lines = [f"model: {result.get('model', '?')}", f"{'row':>5} {'probability':>12} {'predicted':>10} {'label':>6}"]
    for i, (p, y) in enumerate(zip(probabilities, labels)):
        if i == show:
            lines.append(f"  ... {len(probabilities) - show} more rows (use --json for all)")
            break
        lines.append(f"{i:>5} {p:>12.4f} {int(p > 0.5):>10} {'-' if y is None else y:>6}")
    known = [(p, y) for p, y in zip(probabilities, labels) if y is not None]
    if known:
        accuracy = float(np.mean([(p > 0.5) == bool(y) for p, y in known]))
        lines.append(f"accuracy on the {len(known)} labelled rows: {accuracy:.4f}")
    return "\n".join(lines)
