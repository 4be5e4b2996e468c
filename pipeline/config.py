"""One run's configuration, built by the CLI or by scripts."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Dict, Optional, Tuple

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA_DIR = os.path.join(PROJECT_ROOT, "data", "adult")
DEFAULT_WORKDIR = os.path.join(os.getcwd(), "privtrain-work")
# Code whose changes change Transform's or the Trainer's output (part of their cache keys).
TRAINING_CODE = ("pipeline/transform.py", "pipeline/model.py", "pipeline/image_pipeline.py", "pipeline/image_codec.py",
                 "pipeline/trainer_executor.py", "pipeline/trainers", "dp_training", "core", "federated")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data_dir: str = DEFAULT_DATA_DIR
    workdir: str = DEFAULT_WORKDIR
    trainer: str = "dp_sgd"  # privacy is the default
    trainer_args: Dict[str, Any] = dataclasses.field(default_factory=dict)
    model_name: Optional[str] = None  # defaults to the data set's name
    hidden_units: Tuple[int, ...] = (64, 64)
    min_auc: float = 0.80  # absolute AUC a model must exceed to be blessed
    max_auc_drop: float = 0.0  # how much lower than the latest blessed model's AUC is still blessed
    enable_cache: bool = True
    allow_non_private: bool = False  # non-private training on a data set that has a privacy budget
    # Run-level privacy arguments (dp_training.protocol.PrivacyOptions): target_epsilon, delta, accountant,
    # preprocessing_epsilon, budget_epsilon, budget_delta, ledger, audit_canaries, min_slice_size.
    privacy: Dict[str, Any] = dataclasses.field(default_factory=dict)
    validate_only: bool = False  # run the data gate only (ingestion, statistics, validation): nothing trained
    beam_args: Tuple[str, ...] = ()  # --beam-arg options, after the in-process defaults (pipeline.beam_options)
    # Studies (simulations/study): every grid point runs as the same pipeline, so the upstream components'
    # cache (keyed by TFX per pipeline name) is shared; no baseline comparison between grid points; and a
    # parallel job keeps its own ML Metadata store / outputs under ``store_dir`` (default: the workdir).
    pipeline_name: Optional[str] = None
    compare_to_baseline: bool = True
    store_dir: Optional[str] = None
    image_model: str = "scatternet_linear"  # image data sets: dp_training.images.MODELS (--model)
    min_accuracy: float = 0.5  # image data sets: overall accuracy a model must exceed to be blessed

    def privacy_args(self) -> Dict[str, Any]:
        out = {k: v for k, v in self.privacy.items() if v is not None}
        if self.allow_non_private:
            out["allow_non_private"] = True
        return out

    @property
    def pipeline_root(self) -> str:
        return os.path.join(self.store_dir or self.workdir, "pipeline_root")

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.store_dir or self.workdir, "metadata.sqlite")

    @property
    def serving_dir(self) -> str:
        return os.path.join(self.store_dir or self.workdir, "serving")


def source_digest(entries, root: str = PROJECT_ROOT) -> str:
    """SHA-256 (hex) over the Python sources of ``entries`` (files or directories relative to ``root``), in a
    fixed order: the one hash of platform code (Transform/Trainer cache keys; identical re-runs)."""
    h = hashlib.sha256()
    for entry in entries:
        path = os.path.join(root, entry)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(entry.encode() + f.read())
            continue
        for dirpath, dirnames, filenames in sorted(os.walk(path)):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        h.update(name.encode() + f.read())
    return h.hexdigest()


def code_version() -> str:
    """Hash of the training code, part of the Transform/Trainer cache keys so code changes re-run them."""
    return source_digest(TRAINING_CODE)[:16]
