"""Model repository: discovers ``<serving_dir>/<model>/<version>/`` SavedModels, loads them, keeps the
aspired versions loaded (a poller thread picks up newly pushed versions), and hands out ref-counted
handles so a version being replaced is only unloaded after its in-flight requests have drained.

Version rules (documented in docs/serving.md):
  * a version is an all-digits directory holding ``saved_model.pb`` (``core.pushed``'s rule, the one
    ``privtrain predict``, ``privtrain report`` and the encrypted service use too);
  * the newest ``max_versions`` versions (default 2) plus every version a label points to are loaded;
    ``max_versions=None`` loads all;
  * no version given -> the newest *available* version;
  * labels: ``<serving_dir>/<model>/labels.json`` (``{"stable": 1700000000, "canary": 1700000500}``),
    re-read on every poll; without that file the convention is ``canary`` = newest available version,
    ``stable`` = the one before it (or the newest when only one is available).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import grpc
import numpy as np

from core import pushed

from .errors import ServingError, invalid_argument, not_found

log = logging.getLogger("privtrain.serving")

LABELS_FILE = "labels.json"

# tensorflow_serving.apis.get_model_status_pb2.ModelVersionStatus.State names
START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


def discover_models(serving_dir: str) -> Dict[str, Dict[int, str]]:
    """``{model_name: {version: path}}`` for every model directory with at least one version."""
    return {name: {v.number: v.path for v in found} for name, found in pushed.models(serving_dir).items()}


def read_labels_file(model_dir: str) -> Optional[Dict[str, int]]:
    """Labels from ``labels.json``; None when absent. Invalid content is logged and ignored."""
    path = os.path.join(model_dir, LABELS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
        return {str(k): int(v) for k, v in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.warning("ignoring %s: %s", path, e)
        return None


def _dir_fingerprint(path: str) -> Tuple[int, int, float]:
    n, size, mtime = 0, 0, 0.0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:
                continue
            n += 1
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
    return n, size, mtime


class Signature:
    """One signature of a loaded version: its SignatureDef proto and the callable."""

    def __init__(self, name: str, sig_def, fn):
        import tensorflow as tf

        self.name = name
        self.sig_def = sig_def
        self.fn = fn
        self.inputs = {k: tf.dtypes.as_dtype(v.dtype) for k, v in sig_def.inputs.items()}
        self.np_inputs = {k: (np.object_ if d == tf.string else d.as_numpy_dtype)
                          for k, d in self.inputs.items()}
        self.input_ranks = {k: (None if v.tensor_shape.unknown_rank else len(v.tensor_shape.dim))
                            for k, v in sig_def.inputs.items()}
        self.outputs = {k: tf.dtypes.as_dtype(v.dtype) for k, v in sig_def.outputs.items()}
        self._tf = tf
        # Calling the function with its flat argument list skips TF's structured-argument binding
        # (about a fifth of a small call); the shapes it would check are checked here instead.
        self._dims = {k: (None if v.tensor_shape.unknown_rank else [d.size for d in v.tensor_shape.dim])
                      for k, v in sig_def.inputs.items()}
        order = list(getattr(fn, "_arg_keywords", None) or ())
        self._flat_order = order if sorted(order) == sorted(self.inputs) and hasattr(fn, "_call_flat") else None

    def _check_shapes(self, inputs: Mapping[str, np.ndarray]) -> None:
        for k, v in inputs.items():
            dims = self._dims.get(k)
            if dims is None:
                continue
            if len(dims) != v.ndim or any(d >= 0 and d != n for d, n in zip(dims, v.shape)):
                raise invalid_argument(f"input '{k}': shape {list(v.shape)} is not compatible with the "
                                       f"signature's {['?' if d < 0 else d for d in dims]}")

    def __call__(self, inputs: Mapping[str, np.ndarray], timeout_s: Optional[float] = None,
                 watchdog=None) -> Dict[str, np.ndarray]:
        """Run the signature; a call running longer than ``timeout_s`` is cancelled by ``watchdog``
        (a :class:`serving.deadline.Watchdog`) and fails with DEADLINE_EXCEEDED."""
        from .deadline import cancellable, timeout_error

        tf = self._tf
        feed = {k: tf.constant(v, dtype=self.inputs[k]) for k, v in inputs.items()}
        try:
            with cancellable(timeout_s, watchdog) as cm:
                try:
                    if self._flat_order is not None and set(feed) == set(self._flat_order):
                        self._check_shapes(inputs)
                        out = self.fn._call_flat([feed[k] for k in self._flat_order], self.fn.captured_inputs)
                    else:
                        out = self.fn(**feed)
                except tf.errors.CancelledError:
                    if cm is not None and cm.is_cancelled:
                        raise timeout_error(timeout_s) from None
                    raise
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            msg = getattr(e, "message", None) or str(e)
            raise invalid_argument(msg.strip()) from None
        except tf.errors.OpError as e:
            raise ServingError(_tf_code_to_grpc(e.error_code), e.message) from None
        return {k: v.numpy() for k, v in out.items()}


def _tf_code_to_grpc(code: int):
    import grpc

    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c
    return grpc.StatusCode.UNKNOWN


class Servable:
    """A loaded version of a model. ``refs`` counts in-flight requests."""

    def __init__(self, name: str, version: int, path: str):
        self.name, self.version, self.path = name, version, path
        self.state = START
        self.error: Optional[Tuple[str, str]] = None  # (error_code name, message) of a failed load
        self.refs = 0
        self.loaded = None
        self.signatures: Dict[str, Signature] = {}
        self.signature_def_map = None  # tensorflow_serving.apis.get_model_metadata_pb2.SignatureDefMap
        self.drained = threading.Event()

    def load(self) -> None:
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2

        self.state = LOADING
        sm = saved_model_pb2.SavedModel()
        with open(os.path.join(self.path, "saved_model.pb"), "rb") as f:
            sm.ParseFromString(f.read())
        meta = next((m for m in sm.meta_graphs if "serve" in m.meta_info_def.tags), sm.meta_graphs[0])
        sdm = get_model_metadata_pb2.SignatureDefMap()
        for k, v in meta.signature_def.items():
            sdm.signature_def[k].CopyFrom(v)
        self.signature_def_map = sdm
        self.loaded = tf.saved_model.load(self.path, tags=["serve"])
        sigs = {}
        for k, fn in self.loaded.signatures.items():
            if k in meta.signature_def:
                sigs[k] = Signature(k, meta.signature_def[k], fn)
        self.signatures = sigs
        self.state = AVAILABLE

    def signature(self, name: str, *, rest: bool = False) -> Signature:
        name = name or "serving_default"
        sig = self.signatures.get(name)
        if sig is None:
            if rest:  # http_rest_api_handler.cc GetInfoMap
                raise invalid_argument(f'Serving signature name: "{name}" not found in signature def')
            # predict_util.cc: FailedPrecondition (REST answers 400 either way)
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.')
        return sig

    def unload(self) -> None:
        self.loaded = None
        self.signatures = {}
        self.state = END
        self.drained.set()


class ModelRepository:
    """All models under ``serving_dir`` and their loaded versions."""

    def __init__(self, serving_dir: str, *, poll_interval_s: float = 1.0,
                 max_versions: Optional[int] = 2, model_names: Optional[List[str]] = None,
                 on_event: Optional[Callable[[str], None]] = None):
        self.serving_dir = os.path.abspath(serving_dir)
        self.poll_interval_s = poll_interval_s
        self.max_versions = max_versions
        self.model_names = list(model_names) if model_names else None
        self._on_event = on_event or (lambda m: log.info("%s", m))
        self._lock = threading.Lock()
        self._available: Dict[str, Dict[int, Servable]] = {}   # name -> version -> servable
        self._history: Dict[str, Dict[int, Servable]] = {}     # every version ever seen (for status)
        self._labels: Dict[str, Optional[Dict[str, int]]] = {}  # labels.json content per model
        self._pending: Dict[Tuple[str, int], Tuple[int, int, float]] = {}  # new dirs settling
        self._failed: Dict[Tuple[str, int], Tuple[int, int, float]] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._poll_lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------
    def load_initial(self) -> None:
        """Synchronously load what is on disk now (no settling delay)."""
        self.poll_once(settle=False)

    def start_polling(self) -> None:
        if self.poll_interval_s and self.poll_interval_s > 0 and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll_loop, name="privtrain-serving-poller",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            for versions in self._available.values():
                for s in versions.values():
                    s.state = UNLOADING
                    if s.refs == 0:
                        s.unload()
            self._available.clear()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll_once()
            except Exception:  # never let the poller die
                log.exception("model poll failed")

    # ---- polling ---------------------------------------------------------------------------
    def _aspired(self, name: str, on_disk: Dict[int, str], labels: Optional[Dict[str, int]]) -> List[int]:
        versions = sorted(on_disk, reverse=True)
        keep = set(versions if not self.max_versions else versions[: self.max_versions])
        if labels:
            keep |= {v for v in labels.values() if v in on_disk}
        return sorted(keep, reverse=True)

    def poll_once(self, settle: bool = True) -> None:
        """One scan: load newly aspired versions first, then retire versions no longer aspired."""
        with self._poll_lock:
            models = discover_models(self.serving_dir)
            if self.model_names is not None:
                models = {k: v for k, v in models.items() if k in self.model_names}
            for name in set(self._available) - set(models):
                self._retire(name, list(self._available.get(name, {})))
            for name, on_disk in models.items():
                labels = read_labels_file(os.path.join(self.serving_dir, name))
                with self._lock:
                    self._labels[name] = labels
                aspired = self._aspired(name, on_disk, labels)
                current = self._available.get(name, {})
                for v in aspired:
                    if v in current:
                        continue
                    key = (name, v)
                    fp = _dir_fingerprint(on_disk[v])
                    if key in self._failed:
                        if self._failed[key] == fp:
                            continue  # same bytes failed before; wait for a change
                        del self._failed[key]
                    if settle and self._pending.get(key) != fp:
                        # A version directory is loaded once it stopped changing for one poll
                        # interval, so a push still being copied is not loaded half-written.
                        self._pending[key] = fp
                        continue
                    self._pending.pop(key, None)
                    self._load(name, v, on_disk[v], fp)
                current = self._available.get(name, {})
                retire = [v for v in current if v not in aspired and self._has_newer(name, v, aspired)]
                self._retire(name, retire)

    def _has_newer(self, name: str, v: int, aspired: List[int]) -> bool:
        """Availability-preserving: only retire once an aspired version is available (or gone)."""
        avail = self._available.get(name, {})
        return any(a in avail for a in aspired) or not aspired

    def _load(self, name: str, version: int, path: str, fp) -> None:
        s = Servable(name, version, path)
        with self._lock:
            self._history.setdefault(name, {})[version] = s
        s.state = LOADING
        t0 = time.monotonic()
        try:
            s.load()
        except Exception as e:  # keep serving the others; status shows the failure
            s.state = END
            s.error = ("UNKNOWN", f"Failed to load {path}: {e}")
            self._failed[(name, version)] = fp
            self._on_event(f"model {name} version {version}: load failed: {e}")
            return
        with self._lock:
            self._available.setdefault(name, {})[version] = s
        self._on_event(f"model {name} version {version}: available ({time.monotonic() - t0:.1f}s)")

    def _retire(self, name: str, versions: List[int]) -> None:
        for v in versions:
            with self._lock:
                s = self._available.get(name, {}).pop(v, None)
                if s is None:
                    continue
                if not self._available.get(name):
                    self._available.pop(name, None)
                s.state = UNLOADING
                idle = s.refs == 0
                if idle:
                    s.unload()
            self._on_event(f"model {name} version {v}: "
                           + ("unloaded" if idle else "unloading after in-flight requests drain"))

    # ---- lookups ---------------------------------------------------------------------------
    def labels(self, name: str) -> Dict[str, int]:
        with self._lock:
            return self._labels_locked(name)

    def _labels_locked(self, name: str) -> Dict[str, int]:
        explicit = self._labels.get(name)
        if explicit is not None:
            return dict(explicit)
        avail = sorted(self._available.get(name, {}), reverse=True)
        if not avail:
            return {}
        return {"canary": avail[0], "stable": avail[1] if len(avail) > 1 else avail[0]}

    def _resolve_locked(self, name: str, version: Optional[int], label: Optional[str]) -> Servable:
        if version is not None and label:
            raise invalid_argument(
                f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
        avail = self._available.get(name, {})
        if label:
            labels = self._labels_locked(name)
            if label not in labels:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            version = labels[label]
        if version is None:
            if not avail:
                raise not_found(f"Servable not found for request: Latest({name})")
            return avail[max(avail)]
        s = avail.get(version)
        if s is None:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return s

    def resolve(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> Servable:
        with self._lock:
            return self._resolve_locked(name, version, label)

    @contextlib.contextmanager
    def handle(self, name: str, version: Optional[int] = None,
               label: Optional[str] = None) -> Iterator[Servable]:
        """Pin a version for the duration of a request (it is not unloaded until released)."""
        with self._lock:
            s = self._resolve_locked(name, version, label)
            s.refs += 1
        try:
            yield s
        finally:
            with self._lock:
                s.refs -= 1
                if s.refs == 0 and s.state == UNLOADING:
                    s.unload()

    def acquire(self, name, version=None, label=None) -> Servable:
        with self._lock:
            s = self._resolve_locked(name, version, label)
            s.refs += 1
            return s

    def release(self, s: Servable) -> None:
        with self._lock:
            s.refs -= 1
            if s.refs == 0 and s.state == UNLOADING:
                s.unload()

    def model_names_known(self) -> List[str]:
        """Every model name that has had a version (loaded or not), for status and metrics."""
        with self._lock:
            return sorted(self._history)

    def knows(self, name: str) -> bool:
        return name in self._history

    def model_names_loaded(self) -> List[str]:
        with self._lock:
            return sorted(self._available)

    def available_versions(self, name: str) -> List[int]:
        with self._lock:
            return sorted(self._available.get(name, {}), reverse=True)

    def status(self, name: str, version: Optional[int] = None,
               label: Optional[str] = None) -> List[Tuple[int, str, str, str]]:
        """``[(version, state, error_code, error_message)]`` newest first, like GetModelStatus."""
        with self._lock:
            if version is not None and label:
                raise invalid_argument(
                    f"Both model version ({version}) and model version label ({label}) cannot be supplied.")
            if label:
                labels = self._labels_locked(name)
                if label not in labels:
                    raise invalid_argument(f"Unrecognized servable version label: {label}")
                version = labels[label]
            hist = self._history.get(name, {})
            if version is not None:
                s = hist.get(version)
                if s is None:
                    raise not_found(f"Could not find version {version} of model {name}")
                items = [s]
            else:
                if not hist:
                    raise not_found(f"Could not find any versions of model {name}")
                items = [hist[v] for v in sorted(hist, reverse=True)]
            return [(s.version, s.state, *(s.error or ("OK", ""))) for s in items]
