"""The image examples' format (issue 20): ExampleGen writes each image as ONE encoded bytes value (PNG) plus the
int64 label; the reference schema validates that form (and flags the old 784 int64 pixels); Transform's
public preprocessing_fn decodes it to exactly the raw pixels scaled by the declared range; the pipeline does not
materialise Transform's output for images (the Trainer applies the transform graph to ExampleGen's examples)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from tests.pipeline.test_images import FMNIST, PACKAGE_DIR, _package_split, make_image_sample

pytestmark = pytest.mark.skipif(not os.path.isdir(PACKAGE_DIR),
                                reason="Debian's dataset-fashion-mnist is not installed (scripts/setup_system.sh)")
N = 64


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from core.dataset import load_dataset

    directory = make_image_sample(str(tmp_path_factory.mktemp("fmnist_format")), train=N, eval_=N)
    return load_dataset(directory)


def _ingested(spec, split="train"):
    from pipeline.image_ingest import _examples

    return list(_examples(spec.splits[split], spec.raw_directory, spec))


def _stats(examples):
    from tensorflow_data_validation.statistics import stats_impl
    from tfx_bsl.coders import example_coder

    batch = example_coder.ExamplesToRecordBatchDecoder().DecodeBatch([e.SerializeToString() for e in examples])
    return stats_impl.generate_statistics_in_memory(batch)


def _reference_schema():
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    with open(os.path.join(FMNIST, "schema.pbtxt")) as f:
        return text_format.Parse(f.read(), schema_pb2.Schema())


def test_ingestion_writes_one_encoded_image_and_the_label_per_example(sample):
    images, labels = _package_split("train")
    examples = _ingested(sample)
    assert len(examples) == N
    for i, example in enumerate(examples):
        feature = example.features.feature
        assert set(feature) == {"image", "label"}
        assert feature["image"].WhichOneof("kind") == "bytes_list" and len(feature["image"].bytes_list.value) == 1
        encoded = feature["image"].bytes_list.value[0]
        assert encoded.startswith(b"\x89PNG")           # one PNG, not 784 int64 values
        np.testing.assert_array_equal(tf.io.decode_png(encoded, channels=1).numpy()[..., 0], images[i])  # lossless
        assert list(feature["label"].int64_list.value) == [int(labels[i])]


def test_the_reference_schema_accepts_the_encoded_images_and_flags_raw_pixel_lists(sample):
    import tensorflow_data_validation as tfdv

    examples = _ingested(sample)
    schema = _reference_schema()
    assert not tfdv.validate_statistics(_stats(examples), schema).anomaly_info
    images, labels = _package_split("train")
    old_format = [tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(int64_list=tf.train.Int64List(value=img.reshape(-1).astype(int).tolist())),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y)]))}))
        for img, y in zip(images[:N], labels[:N])]
    anomalies = tfdv.validate_statistics(_stats(old_format), schema).anomaly_info
    assert "image" in anomalies
    two_images = []
    for e in examples:
        twice = tf.train.Example()
        twice.CopyFrom(e)
        twice.features.feature["image"].bytes_list.value.append(e.features.feature["image"].bytes_list.value[0])
        two_images.append(twice)
    assert "image" in tfdv.validate_statistics(_stats(two_images), schema).anomaly_info


def test_transform_decodes_the_encoded_images_to_the_raw_pixels_scaled(sample):
    from dp_training.images import scaled_pixels
    from pipeline.image_pipeline import PIXELS_FEATURE
    from pipeline.transform import preprocessing_fn

    examples = _ingested(sample)
    images, labels = _package_split("train")
    encoded = tf.constant([[e.features.feature["image"].bytes_list.value[0]] for e in examples])   # [n, 1]
    label = tf.constant([[int(y)] for y in labels[:N]], tf.int64)
    out = preprocessing_fn({"image": encoded, "label": label}, {"dataset": sample.to_json_dict()})
    expected = scaled_pixels(images[:N, :, :, None], 0, 255).reshape(N, -1)
    np.testing.assert_array_equal(out[PIXELS_FEATURE].numpy(), expected)
    np.testing.assert_array_equal(out["label"].numpy(), labels[:N])


def test_an_image_of_another_size_is_an_error_not_resized():
    from pipeline.image_codec import decode_images

    wrong = tf.io.encode_png(tf.zeros([28, 27, 1], tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode_images(tf.stack([wrong]), (28, 28, 1))


def test_the_image_pipeline_trains_on_examplegens_examples_through_the_transform_graph(sample, tmp_path):
    """Transform writes only its graph (in place: no pass over the data, no statistics over 784 floats); the
    Trainer reads ExampleGen's examples and the graph."""
    from pipeline.config import RunConfig
    from pipeline.pipeline_def import create_pipeline

    config = RunConfig(workdir=str(tmp_path))
    pipeline = create_pipeline(config, sample)
    by_id = {c.id: c for c in pipeline.components}
    transform, trainer = by_id["Transform"], by_id["Trainer"]
    assert transform.exec_properties["disable_statistics"]
    assert transform.outputs.get("transformed_examples") is None and transform.outputs.get("post_transform_stats") \
        is None
    assert trainer.inputs["examples"].producer_component_id == "ExampleGen"
    assert trainer.inputs["transform_graph"].producer_component_id == "Transform"


def test_the_examples_form_is_part_of_examplegens_cache_key(sample, tmp_path):
    """A workdir whose ExampleGen ran before the PNG form (784 int64 pixels) must not reuse those examples from
    TFX's cache (the new reference schema would reject them): the form is in ExampleGen's exec properties."""
    from google.protobuf import json_format, struct_pb2
    from tfx.proto import example_gen_pb2
    from tfx.utils import proto_utils

    from pipeline.config import RunConfig
    from pipeline.ingest import spec_from_exec_properties
    from pipeline.pipeline_def import create_pipeline

    pipeline = create_pipeline(RunConfig(workdir=str(tmp_path)), sample)
    example_gen = next(c for c in pipeline.components if c.id == "ExampleGen")
    config = example_gen.exec_properties["custom_config"]
    if isinstance(config, str):
        config = proto_utils.json_to_proto(config, example_gen_pb2.CustomConfig())
    struct = struct_pb2.Struct()
    config.custom_config.Unpack(struct)
    assert json_format.MessageToDict(struct)["example_format"] == "image:png+label:int64"
    assert spec_from_exec_properties(example_gen.exec_properties) == sample   # the description round-trips
