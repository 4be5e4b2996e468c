"""``privtrain run`` options for image data sets (``--model``, ``--min-accuracy``), kept out of the CLI module."""
from __future__ import annotations

from typing import Any, Dict, Tuple

from dp_training.dataset import DatasetError


def check_image_run(spec, args) -> None:
    """Refuses flag combinations an image data set cannot run with (one line, nothing trained)."""
    if not spec.is_image:
        raise DatasetError(f"--model {args.model} is for image data sets; {spec.name} is tabular (drop --model, its "
                           "model is the MLP of --hidden-units)")
    if args.trainer != "dp_sgd":
        raise DatasetError(f"image data sets train with --trainer dp_sgd only (got --trainer {args.trainer}); "
                           "drop the flag")
    if args.audit_canaries:
        raise DatasetError("--audit-canaries is not supported for image data sets yet (its canaries are tabular "
                           "rows); drop the flag")


def image_run_options(args, trainer_args: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(trainer args, RunConfig fields): the model's published defaults (``dp_training.images.IMAGE_DEFAULTS``)
    replace the dp_sgd kind's tabular defaults for every flag not given on the command line."""
    from dp_training.images import DEFAULT_MODEL, image_trainer_args
    from dp_training.trainer import DEFAULTS

    model = getattr(args, "model", None) or DEFAULT_MODEL
    given = {k: v for k, v in trainer_args.items() if k not in DEFAULTS or v != DEFAULTS[k]}
    return image_trainer_args(model, given), {"image_model": model,
                                                   "min_accuracy": getattr(args, "min_accuracy", 0.5)}
