"""The trainer plug-in contract.

A trainer kind is a plain class with a ``name`` and a ``train(context) -> TrainingOutcome`` method.
The pipeline's Trainer executor builds the :class:`TrainerContext` from TFX's ``FnArgs``, calls the
plug-in, exports the returned Keras model with the platform's serving signatures, writes the privacy
guarantee (if any) to ``privacy.json`` beside the SavedModel, and records it as ML Metadata custom
properties of the Model artifact. Plug-ins never touch TFX, export or metadata themselves.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class TrainerContext:
    """Everything a trainer kind needs, independent of TFX.

    Attributes:
      dataset_name: e.g. ``"adult"``.
      dataset_fingerprint: stable hash of the training split's content (the budget ledger's key).
      train_features / eval_features: transformed features as numpy arrays, one per model input
        (``{name: array[n, ...]}``), in the same row order as the labels.
      train_labels / eval_labels: float32 arrays of 0/1 labels, shape ``[n]``.
      build_model: returns a fresh, uncompiled Keras model mapping the transformed-feature dict to one
        logit per row. Call it inside your ``tf.distribute`` strategy scope if you use one.
      args: trainer-specific arguments from the command line / config (already parsed to Python types).
      workdir: the privtrain work directory (home of the budget ledger and other per-workdir state).
      log: ``log(message)`` prints a progress line the user sees during the run.
    """

    dataset_name: str
    dataset_fingerprint: str
    train_features: Mapping[str, np.ndarray]
    train_labels: np.ndarray
    eval_features: Mapping[str, np.ndarray]
    eval_labels: np.ndarray
    build_model: Callable[[], Any]
    args: Mapping[str, Any]
    workdir: str
    log: Callable[[str], None] = print

    @property
    def num_train_rows(self) -> int:
        return int(self.train_labels.shape[0])


@dataclasses.dataclass
class TrainingOutcome:
    """What a trainer kind hands back.

    Attributes:
      model: the trained Keras model (same inputs/outputs as ``context.build_model()``).
      privacy: the guarantee as a flat JSON-able dict (None for non-private training). Keys used by the
        platform: ``epsilon``, ``delta``, ``accountant``, ``noise_multiplier``, ``l2_norm_clip``,
        ``sampling_rate``, ``sampling_method``, ``steps``, ``epochs`` (plus any others you add).
      details: other facts worth recording (e.g. which DP code path ran, final train loss); flat dict of
        str/int/float values, recorded as ``trainer_*`` custom properties.
    """

    model: Any
    privacy: Optional[Dict[str, Any]] = None
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)


class TrainerKind(Protocol):
    name: str

    def train(self, context: TrainerContext) -> TrainingOutcome:
        ...
