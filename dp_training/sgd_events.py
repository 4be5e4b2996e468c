"""DP-SGD's events and epsilons (the accountants themselves live in ``dp_training.accountants``).

Public API (stable; other packages, e.g. ``federated/``, call it):

    compute_epsilon(noise_multiplier, sampling_rate, steps, delta, accountant="pld", sampling="poisson")
    dp_event(noise_multiplier, sampling_rate, steps, sampling="poisson")
    epsilon_of_event(event, delta, accountant="pld")

Sampling semantics
------------------
``"poisson"``
    Every step includes each example independently with probability ``q = sampling_rate``. The
    privacy amplification by subsampling then applies and the event is
    ``SelfComposed(PoissonSampled(q, Gaussian(sigma)), steps)`` under the add/remove-one relation.
``"shuffle"``
    Fixed-size batches from a shuffled pass over the data. We claim *no* amplification by
    shuffling/subsampling (standard accountants do not cover it, see Chua et al. 2024, "How Private
    are DP-SGD Implementations?"). Every epoch is a fresh permutation cut into ``n // b`` batches
    (the remainder dropped), so each example is in at most one batch per epoch and the honest bound is
    one Gaussian(sigma) release per epoch (parallel composition over the epoch's disjoint batches):
    ``SelfComposed(Gaussian(sigma), epochs)`` with ``epochs = ceil(steps / steps_per_epoch)`` and
    ``steps_per_epoch = n // b = floor(1 / q)`` (a partial epoch counts as a whole one). Not
    ``ceil(steps * q)``: when b does not divide n, an epoch has fewer than ``1 / q`` steps and that
    count would miss epochs that ran. Only under replace-one (n public, the batch layout the same for
    neighbours), where the clipped-sum sensitivity is 2C, which the accountants apply.
"""
from __future__ import annotations

import math

import dp_accounting

from dp_training import accountants as _accountants
from dp_training import events as _events

ACCOUNTANTS = _accountants.NAMES
SAMPLINGS = ("poisson", "shuffle")
DEFAULT_ACCOUNTANT = "pld"


def _check_number(name: str, value, fix: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}; {fix}") from None
    if math.isnan(v):
        raise ValueError(f"{name} must be a number, got NaN; {fix}")
    return v


def _is_whole_number(x) -> bool:
    import numpy as np
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, np.integer)):
        return True
    return isinstance(x, (float, np.floating)) and math.isfinite(x) and float(x).is_integer()


def validate_parameters(noise_multiplier, sampling_rate, steps, delta=None,
                        accountant: str | None = None, sampling: str | None = None) -> None:
    """Raises ValueError naming the first invalid parameter and how to fix it."""
    sigma = _check_number("noise_multiplier", noise_multiplier,
                          "pass a non-negative noise multiplier (e.g. 1.0).")
    if sigma < 0 or math.isinf(sigma):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}; "
                         "pass a non-negative noise multiplier (e.g. 1.0), or calibrate one from a "
                         "target epsilon with dp_training.calibration.calibrate_noise_multiplier.")
    q = _check_number("sampling_rate", sampling_rate,
                      "pass batch_size / num_examples.")
    if not 0 < q <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}; pass "
                         "batch_size / num_examples with 0 < batch_size <= num_examples.")
    if not _is_whole_number(steps):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}; pass the number of "
                         "optimizer steps taken.")
    if int(steps) < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}; pass the number of optimizer steps "
                         "taken (0 if none ran).")
    if delta is not None:
        d = _check_number("delta", delta, "pass a delta in (0, 1), typically below 1/num_examples.")
        if not 0 < d < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}; pass a delta strictly between "
                             "0 and 1, typically below 1/num_examples (e.g. 1e-5).")
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}; "
                         "use 'pld' (tightest, default) or 'rdp'.")
    if sampling is not None and sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}; use 'poisson' "
                         "(amplified) or 'shuffle' (fixed batches, no amplification claimed).")


def steps_per_epoch(sampling_rate: float) -> int:
    """Steps of one shuffled epoch at ``q = b / n``: ``n // b = floor(1 / q)`` (the tolerance absorbs the
    rounding of ``1 / (b / n)``; ``n mod b`` leaves a gap of at least ``1 / b`` below the next integer)."""
    return max(1, int(math.floor(1.0 / float(sampling_rate) + 1e-9)))


def epochs_for_steps(steps: int, sampling_rate: float, per_epoch: int | None = None) -> int:
    """Number of (possibly partial) shuffled epochs that ``steps`` steps run (``per_epoch`` steps each,
    default ``steps_per_epoch(q)``): each is one permutation, so a row is in one batch per epoch."""
    if steps <= 0:
        return 0
    per = steps_per_epoch(sampling_rate) if per_epoch is None else int(per_epoch)
    if per < 1:
        raise ValueError(f"steps per epoch must be >= 1, got {per_epoch!r}")
    return max(1, -(-int(steps) // per))


def dp_event(noise_multiplier: float, sampling_rate: float, steps: int,
             sampling: str = "poisson", per_epoch: int | None = None) -> dp_accounting.DpEvent:
    """The dp_accounting DpEvent describing ``steps`` DP-SGD steps (see module docstring); ``per_epoch``: the
    shuffled epoch's number of steps (``n // b``; default ``floor(1 / q)``, the same number)."""
    validate_parameters(noise_multiplier, sampling_rate, steps, sampling=sampling)
    steps = int(steps)
    sigma = float(noise_multiplier)
    q = float(sampling_rate)
    if steps == 0:
        return dp_accounting.NoOpDpEvent()
    if sigma == 0:
        return dp_accounting.NonPrivateDpEvent()
    if sampling == "poisson":
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma),
                                             epochs_for_steps(steps, q, per_epoch))


def epsilon_of_event(event: dp_accounting.DpEvent, delta: float,
                     accountant: str = DEFAULT_ACCOUNTANT,
                     pld_discretization: float | None = None,
                     relation: str = _events.ADD_OR_REMOVE_ONE) -> float:
    """Epsilon at ``delta`` of any DpEvent (e.g. a composition of several runs) under ``relation``."""
    d = _check_number("delta", delta, "pass a delta in (0, 1).")
    if not 0 < d < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}; pass a delta strictly between 0 "
                         "and 1, typically below 1/num_examples (e.g. 1e-5).")
    return _accountants.get(accountant).epsilon(event, d, relation,
                                                value_discretization_interval=pld_discretization)


def compute_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
                    accountant: str = "pld", sampling: str = "poisson",
                    relation: str = _events.ADD_OR_REMOVE_ONE) -> float:
    """Epsilon (at ``delta``) of ``steps`` DP-SGD steps with noise ``noise_multiplier``.

    Args:
      noise_multiplier: Gaussian noise std divided by the L2 clip norm (sigma). 0 -> inf.
      sampling_rate: q = batch_size / num_examples, in (0, 1].
      steps: number of noisy steps released (>= 0; 0 -> epsilon 0).
      delta: in (0, 1).
      accountant: "pld" (default, tightest) or "rdp".
      sampling: "poisson" (amplified) or "shuffle" (one Gaussian per epoch, no amplification).
    """
    validate_parameters(noise_multiplier, sampling_rate, steps, delta, accountant, sampling)
    if int(steps) == 0:
        return 0.0
    if float(noise_multiplier) == 0:
        return math.inf
    return epsilon_of_event(dp_event(noise_multiplier, sampling_rate, steps, sampling), delta,
                            accountant, relation=relation)
