"""Ingestion: a TFX FileBasedExampleGen executor for header-less delimited files described by ``dataset.json``.

Per split, like TFX's CsvExampleGen, each column's type is inferred from its values (INT, FLOAT or STRING),
so a numeric column that holds text arrives as strings and ExampleValidator reports the type anomaly.
The missing-value token (``?`` for Adult) becomes an absent feature, and the label column is mapped to a
0/1 int64 feature after stripping its suffix (Adult's test labels end with ``.``).

The data gate's first half lives here (:func:`check_raw_data`, run by the runner before the pipeline starts,
and the same reader inside ExampleGen): every line of every split file is read with one rule, and a damaged
file stops the run with one line naming the file, the line and the problem -- an empty split, a header line
inside the data, bytes that are not UTF-8 text, a NUL byte, a wrong number of fields, an unknown label value.
Harmless variants are read as the clean file: Windows (CRLF) or old Mac (CR) line endings, blank lines, a
UTF-8 byte-order mark, spaces around cells. (Types, ranges, vocabularies, drift and skew are the second half:
TFDV in ``pipeline/validation.py``.)
"""
from __future__ import annotations

import codecs
import csv
import json
import os
from typing import Any, Dict, Iterable, List

import apache_beam as beam
import tensorflow as tf
from google.protobuf import json_format, struct_pb2
from tfx.components.example_gen.base_example_gen_executor import BaseExampleGenExecutor
from tfx.proto import example_gen_pb2
from tfx.types import standard_component_specs
from tfx.utils import proto_utils

from dp_training.dataset import DatasetSpec, RowError, parse_row

INT, FLOAT, STRING = "INT", "FLOAT", "STRING"


class IngestionError(ValueError):
    """A raw file or row cannot be read as the data set's description says (one line: file, line, problem)."""


NOTHING_RUN = "Nothing was trained or pushed."


def spec_to_custom_config(spec: DatasetSpec) -> example_gen_pb2.CustomConfig:
    struct = struct_pb2.Struct()
    struct.update(spec.to_json_dict())
    config = example_gen_pb2.CustomConfig()
    config.custom_config.Pack(struct)
    return config


def spec_from_exec_properties(exec_properties: Dict[str, Any]) -> DatasetSpec:
    config = exec_properties[standard_component_specs.CUSTOM_CONFIG_KEY]
    if isinstance(config, str):
        config = proto_utils.json_to_proto(config, example_gen_pb2.CustomConfig())
    struct = struct_pb2.Struct()
    config.custom_config.Unpack(struct)
    return DatasetSpec.from_json_dict(json_format.MessageToDict(struct))


def clean_row(spec: DatasetSpec, cells: List[str], where: str) -> List[str]:
    """Strips cells, maps the missing token to '' and the label to '0'/'1' (``dp_training.dataset.parse_row``,
    the platform's one row parser)."""
    try:
        return parse_row(spec, cells, where)
    except RowError as e:
        raise IngestionError(str(e)) from None


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


def _to_example(row: List[str], types: List[str], spec: DatasetSpec) -> tf.train.Example:
    feature = {}
    for column, cell, t in zip(spec.columns, row, types):
        name = spec.label_feature if column.kind == "label" else column.name
        if not cell:
            feature[name] = tf.train.Feature()
        elif column.kind == "label" or t == INT:
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(cell)]))
        elif t == FLOAT:
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(cell)]))
        else:
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[cell.encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _looks_like_header(spec: DatasetSpec, cells: List[str]) -> bool:
    """Most cells are column names (or the label feature's name): a header line, not a data row."""
    names = {c.name.lower() for c in spec.columns} | {spec.label_feature.lower()}
    hits = sum(1 for cell in cells if cell.strip().strip('"').lower() in names)
    return hits >= max(2, len(spec.columns) // 2)


def iter_raw_rows(spec: DatasetSpec, path: str, data: bytes) -> Iterable[List[str]]:
    """The cleaned rows of one raw file's bytes (the gate's one reading rule; raises :class:`IngestionError`)."""
    name = os.path.basename(path)
    if data.startswith(codecs.BOM_UTF8):  # a UTF-8 byte-order mark (Windows editors write one): harmless
        data = data[len(codecs.BOM_UTF8):]
    for lineno, raw in enumerate(data.splitlines(), start=1):  # \n, \r\n and \r all end a line
        where = f"{name} line {lineno}"
        if b"\x00" in raw:
            raise IngestionError(f"{where}: contains a NUL byte (a binary or UTF-16 file?); save it as UTF-8 "
                                 f"text. {NOTHING_RUN}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise IngestionError(f"{where}: byte {e.start + 1} (0x{raw[e.start]:02x}) is not UTF-8 text; save the "
                                 f"file as UTF-8. {NOTHING_RUN}") from None
        if not text.strip():
            continue
        try:
            cells = next(csv.reader([text], delimiter=spec.delimiter))
        except csv.Error as e:
            raise IngestionError(f"{where}: cannot be split into fields ({e}). {NOTHING_RUN}") from None
        if _looks_like_header(spec, cells):
            raise IngestionError(
                f"{where}: is a header line (column names) inside the data; dataset.json describes files without "
                f"a header: delete the line. {NOTHING_RUN}")
        try:
            yield clean_row(spec, cells, where)
        except IngestionError as e:
            raise IngestionError(f"{e}. {NOTHING_RUN}") from None


def _read_rows(path: str, spec: DatasetSpec) -> Iterable[List[str]]:
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    yield from iter_raw_rows(spec, path, data)


def check_raw_data(spec: DatasetSpec) -> Dict[str, str]:
    """The data gate's structural half, before anything runs: reads every file of every split with the
    ingestion's rule. Raises :class:`IngestionError` (one line: file, line, problem, fix) on the first problem;
    an empty split is one too. Returns {split: "ok"}."""
    out = {}
    for split in sorted(spec.splits):
        files = spec.split_files(split)
        if not files:
            raise IngestionError(f"the {split} split's pattern {spec.splits[split]!r} matches no file in "
                                 f"{spec.directory}. {NOTHING_RUN}")
        rows = 0
        for path in files:
            with open(path, "rb") as f:
                data = f.read()
            for _ in iter_raw_rows(spec, path, data):
                rows += 1
        if rows == 0:
            names = ", ".join(os.path.basename(p) for p in files)
            raise IngestionError(f"{names} line 1: the {split} split has no data rows (the file is empty or "
                                 f"blank); put the {split} rows in it. {NOTHING_RUN}")
        out[split] = "ok"
    return out


@beam.ptransform_fn
@beam.typehints.with_input_types(beam.Pipeline)
@beam.typehints.with_output_types(tf.train.Example)
def _DelimitedToExample(pipeline: beam.Pipeline, exec_properties: Dict[str, Any], split_pattern: str):
    spec = spec_from_exec_properties(exec_properties)
    pattern = os.path.join(exec_properties[standard_component_specs.INPUT_BASE_KEY], split_pattern)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise IngestionError(f"split pattern {pattern} matches no file")
    rows = (pipeline
            | "Files" >> beam.Create(files)
            | "ReadRows" >> beam.FlatMap(_read_rows, spec=spec))
    types = rows | "InferTypes" >> beam.CombineGlobally(_InferColumnTypes(len(spec.columns)))
    return rows | "ToExample" >> beam.Map(_to_example, types=beam.pvalue.AsSingleton(types), spec=spec)


class DelimitedExampleGenExecutor(BaseExampleGenExecutor):
    """ExampleGen executor for the data sets described by ``dataset.json``."""

    def GetInputSourceToExamplePTransform(self) -> beam.PTransform:
        return _DelimitedToExample
