"""Ingestion of image data sets (``dataset.json`` ``"kind": "image"``): a TFX FileBasedExampleGen executor for
IDX files.

Each split's pattern matches one IDX images file and one IDX labels file (gzip'd or not); both are read and
checked by the platform's one reader (``core.dataset.read_images``: magic number, dimensions, counts,
labels within the declared classes; errors name the file). Every image becomes a ``tf.Example`` with the image
as ONE encoded bytes value (PNG, ``pipeline.image_codec``) and the label as one int64 class id, so
StatisticsGen/ExampleValidator handle two values per image (presence and count of the image, the label domain)
and Transform decodes the pixels.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import apache_beam as beam
import tensorflow as tf
from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
from tfx.types import standard_component_specs

from core.dataset import read_images
from pipeline.data_gate import IngestionError, is_private_split
from pipeline.image_codec import encode_images
from pipeline.ingest import spec_from_exec_properties


def _examples(split_pattern: str, input_base: str, spec):
    files = sorted(tf.io.gfile.glob(os.path.join(input_base, split_pattern)))
    if not files:
        raise IngestionError(f"split pattern {split_pattern} matches no file in {input_base}")
    split = next((s for s, p in spec.splits.items() if p == split_pattern), split_pattern)
    # a private split: an example with a label outside the classes is dropped, pixels clipped (row-local)
    rows = read_images(spec, split, files, row_local={} if is_private_split(spec, split) else None)
    image_key, label_key = spec.columns[0].name, spec.label_feature
    for encoded, label in zip(encode_images(rows.images), rows.labels):
        yield tf.train.Example(features=tf.train.Features(feature={
            image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
            label_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}))


@beam.ptransform_fn
@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(tf.train.Example)
def _IdxToExample(pipeline: beam.Pipeline, exec_properties: Dict[str, Any], split_pattern: str):
    spec = spec_from_exec_properties(exec_properties)
    input_base = exec_properties[standard_component_specs.INPUT_BASE_KEY]
    return (pipeline
            | "Pattern" >> beam.Create([split_pattern])
            | "ReadIdx" >> beam.FlatMap(_examples, input_base=input_base, spec=spec))


class IdxExampleGenExecutor(BaseExampleGenExecutor):
    """ExampleGen executor for image data sets in IDX files."""

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        return _IdxToExample
