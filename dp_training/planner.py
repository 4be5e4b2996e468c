"""The one place a run's plan is assembled: ``plan_for(spec, kind, trainer_args, privacy_args, options)``.

The runner's pre-flight, ``privtrain export``, a study's plan, the pipeline's Trainer (tabular and image),
image benchmarks and ``federated.simulate`` all call it, so the event a plan states is the event the Trainer
reserves. What differs between data sets is their :class:`Modality`:

``tabular``
    the kind's arguments as given; the preprocessing release is the DP normalisation of the numeric features
    (``dp_training.preprocessing``; ``options.numeric_keys`` narrows it, e.g. ``[]`` for a column unit in the
    federated simulator, which uses the public scaling only).
``image``
    the image Trainer's own arguments (``dp_training.images.image_trainer_args``: the model's published
    defaults under the arguments given) and, for the ScatterNet models that standardise with DP statistics
    (``dp_training.images.uses_dp_normalization``), the DP channel-moment release of the ScatterNet features (one
    Gaussian event; one key per channel, the channel count is public: it follows from the declared image shape and
    the scattering's J and L). The default ``scatternet_linear`` standardises each image by its own statistics
    (a GroupNorm inside the model) and plans no preprocessing release.

Imports no TFX (nor TensorFlow): public inputs only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from core.dataset import DatasetSpec
from dp_training.protocol.options import PlanError, PrivacyOptions
from dp_training.protocol.run_plan import RunPlan, plan_run


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """How the run is set up beyond its arguments (all public).

    image_model: image data sets: one of ``dp_training.images.MODELS`` (default its ``DEFAULT_MODEL``).
    numeric_keys: tabular data sets: the features the DP normalisation covers (default: every numeric one).
    exact_rows: the exact training-row count, used only under replace_one (public there); default: counted from
      the data set's training split when the relation needs it.
    """

    image_model: Optional[str] = None
    numeric_keys: Optional[Sequence[str]] = None
    exact_rows: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The preprocessing release a modality plans: the keys it covers (no keys: no release) and what it covers."""

    keys: Tuple[str, ...]
    covers: Optional[str] = None


class Modality:
    """What a kind of data set adds to a plan: the trainer arguments it trains with and its preprocessing."""

    name = ""

    def trainer_args(self, kind_name: str, args: Mapping[str, Any], options: PlanOptions) -> Dict[str, Any]:
        return dict(args or {})

    def preprocessing(self, spec: DatasetSpec, options: PlanOptions) -> Preprocessing:
        raise NotImplementedError


class Tabular(Modality):
    name = "tabular"

    def preprocessing(self, spec: DatasetSpec, options: PlanOptions) -> Preprocessing:
        from core.features import numeric_key

        keys = options.numeric_keys
        if keys is None:
            keys = [numeric_key(c) for c in spec.numeric_features]
        return Preprocessing(tuple(keys), "the numeric features' normalisation means and standard deviations")


class Image(Modality):
    name = "image"

    def model(self, options: PlanOptions) -> str:
        from dp_training.images import DEFAULT_MODEL, check_model

        return check_model(options.image_model or DEFAULT_MODEL)

    def trainer_args(self, kind_name: str, args: Mapping[str, Any], options: PlanOptions) -> Dict[str, Any]:
        from dp_training.images import image_trainer_args

        if kind_name != "dp_sgd":
            raise PlanError(f"image data sets train with --trainer dp_sgd only (got {kind_name!r})")
        return image_trainer_args(self.model(options), args)

    def preprocessing(self, spec: DatasetSpec, options: PlanOptions) -> Preprocessing:
        from dp_training.images import ChannelNormalization, scattering_channels, uses_dp_normalization

        model = self.model(options)
        if not uses_dp_normalization(model):
            return Preprocessing(())
        keys = ChannelNormalization(scattering_channels(spec.image.shape)).keys
        return Preprocessing(tuple(keys), ChannelNormalization.covers)


TABULAR, IMAGE = Tabular(), Image()


def modality_of(spec: DatasetSpec) -> Modality:
    return IMAGE if spec.is_image else TABULAR


def exact_rows(spec: DatasetSpec) -> Optional[int]:
    """The training split's row count where the relation makes it public (replace_one), else None: counted as
    ingestion reads the rows (``core.dataset.readable_rows``, the data gate's row-local rule: a damaged row is a
    placeholder there, so one row never changes the count nor stops the plan)."""
    if spec.require_privacy().relation != "replace_one":
        return None
    from core.dataset import readable_rows

    return int(readable_rows(spec, "train"))


def plan_for(spec: DatasetSpec, kind, trainer_args: Optional[Mapping[str, Any]],
             privacy_args: "Optional[Mapping[str, Any] | PrivacyOptions]",
             options: Optional[PlanOptions] = None) -> RunPlan:
    """The run's plan (``dp_training.protocol.RunPlan``) from public inputs: the modality's trainer arguments
    and preprocessing release, then the kind's plan (``plan_run``). ``kind`` is a trainer kind object;
    ``privacy_args``: a ``dp_training.protocol.PrivacyOptions`` or a plain mapping (converted once, here)."""
    privacy = PrivacyOptions.from_mapping(privacy_args)
    options = options or PlanOptions()
    modality = modality_of(spec)
    args = modality.trainer_args(kind.name, trainer_args or {}, options)
    pre = modality.preprocessing(spec, options)
    exact = options.exact_rows if options.exact_rows is not None else exact_rows(spec)
    return plan_run(spec, kind.name, kind, args, privacy, list(pre.keys), exact_rows=exact)


__all__ = ["plan_for", "PlanOptions", "Modality", "Preprocessing", "Tabular", "Image", "TABULAR", "IMAGE",
           "modality_of", "exact_rows"]
