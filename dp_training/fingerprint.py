"""A digest of a data set's training content, for the ledger's copy check (``docs/ledger.md``).

``content_digest(spec)`` reads the training split with the one data-set reader (``core.dataset.read_rows``,
by the data gate's row-local rule: on a private split a damaged line is dropped, or under ``replace_one``
replaced by the public placeholder row, and never stops the run) and returns SHA-256 over the *sorted
multiset* of per-row digests. A tabular row is what the model trains on: its transformed model inputs
(``core.features.transform_columns``, keys sorted) plus the label, so ``39``, ``39.0`` and ``+3.9e1``, another
column order in ``dataset.json``, other whitespace, line endings or a byte-order mark give the same digest. An
image row is its label and pixel bytes (after the gate's clipping). The same rows in another order or in other
files give the same digest; one row added, removed or changed (as the model sees it) gives another (near-copies
are out of scope).

The digest never leaves the process: the ledger keeps only ``HMAC-SHA256(ledger key, digest)`` under a
per-ledger secret key, and nothing is published (an unkeyed hash of private rows would let anyone test guesses
about the data).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from core.dataset import DatasetSpec, is_private_split, read_images, read_rows

DOMAIN = b"privtrain-training-content/2"


def _multiset_digest(row_digests) -> bytes:
    rows = sorted(row_digests)
    h = hashlib.sha256(DOMAIN)
    h.update(len(rows).to_bytes(8, "big"))
    for d in rows:
        h.update(d)
    return h.digest()


def _tabular_row_digests(spec: DatasetSpec, split: str):
    from core.features import transform_columns

    rows = read_rows(spec, split)
    inputs = transform_columns(spec, rows.columns)
    keys = sorted(inputs)
    header = "\x1f".join(keys).encode("utf-8")
    # one float64 matrix [n, 1 + features]: the label then each model input in key order (ids are exact in float64)
    matrix = np.concatenate([np.asarray(rows.labels, np.float64).reshape(-1, 1)]
                            + [np.asarray(inputs[k], np.float64).reshape(-1, 1) for k in keys], axis=1)
    matrix = np.where(matrix == 0.0, 0.0, matrix).astype("<f8")   # -0.0 and 0.0 are the same input
    return [hashlib.sha256(header + row.tobytes()).digest() for row in matrix]


def content_digest(spec: DatasetSpec, split: str = "train") -> Optional[bytes]:
    """The training content's digest (bytes; private), or None when the split has no files on disk (a run on
    in-memory arrays: it carries no fingerprint)."""
    if split not in spec.splits or not spec.directory or not spec.split_files(split):
        return None
    from core.content_memo import remembered

    # remembered per process by the split files' content: a study's pre-flights and Trainers digest it once
    return remembered(spec, "content_digest", [split], lambda: _content_digest(spec, split), split)


def _content_digest(spec: DatasetSpec, split: str) -> bytes:
    if spec.is_image:
        rows = read_images(spec, split, row_local={} if is_private_split(spec, split) else None)
        images = rows.images
        return _multiset_digest(
            hashlib.sha256(int(label).to_bytes(8, "big") + images[i].tobytes()).digest()
            for i, label in enumerate(rows.labels))
    return _multiset_digest(_tabular_row_digests(spec, split))


__all__ = ["content_digest"]
