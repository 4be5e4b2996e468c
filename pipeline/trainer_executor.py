"""The pipeline's Trainer: loads Transform's output, runs the chosen trainer kind, exports the model with
its serving signatures, and records what the trainer reports (privacy guarantee, details) as ML Metadata
custom properties of the Model artifact and as ``privacy.json`` / ``training.json`` beside the SavedModel."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
from tfx.components.trainer import executor as tfx_trainer_executor
from tfx.components.trainer.fn_args_utils import FnArgs
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import path_utils

from dp_training.dataset import DatasetSpec
from pipeline.model import build_model, export_serving_model, vocabulary_sizes
from pipeline.trainers import get_trainer, is_private
from pipeline.trainers.base import TrainerContext, TrainingOutcome

PRIVACY_FILE = "privacy.json"
TRAINING_FILE = "training.json"


def load_transformed(file_patterns: List[str], feature_spec: Dict[str, Any], label_feature: str):
    """Transformed examples -> ({model input: float32/int64 array [n, 1]}, float32 labels [n])."""
    files = [f for pattern in file_patterns for f in tf.io.gfile.glob(pattern)]
    if not files:
        raise FileNotFoundError(f"no transformed examples match {file_patterns}")
    columns: Dict[str, list] = {k: [] for k in feature_spec}
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(8192).map(
        lambda records: tf.io.parse_example(records, feature_spec))
    for batch in dataset:
        for key, value in batch.items():
            columns[key].append(value.numpy())
    arrays = {k: np.concatenate(v) for k, v in columns.items()}
    labels = arrays.pop(label_feature).astype(np.float32).reshape(-1)
    return {k: v.reshape(-1, 1) for k, v in arrays.items()}, labels


def train_guarded(kind: str, context: TrainerContext) -> TrainingOutcome:
    """Runs a trainer kind. A non-private run on a data set that has a privacy budget is refused before
    training unless its args allow it (``allow_non_private``), and then recorded in the ledger (its spend
    is infinite). Private kinds charge the ledger themselves, with the guarantee they computed."""
    ledger = None
    if not is_private(kind, context.args):
        from dp_training.ledger import PrivacyLedger

        ledger = PrivacyLedger(context.workdir)
        ledger.check_non_private(context.dataset_fingerprint, bool(context.args.get("allow_non_private")))
    outcome = get_trainer(kind).train(context)
    if ledger is not None and ledger.get_budget(context.dataset_fingerprint) is not None:
        ledger.record_non_private(context.dataset_fingerprint, kind, dataset_name=context.dataset_name)
    return outcome


def run_fn(fn_args: FnArgs) -> None:
    config = fn_args.custom_config
    spec = DatasetSpec.from_json_dict(config["dataset"])
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)
    feature_spec = tf_transform_output.transformed_feature_spec()
    train_x, train_y = load_transformed(fn_args.train_files, feature_spec, spec.label_feature)
    eval_x, eval_y = load_transformed(fn_args.eval_files, feature_spec, spec.label_feature)
    buckets = vocabulary_sizes(spec, tf_transform_output)
    hidden = tuple(config.get("hidden_units", (64, 64)))

    context = TrainerContext(
        dataset_name=spec.name, dataset_fingerprint=config["dataset_fingerprint"],
        train_features=train_x, train_labels=train_y, eval_features=eval_x, eval_labels=eval_y,
        build_model=lambda: build_model(spec, buckets, hidden), args=config.get("trainer_args", {}),
        workdir=config["workdir"], log=lambda message: print(message, file=sys.stderr, flush=True))
    started = time.time()
    outcome = train_guarded(config["trainer"], context)
    details = {"kind": config["trainer"], "train_rows": context.num_train_rows,
               "eval_rows": int(eval_y.shape[0]), "seconds": round(time.time() - started, 2), **outcome.details}

    export_serving_model(outcome.model, spec, tf_transform_output, fn_args.serving_model_dir)
    with tf.io.gfile.GFile(os.path.join(fn_args.serving_model_dir, TRAINING_FILE), "w") as f:
        json.dump(details, f, indent=1, sort_keys=True)
    if outcome.privacy is not None:
        privacy = {"dataset": spec.name, "dataset_fingerprint": config["dataset_fingerprint"], **outcome.privacy}
        with tf.io.gfile.GFile(os.path.join(fn_args.serving_model_dir, PRIVACY_FILE), "w") as f:
            json.dump(privacy, f, indent=1, sort_keys=True)


def _set_property(artifact, key: str, value: Any) -> None:
    if isinstance(value, bool):
        artifact.set_int_custom_property(key, int(value))
    elif isinstance(value, int):
        artifact.set_int_custom_property(key, value)
    elif isinstance(value, float):
        # Not a double_value: ML Metadata's SQLite store keeps those to 6 decimal places (a delta of 1e-7
        # would read back as 0). A JSON value is stored as a serialized Struct, exactly.
        artifact.set_json_value_custom_property(key, value)
    elif value is not None:
        artifact.set_string_custom_property(key, value if isinstance(value, str) else json.dumps(value))


class PrivacyRecordingTrainerExecutor(tfx_trainer_executor.GenericExecutor):
    """TFX's GenericExecutor, plus: the trainer's report becomes custom properties of the Model artifact."""

    def Do(self, input_dict, output_dict, exec_properties) -> None:
        super().Do(input_dict, output_dict, exec_properties)
        model = artifact_utils.get_single_instance(output_dict[standard_component_specs.MODEL_KEY])
        serving_dir = path_utils.serving_model_path(model.uri)
        with tf.io.gfile.GFile(os.path.join(serving_dir, TRAINING_FILE)) as f:
            details = json.load(f)
        for key, value in details.items():
            _set_property(model, f"trainer_{key}", value)
        privacy_path = os.path.join(serving_dir, PRIVACY_FILE)
        _set_property(model, "private", tf.io.gfile.exists(privacy_path))
        if tf.io.gfile.exists(privacy_path):
            with tf.io.gfile.GFile(privacy_path) as f:
                for key, value in json.load(f).items():
                    _set_property(model, f"privacy_{key}", value)
