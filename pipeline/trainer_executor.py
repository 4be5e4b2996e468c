"""The pipeline's Trainer: drives the privacy protocol (``dp_training.protocol``) around the chosen trainer kind.

plan (public inputs) -> reserve in the data source's ledger (or refuse, nothing trained) -> DP normalisation
statistics -> the kind trains -> finish the ledger entry with what was released -> one guarantee, exported with
the model. What leaves the trust boundary from here (``docs/privacy_model.md``; the version directory's files
are declared in ``core.pushed.PUBLISHED_FILES`` and written through ``core.pushed.PushedVersion``):

- the SavedModel (weights and DP normalisation: covered by the guarantee; public-domain vocabularies),
- ``assets.extra/preprocessing.json`` (public domains and the DP normalisation) and ``assets.extra/dataset.json``
  (the public data-set description),
- ``privacy.json`` (the guarantee) and ``training.json`` (the kind's public run parameters),
- the Model artifact's ML Metadata properties listed in :data:`PUBLIC_PROPERTIES`.

Everything computed from the private rows that is not covered (timings, losses, row counts, the membership
inference check) goes to ``private_details.json`` in the Trainer's ModelRun directory inside the workdir.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
from tfx.components.trainer import executor as tfx_trainer_executor
from tfx.components.trainer.fn_args_utils import FnArgs
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import path_utils

from core.dataset import DatasetSpec
from core.pushed import PushedVersion
from dp_training.guarantee import Guarantee
from dp_training.protocol import not_covered, run_private_training
from pipeline.model import export_serving_model
from pipeline.trainers import get_trainer

PRIVATE_DETAILS_FILE = "private_details.json"
# The Model artifact's custom properties, all public (a test enumerates them).
PUBLIC_PROPERTIES = ("private", "privacy_guarantee", "privacy_epsilon", "privacy_delta", "privacy_accountant",
                     "privacy_relation", "privacy_unit", "privacy_source_id", "privacy_ledger_seq",
                     "privacy_ledger_head", "trainer_kind", "trainer_parameters",
                     "is_external", "tfx_version")   # the last two are set by TFX itself


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
    arrays = {k: (np.concatenate(v) if v else np.zeros((0,), feature_spec[k].dtype.as_numpy_dtype))
              for k, v in columns.items()}
    labels = arrays.pop(label_feature).astype(np.float32).reshape(-1)
    return {k: v.reshape(-1, 1) for k, v in arrays.items()}, labels


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def run_fn(fn_args: FnArgs) -> None:
    config = fn_args.custom_config
    spec = DatasetSpec.from_json_dict(config["dataset"])
    if spec.is_image:  # IDX images: ScatterNet / CNN models (pipeline/image_pipeline.py)
        from pipeline.image_pipeline import run_image_fn
        return run_image_fn(fn_args)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    kind_name = config["trainer"]
    kind = get_trainer(kind_name)
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)
    feature_spec = tf_transform_output.transformed_feature_spec()
    train_x, train_y = load_transformed(fn_args.train_files, feature_spec, spec.label_feature)
    eval_x, eval_y = load_transformed(fn_args.eval_files, feature_spec, spec.label_feature)

    result = run_private_training(
        spec, kind_name, config.get("trainer_args", {}), privacy_with_receipts(config.get("privacy", {}), fn_args),
        train_x, train_y, eval_x,
        eval_y, scratch_dir=os.path.join(fn_args.model_run_dir, "scratch"), kind=kind, log=log,
        hidden_units=tuple(config.get("hidden_units", (64, 64))),
        not_covered=not_covered(spec, eval_note=" (slices below the minimum size are suppressed)"),
        ledger=workdir_ledger(config.get("privacy", {}), fn_args))
    outcome, guarantee, stats = result.outcome, result.guarantee, result.normalization

    export_serving_model(outcome.model, spec, tf_transform_output, fn_args.serving_model_dir, stats)
    write_run_files(fn_args, kind_name, guarantee, outcome)


def workdir_ledger(privacy: Dict[str, Any], fn_args: FnArgs):
    """The run's ledger, recording its reserve and finish receipts in the workdir (``pipeline/receipts.py``);
    None (the protocol opens the ledger itself) for a pipeline root outside a workdir."""
    from dp_training.ledger import resolve_ledger_path
    from pipeline.receipts import recording_ledger, workdir_of_model_run

    workdir = workdir_of_model_run(fn_args.model_run_dir)
    return recording_ledger(resolve_ledger_path(privacy.get("ledger")), workdir) if workdir else None


def privacy_with_receipts(privacy: Dict[str, Any], fn_args: FnArgs) -> Dict[str, Any]:
    """The run's privacy arguments plus the ledger receipts its workdir holds (anchors the reservation checks;
    collected now, not in the component's config, so that they never change the Trainer's cache key)."""
    from pipeline.receipts import workdir_anchors, workdir_of_model_run

    workdir = workdir_of_model_run(fn_args.model_run_dir)
    return {**privacy, "anchors": workdir_anchors([workdir]) if workdir else []}


def write_run_files(fn_args: FnArgs, kind_name: str, guarantee: Guarantee, outcome) -> None:
    """privacy.json and training.json beside the SavedModel (public), private_details.json in the workdir."""
    version = PushedVersion(fn_args.serving_model_dir)
    version.write_privacy(guarantee.dumps())
    version.write_training(kind_name, guarantee.parameters)
    with tf.io.gfile.GFile(os.path.join(fn_args.model_run_dir, PRIVATE_DETAILS_FILE), "w") as f:
        json.dump({"trainer": kind_name, **outcome.private_details}, f, indent=1, sort_keys=True,
                  default=_json_default)


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


def guarantee_properties(guarantee: Guarantee) -> Dict[str, Any]:
    """The Model artifact's public properties: the guarantee (one JSON value) plus scalar copies for queries."""
    return {"private": guarantee.private, "privacy_guarantee": guarantee.dumps(),
            "privacy_epsilon": guarantee.epsilon if guarantee.private else "inf", "privacy_delta": guarantee.delta,
            "privacy_accountant": guarantee.accountant, "privacy_relation": guarantee.relation,
            "privacy_unit": guarantee.unit, "privacy_source_id": guarantee.source_id,
            "privacy_ledger_seq": int(guarantee.ledger.get("seq", -1)),
            "privacy_ledger_head": guarantee.ledger.get("head_hash", ""), "trainer_kind": guarantee.trainer,
            "trainer_parameters": json.dumps(guarantee.parameters, sort_keys=True, default=_json_default)}


class PrivacyRecordingTrainerExecutor(tfx_trainer_executor.GenericExecutor):
    """TFX's GenericExecutor, plus: the run's guarantee becomes public properties of the Model artifact."""

    def Do(self, input_dict, output_dict, exec_properties) -> None:
        super().Do(input_dict, output_dict, exec_properties)
        model = artifact_utils.get_single_instance(output_dict[standard_component_specs.MODEL_KEY])
        serving_dir = path_utils.serving_model_path(model.uri)
        guarantee = Guarantee.loads(PushedVersion(serving_dir).privacy_text())
        for key, value in guarantee_properties(guarantee).items():
            assert key in PUBLIC_PROPERTIES, key
            _set_property(model, key, value)
