"""A digest of a data set's training content, for the ledger's copy check (``docs/ledger.md``).

``content_digest(spec)`` reads the training split with the one data-set reader (``core.dataset``) and
returns SHA-256 over the *sorted multiset* of per-row digests: a row is its parsed cells (``parse_row``:
stripped, missing token and label spelling normalised) for tabular data, its label and pixel bytes for image
data. The same rows in another order, in other files, with other whitespace, line endings or a byte-order mark
give the same digest; one row added, removed or changed gives another (near-copies are out of scope).

The digest never leaves the process: the ledger keeps only ``HMAC-SHA256(ledger key, digest)`` under a
per-ledger secret key, and nothing is published (an unkeyed hash of private rows would let anyone test guesses
about the data).
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

from core.dataset import DatasetSpec, iter_file_rows, read_images

DOMAIN = b"privtrain-training-content/1"


def _multiset_digest(row_digests) -> bytes:
    rows = sorted(row_digests)
    h = hashlib.sha256(DOMAIN)
    h.update(len(rows).to_bytes(8, "big"))
    for d in rows:
        h.update(d)
    return h.digest()


def content_digest(spec: DatasetSpec, split: str = "train") -> Optional[bytes]:
    """The training content's digest (bytes; private), or None when the split has no files on disk (a run on
    in-memory arrays: it carries no fingerprint)."""
    if split not in spec.splits or not spec.directory or not spec.split_files(split):
        return None
    if spec.is_image:
        rows = read_images(spec, split)
        images = rows.images
        return _multiset_digest(
            hashlib.sha256(int(label).to_bytes(8, "big") + images[i].tobytes()).digest()
            for i, label in enumerate(rows.labels))
    return _multiset_digest(
        hashlib.sha256(json.dumps(cells, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).digest()
        for path in spec.split_files(split) for _, cells in iter_file_rows(spec, path))


__all__ = ["content_digest"]
