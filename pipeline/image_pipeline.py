"""The pipeline's image-specific pieces (data sets with ``"kind": "image"``; docs/image_data.md): Transform's
public scaling, the Trainer's run (ScatterNet cache, DP channel normalisation, DP-SGD through the privacy protocol),
the export on raw pixels, the Evaluator's multi-class config, and ``privtrain predict`` on an IDX file.

Exported signatures (one SavedModel that contains the public scaling and the ScatterNet):
- ``serving_default``: ``examples`` (serialized tf.Example with the ``image`` encoded as one PNG, as ExampleGen
  writes it, ``pipeline.image_codec``) ->
  ``probabilities`` [n, classes], ``logits``, ``class_ids``;
- ``predict_raw``: ``image`` float32 [n, height, width] (grey) or [n, height, width, channels] raw pixels in the
  declared range -> the same;
- ``classify``: ``inputs`` (serialized tf.Example) -> ``classes`` (class names), ``scores``.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
import tensorflow_model_analysis as tfma

from core.dataset import DatasetSpec
from core.pushed import PushedVersion
from pipeline.image_codec import decode_images

PIXELS_FEATURE = "pixels"


# -- Transform -------------------------------------------------------------------------------------------------
def image_preprocessing_fn(inputs, spec: DatasetSpec):
    """Public only: the encoded image decoded (``pipeline.image_codec``) and its pixels scaled by the declared pixel
    range to [0, 1] (nothing estimated from the rows: no analyzers)."""
    img = spec.image
    x = inputs[spec.columns[0].name]
    if isinstance(x, tf.SparseTensor):
        x = tf.sparse.to_dense(x, default_value=b"")
    x = tf.reshape(tf.cast(decode_images(x, img.shape), tf.float32), [-1, img.num_pixels])
    scaled = tf.clip_by_value((x - float(img.pixel_min)) / float(img.pixel_max - img.pixel_min), 0.0, 1.0)
    label = inputs[spec.label_feature]
    if isinstance(label, tf.SparseTensor):
        label = tf.sparse.to_dense(label)
    return {PIXELS_FEATURE: scaled, spec.label_feature: tf.reshape(tf.cast(label, tf.int64), [-1])}


# -- Evaluator ---------------------------------------------------------------------------------------------------
def image_eval_config(spec: DatasetSpec, config) -> tfma.EvalConfig:
    """Accuracy overall and per class (slices by the label), blessed above ``--min-accuracy`` and not below the
    latest blessed model by more than ``--max-auc-drop`` (the same tolerance flag)."""
    from pipeline.pipeline_def import blessing_threshold, gated_eval_config

    return gated_eval_config(spec, "SparseCategoricalAccuracy",
                             blessing_threshold(config.min_accuracy, config.max_auc_drop))


# -- Trainer -------------------------------------------------------------------------------------------------------
def load_transformed_images(file_patterns: List[str], tf_transform_output, spec: DatasetSpec,
                            batch_size: int = 4096):
    """ExampleGen's examples (the encoded images) through the Transform graph (``tf_transform_output``: decode and
    scale, applied here rather than materialised by Transform) -> (pixels float32 [n, h, w, c] in [0, 1], int64
    labels [n])."""
    files = [f for pattern in file_patterns for f in tf.io.gfile.glob(pattern)]
    if not files:
        raise FileNotFoundError(f"no examples match {file_patterns}")
    raw_spec = tf_transform_output.raw_feature_spec()
    layer = tf_transform_output.transform_features_layer()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def transform(records):
        out = layer(tf.io.parse_example(records, raw_spec))
        return out[PIXELS_FEATURE], out[spec.label_feature]

    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP", num_parallel_reads=len(files)).batch(
        batch_size).map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)
    pixels, labels = [], []
    for x, y in dataset:
        pixels.append(x.numpy())
        labels.append(y.numpy())
    x = np.concatenate(pixels).reshape((-1,) + spec.image.shape)
    return x, np.concatenate(labels).astype(np.int64).reshape(-1)


def run_image_fn(fn_args) -> None:
    """The Trainer's run for image data sets (called by ``pipeline.trainer_executor.run_fn``)."""
    from dp_training.images import run_image_training
    from dp_training.protocol import not_covered
    from pipeline.trainer_executor import privacy_with_receipts, workdir_ledger, write_run_files
    from pipeline.trainers import get_trainer

    config = fn_args.custom_config
    spec = DatasetSpec.from_json_dict(config["dataset"])
    kind_name = config["trainer"]
    if kind_name != "dp_sgd":
        raise ValueError(f"image data sets train with --trainer dp_sgd only (got {kind_name!r})")
    model = config.get("image_model") or "scatternet_linear"
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    import tensorflow_transform as tft

    transform_output = tft.TFTransformOutput(fn_args.transform_output)
    train_x, train_y = load_transformed_images(fn_args.train_files, transform_output, spec)
    eval_x, eval_y = load_transformed_images(fn_args.eval_files, transform_output, spec)
    result = run_image_training(
        spec, model, kind_name, get_trainer(kind_name), config.get("trainer_args") or {},   # planned by plan_for
        privacy_with_receipts(config.get("privacy", {}), fn_args), train_x, train_y, eval_x, eval_y,
        scratch_dir=os.path.join(fn_args.model_run_dir, "scratch"), cache_dir=config.get("cache_dir"), log=log,
        not_covered=not_covered(spec, extra=(
            "the model's architecture and the ScatterNet transform (public, data-independent)",),
            eval_note=" (slices below the minimum size are suppressed)"),
        ledger=workdir_ledger(config.get("privacy", {}), fn_args))
    export_image_model(result.outcome.model, spec, model, fn_args.serving_model_dir, result.normalization)
    write_run_files(fn_args, kind_name, result.guarantee, result.outcome)


# -- Export ----------------------------------------------------------------------------------------------------
def export_image_model(model, spec: DatasetSpec, model_name: str, serving_model_dir: str,
                       channel_stats=None) -> None:
    from dp_training.images import GROUP_NORM_GROUPS, NORMALIZATION, SCATTERING_J, image_serving_model, \
        uses_scattering

    img = spec.image
    h, w, c = img.shape
    serving = image_serving_model(model, model_name, img.shape, img.pixel_min, img.pixel_max)
    image_key = spec.columns[0].name
    class_names = tf.constant(list(spec.classes))

    # One traced function holds the scattering and the model; every signature calls it (traced once).
    @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.float32)])
    def core(pixels):
        logits = serving(pixels, training=False)
        return {"probabilities": tf.nn.softmax(logits), "logits": logits,
                "class_ids": tf.argmax(logits, axis=-1)}

    def predict(pixels):
        return core(tf.reshape(pixels, [-1, h, w, c]))

    def parse(examples):   # one encoded image (PNG) per example, as ExampleGen writes it
        parsed = tf.io.parse_example(examples, {image_key: tf.io.FixedLenFeature([], tf.string)})
        return tf.cast(decode_images(parsed[image_key], img.shape), tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(examples):
        return predict(parse(examples))

    raw_shape = [None, h, w] if c == 1 else [None, h, w, c]

    @tf.function(input_signature=[tf.TensorSpec(raw_shape, tf.float32, name=image_key)])
    def serve_raw(image):
        return predict(image)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(inputs):
        p = predict(parse(inputs))["probabilities"]
        return {"classes": tf.tile(class_names[None, :], [tf.shape(p)[0], 1]), "scores": p}

    module = tf.Module()   # not the Keras model itself: Keras would trace (and save) every layer's call again
    module.weights = list(serving.variables)
    module.core = core
    tf.saved_model.save(module, serving_model_dir, signatures={
        "serving_default": serve_examples.get_concrete_function(),
        "predict_raw": serve_raw.get_concrete_function(),
        "classify": classify.get_concrete_function()})
    description = {"kind": "image", "shape": list(img.shape), "pixel_range": [img.pixel_min, img.pixel_max],
                   "model": model_name, "classes": list(spec.classes)}
    if uses_scattering(model_name):
        description["scattering"] = {"library": "kymatio", "J": SCATTERING_J}
        if NORMALIZATION[model_name] == "group_norm":   # per example, inside the model: nothing released
            description["group_normalisation"] = {"groups": GROUP_NORM_GROUPS, "per_example": True}
        if channel_stats is not None:   # DP release, covered by the run's guarantee
            description["channel_normalisation"] = channel_stats.to_json()
    version = PushedVersion(serving_model_dir)
    version.write_preprocessing(description)
    version.write_dataset(spec)


# -- privtrain predict ---------------------------------------------------------------------------------------------
def predict_images(version_dir: str, spec: DatasetSpec, input_file: str, limit: Optional[int] = None) -> Dict:
    """``privtrain predict --input FILE`` for an image model (``spec``: its published data-set description):
    FILE is an IDX images file (gzip'd or not) of the model's shape; a labels file beside it is not needed.
    Returns class probabilities per image."""
    from core.dataset import read_idx

    images = read_idx(input_file)
    h, w, c = spec.image.shape
    if images.ndim == 3 and c == 1:
        images = images[..., None]
    if images.shape[1:] != (h, w, c):
        from core.dataset import IdxError
        raise IdxError(f"{os.path.basename(input_file)}: images are {'x'.join(map(str, images.shape[1:]))}, the "
                       f"model takes {h}x{w}x{c}")
    if limit:
        images = images[:limit]
    loaded = tf.saved_model.load(version_dir)
    raw = images.astype(np.float32)
    out = loaded.signatures["predict_raw"](**{spec.columns[0].name: raw[..., 0] if c == 1 else raw})
    p = out["probabilities"].numpy()
    return {"model": version_dir, "probabilities": p.tolist(), "classes": list(spec.classes),
            "predicted": [spec.classes[i] for i in p.argmax(axis=1)], "labels": None}


def format_image_predictions(result: Dict, show: int = 20) -> str:
    lines = [f"model: {result.get('model', '?')}", f"{'image':>5} {'predicted':>14} {'probability':>12}"]
    for i, (name, p) in enumerate(zip(result["predicted"], result["probabilities"])):
        if i == show:
            lines.append(f"  ... {len(result['predicted']) - show} more images (use --json for all)")
            break
        lines.append(f"{i:>5} {name:>14} {max(p):>12.4f}")
    return "\n".join(lines)
