"""The data gate's structural half: every line of every split file read with one rule, before anything runs
(``check_raw_data``, called by the CLI and the runner) and inside ExampleGen (``iter_raw_rows``).

A damaged file stops the run with one line naming the file, the line and the problem: an empty split, a header
line inside the data, bytes that are not UTF-8 text, a NUL byte, a wrong number of fields, an unknown label
value. Harmless variants are read exactly as the clean file: Windows (CRLF) or old Mac (CR) line endings, blank
lines, a UTF-8 byte-order mark, spaces around cells. Types, ranges, vocabularies, drift and skew are the gate's
second half: TFDV in ``pipeline/validation.py``.

This module imports neither TensorFlow nor TFX, so a damaged file is refused in about a second.
"""
from __future__ import annotations

import codecs
import csv
import json
import math
import os
from typing import Dict, Iterable, List

from dp_training.dataset import DESCRIPTION_FILE, DatasetError, DatasetSpec, RowError, parse_row


class IngestionError(DatasetError):
    """A raw file or row cannot be read as the data set's description says (one line: file, line, problem)."""


NOTHING_RUN = "Nothing was trained or pushed."
# dataset.json's "validation" section (checked by TFDV in pipeline/validation.py): comparator -> the splits compared
COMPARATORS = {"drift": "eval vs train", "skew": "train vs eval (as serving data)"}
STATISTICS = ("infinity_norm", "jensen_shannon_divergence")


def clean_row(spec: DatasetSpec, cells: List[str], where: str) -> List[str]:
    """Strips cells, maps the missing token to '' and the label to '0'/'1' (``dp_training.dataset.parse_row``,
    the platform's one row parser)."""
    try:
        return parse_row(spec, cells, where)
    except RowError as e:
        raise IngestionError(str(e)) from None


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


def check_raw_data(spec: DatasetSpec) -> Dict[str, str]:
    """The data gate's structural half, before anything runs: reads every file of every split with the
    ingestion's rule. Raises :class:`IngestionError` (one line: file, line, problem, fix) on the first problem;
    an empty split is one too. Returns {split: "ok"}."""
    load_comparators(spec)  # a bad "validation" section is refused here too
    if spec.is_image:  # IDX files: headers, shapes, counts, labels (dp_training.dataset.read_images)
        return check_image_files(spec)
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


def check_image_files(spec: DatasetSpec) -> Dict[str, str]:
    """The structural gate of an image data set: every split's two IDX files read and checked."""
    from dp_training.dataset import read_images

    out = {}
    for split in sorted(spec.splits):
        try:
            read_images(spec, split)
        except DatasetError as e:
            raise IngestionError(f"{e}. {NOTHING_RUN}") from None
        out[split] = "ok"
    return out


def load_comparators(spec: DatasetSpec) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``dataset.json``'s ``validation`` section, checked ({} when absent). Raises DatasetError with the fix."""
    path = os.path.join(spec.directory, DESCRIPTION_FILE)
    with open(path) as f:
        section = json.load(f).get("validation")
    if section is None:
        return {}
    example = ('e.g. "validation": {"drift": {"sex": {"infinity_norm": 0.1}}, '
               '"skew": {"age": {"jensen_shannon_divergence": 0.1}}}')
    if not isinstance(section, dict) or set(section) - set(COMPARATORS):
        raise DatasetError(f"{path}: \"validation\" may hold \"drift\" and \"skew\" only; {example}")
    features = {c.name for c in spec.feature_columns} | {spec.label_feature}
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for kind, by_feature in section.items():
        if not isinstance(by_feature, dict):
            raise DatasetError(f"{path}: validation.{kind} must map feature names to statistics; {example}")
        for feature, stats in by_feature.items():
            if feature not in features:
                raise DatasetError(f"{path}: validation.{kind} names {feature!r}, which is not a feature; "
                                   f"use one of {', '.join(sorted(features))}")
            if not isinstance(stats, dict) or not stats:
                raise DatasetError(f"{path}: validation.{kind}.{feature} must map a statistic to a threshold; "
                                   f"{example}")
            for stat, threshold in stats.items():
                if stat not in STATISTICS:
                    raise DatasetError(f"{path}: validation.{kind}.{feature}: unknown statistic {stat!r}; use "
                                       f"{' or '.join(STATISTICS)}")
                if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                        or not (0 < threshold <= 1) or math.isnan(threshold):
                    raise DatasetError(f"{path}: validation.{kind}.{feature}.{stat} must be a threshold in "
                                       f"(0, 1], got {threshold!r}")
                out.setdefault(kind, {}).setdefault(feature, {})[stat] = float(threshold)
    return out
