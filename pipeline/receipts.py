"""The ledger receipts a workdir holds, used as anchors (``docs/ledger.md``, "Tamper evidence").

Every finished run records its ledger receipt ``(seq, head_hash)`` in the guarantee: ``privacy.json`` beside
the Trainer's SavedModel (``pipeline_root/Trainer/model/<id>/Format-Serving``), the same file in every pushed
version under the serving directory, and the Model artifact's ML Metadata properties ``privacy_ledger_seq`` /
``privacy_ledger_head``. ``collect_receipts(workdir)`` gathers all of them; the runner's pre-flight, the
Trainer's reservation and ``privtrain budget verify --workdir`` pass them to the ledger, which refuses a chain
that lacks any of them (a forged ledger whose newest entries were deleted and the chain re-hashed).

A run that reserves and then fails writes no privacy.json, so the ledger's tail after the newest guarantee
would be unanchored: the Trainer executor therefore also appends every reserve and finish receipt to
``<workdir>/private/receipts.jsonl`` (0600, :func:`recording_ledger`), and ``collect_receipts`` includes them.

A workdir here is the directory that holds ``metadata.sqlite``, ``serving/`` and ``pipeline_root/`` (a run's
``--workdir``, or a study job's store directory).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Iterable, List, Optional, Tuple

from core.pushed import PRIVACY_FILE

METADATA_FILE = "metadata.sqlite"


class ReceiptError(ValueError):
    """A workdir's receipt could not be read (the message names the file and the fix)."""


@dataclasses.dataclass(frozen=True)
class Found:
    seq: int
    head_hash: str
    where: str

    @property
    def anchor(self) -> Tuple[int, str, str]:
        return (self.seq, self.head_hash, f"in {self.where}")


def _from_guarantee(text: str, where: str) -> Optional[Found]:
    try:
        d = json.loads(text)
    except ValueError:
        raise ReceiptError(f"{where} is not valid JSON; restore it (it records a ledger receipt)") from None
    led = (d.get("ledger") if isinstance(d, dict) else None) or {}
    seq, head = led.get("seq"), led.get("head_hash")
    if head in (None, "") and seq in (None, -1):
        return None
    if not (isinstance(seq, int) and seq >= 1 and isinstance(head, str) and len(head) == 64):
        raise ReceiptError(f"{where} holds a malformed ledger receipt (seq {seq!r}, hash {head!r}); restore it")
    return Found(seq, head, where)


def _privacy_files(workdir: str) -> List[str]:
    files = sorted(glob.glob(os.path.join(workdir, "pipeline_root", "*", "model", "*", "Format-Serving",
                                          PRIVACY_FILE)))
    serving = os.path.join(workdir, "serving")
    # every privacy.json under serving/, at any depth: also a version still being copied, or one misplaced
    for dirpath, dirnames, filenames in os.walk(serving):
        dirnames.sort()
        if PRIVACY_FILE in filenames:
            files.append(os.path.join(dirpath, PRIVACY_FILE))
    return files


def _metadata_receipts(path: str) -> List[Found]:
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    from pipeline.metadata import custom_properties

    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    try:
        store = metadata_store.MetadataStore(config)
        models = store.get_artifacts_by_type("Model")
    except Exception as e:  # noqa: BLE001 - ml_metadata raises its own error types
        if "not found" in str(e).lower() or "NotFound" in type(e).__name__:
            return []   # a store without Model artifacts (a validate-only workdir)
        raise ReceiptError(f"cannot read the ML Metadata store {path} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); restore it or pass another workdir"
                           ) from None
    out = []
    for model in models:
        props = custom_properties(model)
        seq, head = props.get("privacy_ledger_seq"), props.get("privacy_ledger_head")
        if seq is None or head in (None, "") or seq == -1:
            continue
        out.append(Found(int(seq), str(head), f"{path} (Model artifact {model.id})"))
    return out


RECEIPTS_FILE = os.path.join("private", "receipts.jsonl")


def _append_receipt(path: str, event: str, seq: int, head_hash: str) -> None:
    from core.private_files import private_dir

    private_dir(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps({"event": event, "seq": int(seq), "head_hash": str(head_hash)}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def recording_ledger(ledger_path: Optional[str], workdir: str):
    """The ledger at ``ledger_path`` (``dp_training.ledger.Ledger``), recording each reserve and finish receipt
    in ``<workdir>/private/receipts.jsonl`` as soon as the ledger returns it (the Trainer executor's ledger)."""
    from dp_training.ledger import Ledger

    receipts = os.path.join(os.path.abspath(workdir), RECEIPTS_FILE)

    class RecordingLedger(Ledger):
        def reserve(self, *args, **kwargs):
            reservation = super().reserve(*args, **kwargs)
            _append_receipt(receipts, "reserve", reservation.seq, reservation.head_hash)
            return reservation

        def finish(self, *args, **kwargs):
            receipt = super().finish(*args, **kwargs)
            _append_receipt(receipts, "finish", receipt.seq, receipt.head_hash)
            return receipt

    return RecordingLedger(ledger_path)


def _recorded_receipts(path: str) -> List[Found]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ReceiptError(f"cannot read {path}: {e.strerror}; check its permissions") from None
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            d = json.loads(line)
            seq, head = d["seq"], d["head_hash"]
        except (ValueError, KeyError, TypeError):
            raise ReceiptError(f"{where} is not a ledger receipt; restore the file") from None
        if not (isinstance(seq, int) and seq >= 1 and isinstance(head, str) and len(head) == 64):
            raise ReceiptError(f"{where} holds a malformed ledger receipt (seq {seq!r}, hash {head!r}); restore it")
        out.append(Found(seq, head, where))
    return out


def collect_receipts(workdir: str) -> List[Found]:
    """Every ledger receipt recorded under ``workdir`` (ML Metadata, privacy.json files, the Trainer's
    reserve/finish receipts in ``private/receipts.jsonl``); [] for a new one."""
    workdir = os.path.abspath(workdir)
    found: List[Found] = []
    recorded = os.path.join(workdir, RECEIPTS_FILE)
    if os.path.isfile(recorded):
        found += _recorded_receipts(recorded)
    metadata = os.path.join(workdir, METADATA_FILE)
    if os.path.isfile(metadata):
        found += _metadata_receipts(metadata)
    for path in _privacy_files(workdir):
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise ReceiptError(f"cannot read {path}: {e.strerror}; check its permissions") from None
        receipt = _from_guarantee(text, path)
        if receipt is not None:
            found.append(receipt)
    return found


def workdir_anchors(workdirs: Iterable[str]) -> List[Tuple[int, str, str]]:
    """The receipts of every workdir as ledger anchors ``(seq, hash, where)``, one per distinct receipt."""
    seen, out = set(), []
    for workdir in workdirs:
        for r in collect_receipts(workdir):
            if (r.seq, r.head_hash) not in seen:
                seen.add((r.seq, r.head_hash))
                out.append(r.anchor)
    return out


def workdir_of_model_run(model_run_dir: str) -> Optional[str]:
    """The workdir of a Trainer execution: ``<workdir>/pipeline_root/<node>/model_run/<id>`` (TFX's output
    layout); None for a pipeline root elsewhere (an exported pipeline's remote storage)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(model_run_dir))))
    if os.path.basename(root) != "pipeline_root" or not os.path.isdir(root):
        return None
    return os.path.dirname(root)


__all__ = ["collect_receipts", "recording_ledger", "workdir_anchors", "workdir_of_model_run", "Found", "ReceiptError"]
