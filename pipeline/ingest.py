"""Ingestion: a TFX FileBasedExampleGen executor for header-less delimited files described by ``dataset.json``.

A public split's column types are inferred from its values like TFX's CsvExampleGen does (INT, FLOAT or
STRING), so a numeric column that holds text arrives as strings and ExampleValidator stops the run on the type
anomaly. A private split's types are the reference schema's (declared, public): one row can never change a
column's type; a numeric cell that does not parse as the declared type becomes a missing value (row-local; the
data gate counts such cells privately), and damaged lines are dropped (``pipeline/data_gate.py``).
The missing-value token (``?`` for Adult) becomes an absent feature, and the label column is mapped to a
0/1 int64 feature after stripping its suffix (Adult's test labels end with ``.``).

Rows are read by the data gate's rule (``pipeline/data_gate.py``: ``iter_raw_rows``), the same one the runner
applies to every file before the pipeline starts.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional

import apache_beam as beam
import tensorflow as tf
from google.protobuf import json_format, struct_pb2
from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
from tfx.proto import example_gen_pb2
from tfx.types import standard_component_specs
from tfx.utils import proto_utils

from core.dataset import DatasetSpec
from pipeline.data_gate import (IngestionError, check_raw_data, clean_row, is_private_split,  # noqa: F401
                                iter_raw_rows, split_of_pattern)
from pipeline.data_gate import FLOAT, INT, STRING, as_declared, declared_types  # noqa: F401



EXAMPLE_FORMAT_KEY = "example_format"


def spec_to_custom_config(spec: DatasetSpec, example_format: Optional[str] = None) -> example_gen_pb2.CustomConfig:
    """ExampleGen's custom config: the data set's description, plus ``example_format`` (a name of the examples'
    form, e.g. the image encoding) so that a change of the form changes ExampleGen's cache key: a workdir's cached
    examples of an older form are never reused."""
    struct = struct_pb2.Struct()
    struct.update({**spec.to_json_dict(), **({EXAMPLE_FORMAT_KEY: example_format} if example_format else {})})
    config = example_gen_pb2.CustomConfig()
    config.custom_config.Pack(struct)
    return config


def spec_from_exec_properties(exec_properties: Dict[str, Any]) -> DatasetSpec:
    config = exec_properties[standard_component_specs.CUSTOM_CONFIG_KEY]
    if isinstance(config, str):
        config = proto_utils.json_to_proto(config, example_gen_pb2.CustomConfig())
    struct = struct_pb2.Struct()
    config.custom_config.Unpack(struct)
    description = json_format.MessageToDict(struct)
    description.pop(EXAMPLE_FORMAT_KEY, None)
    return DatasetSpec.from_json_dict(description)


def _cell_type(cell: str) -> str:
    try:
        int(cell)
        return INT
    except ValueError:
        pass
    try:
        float(cell)
        return FLOAT
    except ValueError:
        return STRING


_ORDER = {None: 0, INT: 1, FLOAT: 2, STRING: 3}


class _InferColumnTypes(beam.CombineFn):
    """Widest type per column over a split (INT < FLOAT < STRING); None where a column is always empty."""

    def __init__(self, n: int):
        self._n = n

    def create_accumulator(self):
        return [None] * self._n

    def add_input(self, acc, row):
        for i, cell in enumerate(row):
            if cell:
                t = _cell_type(cell)
                if _ORDER[t] > _ORDER[acc[i]]:
                    acc[i] = t
        return acc

    def merge_accumulators(self, accs):
        merged = self.create_accumulator()
        for acc in accs:
            for i, t in enumerate(acc):
                if _ORDER[t] > _ORDER[merged[i]]:
                    merged[i] = t
        return merged

    def extract_output(self, acc):
        return acc


def _to_example(row: List[str], types: List[str], spec: DatasetSpec, declared: bool = False) -> tf.train.Example:
    """``declared``: ``types`` are the declared ones (a private split): an unparsable numeric cell -> missing."""
    feature = {}
    for column, cell, t in zip(spec.columns, row, types):
        name = spec.label_feature if column.kind == "label" else column.name
        if declared and cell and column.kind == "numeric":
            value = as_declared(cell, t)
            cell = "" if value is None else cell
        if not cell:
            feature[name] = tf.train.Feature()
        elif declared and column.kind == "numeric":
            feature[name] = (tf.train.Feature(int64_list=tf.train.Int64List(value=[value])) if t == INT
                             else tf.train.Feature(float_list=tf.train.FloatList(value=[value])))
        elif column.kind == "label" or t == INT:
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(cell)]))
        elif t == FLOAT:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(cell)]))
        else:
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[cell.encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _read_rows(path: str, spec: DatasetSpec, private: bool) -> Iterable[List[str]]:
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    yield from iter_raw_rows(spec, path, data, private=private)  # a private split: damaged lines dropped


@beam.ptransform_fn
@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(tf.train.Example)
def _DelimitedToExample(pipeline: beam.Pipeline, exec_properties: Dict[str, Any], split_pattern: str):
    spec = spec_from_exec_properties(exec_properties)
    pattern = os.path.join(exec_properties[standard_component_specs.INPUT_BASE_KEY], split_pattern)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise IngestionError(f"split pattern {pattern} matches no file")
    split = split_of_pattern(spec, split_pattern)
    private = split is None or is_private_split(spec, split)
    rows = (pipeline
            | "Files" >> beam.Create(files)
            | "ReadRows" >> beam.FlatMap(_read_rows, spec=spec, private=private))
    if private:  # types declared by the reference schema: no row decides a column's type
        return rows | "ToExample" >> beam.Map(_to_example, types=declared_types(spec), spec=spec, declared=True)
    types = rows | "InferTypes" >> beam.CombineGlobally(_InferColumnTypes(len(spec.columns)))
    return rows | "ToExample" >> beam.Map(_to_example, types=beam.pvalue.AsSingleton(types), spec=spec)


class DelimitedExampleGenExecutor(BaseExampleGenExecutor):
    """ExampleGen executor for the data sets described by ``dataset.json``."""

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        return _DelimitedToExample
