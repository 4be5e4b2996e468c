"""The data gate's structural half: every line of every split file read with one rule, before anything runs
(``check_raw_data``, called by the CLI and the runner) and inside ExampleGen (``iter_raw_rows``).

What stops a run depends on whether a split is private (docs/privacy_model.md, "Which checks can stop a run"):

- A **public** split (declared in ``privacy.public_splits``, or every split of a ``public_benchmark``) is read
  strictly: a damaged line stops the run with one line naming the file, the line and the problem (a header line
  inside the data, bytes that are not UTF-8 text, a NUL byte, a wrong number of fields, an unknown label value).
- A **private** split (the training rows) is read **row by row**: a damaged line is dropped (under
  ``replace_one``, where the row count is public, replaced by a public placeholder row) and counted, never
  a reason to stop, so adding or removing one row can never flip whether anything is published. The counts
  are private (``<workdir>/private/data_checks.json``, mode 0600), never printed or published.
- Both stop on file-level problems that no single row decides: the data-set description, a split pattern that
  matches no file, an unreadable file, and a split with **no** readable row (the only data-dependent stop: it
  tells the empty data set from its one-row neighbours, nothing else).

Harmless variants are read exactly as the clean file: Windows (CRLF) or old Mac (CR) line endings, blank
lines, a UTF-8 byte-order mark, spaces around cells. Types, ranges, vocabularies, drift and skew are the gate's
second half: TFDV in ``pipeline/validation.py`` (again strict on public splits only).

This module imports neither TensorFlow nor TFX, so a damaged file is refused in about a second.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Dict, Iterable, List, Optional

from core.dataset import DESCRIPTION_FILE, DROP_REASONS, DatasetError, DatasetSpec, RowError  # noqa: F401
from core.dataset import iter_raw_rows as _iter_raw_rows
from core.dataset import is_private_split, keeps_row_count, parse_row, placeholder_row, readable_rows  # noqa: F401


class IngestionError(DatasetError):
    """A raw file or row cannot be read as the data set's description says (one line: file, line, problem)."""


NOTHING_RUN = "Nothing was trained or pushed."
INT, FLOAT, STRING = "INT", "FLOAT", "STRING"
# dataset.json's "validation" section (checked by TFDV in pipeline/validation.py): comparator -> the splits compared
COMPARATORS = {"drift": "eval vs train", "skew": "train vs eval (as serving data)"}
STATISTICS = ("infinity_norm", "jensen_shannon_divergence")


def clean_row(spec: DatasetSpec, cells: List[str], where: str) -> List[str]:
    """Strips cells, maps the missing token to '' and the label to '0'/'1' (``core.dataset.parse_row``,
    the platform's one row parser)."""
    try:
        return parse_row(spec, cells, where)
    except RowError as e:
        raise IngestionError(str(e)) from None


def split_of_pattern(spec: DatasetSpec, pattern: str) -> Optional[str]:
    """The split whose file pattern is ``pattern`` (ExampleGen knows a split by its pattern)."""
    return next((split for split, p in spec.splits.items() if p == pattern), None)


def iter_raw_rows(spec: DatasetSpec, path: str, data: bytes, private: bool = False,
                  dropped: Optional[Counter] = None, first: Optional[List[str]] = None) -> Iterable[List[str]]:
    """The cleaned rows of one raw file's bytes by the gate's one reading rule (``core.dataset.iter_raw_rows``,
    the platform's one reader of raw rows: the fingerprint, the planner's count and the federated loader read
    by it too). ``private=False``: a damaged line raises :class:`IngestionError` naming file and line.
    ``private=True``: a damaged line is dropped (under ``replace_one`` replaced by the public placeholder row)
    and counted in ``dropped`` by reason (:data:`DROP_REASONS`), never a reason to stop."""
    try:
        yield from _iter_raw_rows(spec, path, data, private=private, dropped=dropped, first=first)
    except RowError as e:
        raise IngestionError(f"{e}. {NOTHING_RUN}") from None


def check_raw_data(spec: DatasetSpec) -> Dict[str, Dict]:
    """The data gate's structural half, before anything runs: reads every file of every split with the
    ingestion's rule. Raises :class:`IngestionError` (one line: file, line, problem, fix) on a file-level
    problem, on the first damaged line of a public split, and on a split without a readable row.

    Returns ``{split: tally}``, PRIVATE (it counts a private split's rows): ``{"private": bool, "rows": n,
    "dropped": {reason: count}, "unparsed_numeric_cells": {column: count}}``; the runner writes it to the
    workdir's private directory, nothing prints or publishes it.

    Remembered per process by the files' content (``core.content_memo``): a study's runs on the same bytes
    parse them once."""
    from core.content_memo import remembered

    return remembered(spec, "check_raw_data", spec.splits, lambda: _check_raw_data(spec))


def _check_raw_data(spec: DatasetSpec) -> Dict[str, Dict]:
    load_comparators(spec)  # a bad "validation" section is refused here too
    if spec.is_image:  # IDX files: headers, shapes, counts, labels (core.dataset.read_images)
        return check_image_files(spec)
    out = {}
    for split in sorted(spec.splits):
        files = spec.split_files(split)
        if not files:
            raise IngestionError(f"the {split} split's pattern {spec.splits[split]!r} matches no file in "
                                 f"{spec.directory}. {NOTHING_RUN}")
        private = is_private_split(spec, split)
        rows, dropped, unparsed, first = 0, Counter(), Counter(), []
        numeric = [i for i, c in enumerate(spec.columns) if c.kind == "numeric"]
        types = declared_types(spec)
        for path in files:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise IngestionError(f"{os.path.basename(path)}: cannot be read ({e.strerror}). {NOTHING_RUN}") \
                    from None
            for row in iter_raw_rows(spec, path, data, private=private, dropped=dropped, first=first):
                rows += 1
                for i in numeric:
                    if row[i] and as_declared(row[i], types[i]) is None:
                        unparsed[spec.columns[i].name] += 1
        if rows == 0:
            names = ", ".join(os.path.basename(p) for p in files)
            # the owner's diagnostic (not covered, like every error message): the first damaged line
            why = ("the file is empty or blank" if not first
                   else f"no line of it can be read as dataset.json describes; the first: {first[0]}")
            raise IngestionError(f"{names} line 1: the {split} split has no data rows ({why}); put the {split} "
                                 f"rows in it. {NOTHING_RUN}")
        out[split] = {"private": private, "rows": rows, "dropped": dict(dropped),
                      "unparsed_numeric_cells": dict(unparsed)}
    return out


def declared_types(spec: DatasetSpec) -> List[str]:
    """Each column's type from the reference schema (public): INT/FLOAT for numerics (FLOAT without a schema
    entry), STRING for categoricals, INT for the label. Never from the rows."""
    from google.protobuf import text_format
    from tensorflow_metadata.proto.v0 import schema_pb2

    features = {}
    if spec.schema_path:
        with open(spec.schema_path) as handle:
            schema = text_format.Parse(handle.read(), schema_pb2.Schema())
        features = {feature.name: feature.type for feature in schema.feature}
    out = []
    for column in spec.columns:
        if column.kind == "label":
            out.append(INT)
        elif column.kind == "numeric":
            out.append(INT if features.get(column.name) == schema_pb2.INT else FLOAT)
        else:
            out.append(STRING)
    return out


def as_declared(cell: str, t: str):
    """The cell as the declared numeric type, or None (a missing value) when it is not such a number."""
    try:
        value = float(cell)
    except ValueError:
        return None
    if t == FLOAT:
        return value
    if not value.is_integer():
        return None
    return int(min(max(value, -2.0 ** 62), 2.0 ** 62))  # an int64 (Transform clips to the public range anyway)



PRIVATE_CHECKS_DIR = "private"
PRIVATE_CHECKS_FILE = "data_checks.json"


def write_private_checks(workdir: str, tally: Dict[str, Dict]) -> str:
    """Writes the gate's tallies to ``<workdir>/private/data_checks.json`` (directory 0700, file 0600): the
    data owner's diagnostics of the private rows, inside the trust boundary, never published."""
    from core.private_files import private_dir, write_private_text

    path = os.path.join(private_dir(os.path.join(workdir, PRIVATE_CHECKS_DIR)), PRIVATE_CHECKS_FILE)
    write_private_text(path, json.dumps({
        "what": "row-local handling of the data gate (private: counts of the private rows; never published)",
        "structural": tally}, indent=1, sort_keys=True))
    return path


def check_image_files(spec: DatasetSpec) -> Dict[str, Dict]:
    """The structural gate of an image data set: every split's two IDX files read and checked (file-level
    problems stop the run; on a private split an example with a label outside the classes is dropped and
    pixels outside the declared range are clipped, counted privately)."""
    from core.dataset import read_images

    out = {}
    for split in sorted(spec.splits):
        private = is_private_split(spec, split)
        tally: Counter = Counter()
        try:
            rows = read_images(spec, split, row_local=tally if private else None)
        except DatasetError as e:
            raise IngestionError(f"{e}. {NOTHING_RUN}") from None
        if len(rows.labels) == 0:
            raise IngestionError(f"the {split} split has no example with a label among the declared classes. "
                                 f"{NOTHING_RUN}")
        out[split] = {"private": private, "rows": int(len(rows.labels)), "dropped": dict(tally)}
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
