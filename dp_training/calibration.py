"""Noise calibration: the smallest noise multiplier that meets a target epsilon.

Like Opacus' ``make_private_with_epsilon``: given the sampling rate, the number of steps, delta and
the accountant, find the smallest sigma in ``[min_noise, max_noise]`` with
``compute_epsilon(sigma, ...) <= target_epsilon``. Uses dp_accounting's ``calibrate_dp_mechanism``
(Brent's method on an explicit bracket, which guarantees the returned value is on the feasible side).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import dp_accounting
from dp_accounting import mechanism_calibration

from dp_training import accountants, sgd_events as accounting, events

DEFAULT_MIN_NOISE = 0.3
DEFAULT_MAX_NOISE = 100.0
SEARCH_PLD_DISCRETIZATION = 1e-3


_CALIBRATED: dict = {}   # calibrate_noise_multiplier's memo (this process)


class CalibrationError(ValueError):
    """The target epsilon cannot be met in the allowed noise range."""


def calibrate_noise_multiplier(target_epsilon: float, sampling_rate: float, steps: int,
                               delta: float, accountant: str = "pld", sampling: str = "poisson",
                               min_noise: float = DEFAULT_MIN_NOISE,
                               max_noise: float = DEFAULT_MAX_NOISE,
                               tol: float = 1e-3, relation: str = events.ADD_OR_REMOVE_ONE,
                               base_event: Optional[dp_accounting.DpEvent] = None) -> float:
    """Smallest noise multiplier (within ``tol``) whose DP-SGD event, composed with ``base_event`` (e.g. the
    run's DP preprocessing), has epsilon <= target_epsilon at ``delta`` under ``relation``.

    Raises:
      ValueError: invalid parameters (named in the message).
      CalibrationError: the target cannot be met with noise <= max_noise (or is <= 0).
    """
    accounting.validate_parameters(1.0, sampling_rate, steps, delta, accountant, sampling)
    if int(steps) == 0:
        return float(min_noise)
    # a pure function of its arguments: an identical calibration (every point of a study plans its run in the
    # study, the pre-flight and the Trainer) is answered from this process's memo
    key = tuple(repr(v) for v in (target_epsilon, sampling_rate, steps, delta, accountant, sampling, min_noise,
                                  max_noise, tol, relation)) + (
        events.canonical(base_event) if base_event is not None else "",)
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    sigma = _calibrate_sgd(target_epsilon, sampling_rate, steps, delta, accountant, sampling, min_noise, max_noise,
                           tol, relation, base_event)
    if len(_CALIBRATED) >= 1024:
        _CALIBRATED.pop(next(iter(_CALIBRATED)))
    _CALIBRATED[key] = sigma
    return sigma


def _calibrate_sgd(target_epsilon, sampling_rate, steps, delta, accountant, sampling, min_noise, max_noise, tol,
                   relation, base_event) -> float:

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return accounting.dp_event(sigma, sampling_rate, steps, sampling)

    what = (f"{steps} steps, sampling rate {sampling_rate:.4g}, {sampling} sampling, {accountant} accountant, "
            f"{relation}")
    return calibrate(target_epsilon, make_event, delta, accountant, relation, base_event, min_noise,
                     max_noise, tol, what,
                     fix="Raise the target epsilon, train for fewer steps/epochs, use a smaller batch (lower "
                         "sampling rate) or Poisson sampling, lower --preprocessing-epsilon, or more data.")


def calibrate(target_epsilon: float, make_event: Callable[[float], dp_accounting.DpEvent], delta: float,
              accountant: str = "pld", relation: str = events.ADD_OR_REMOVE_ONE,
              base_event: Optional[dp_accounting.DpEvent] = None,
              min_noise: float = DEFAULT_MIN_NOISE, max_noise: float = DEFAULT_MAX_NOISE,
              tol: float = 1e-3, what: str = "", fix: str = "Raise the target epsilon.") -> float:
    """Smallest noise multiplier s in [min_noise, max_noise] with epsilon(base + make_event(s)) <= target.

    Any mechanism whose epsilon decreases with its noise multiplier (DP-SGD, DP-FedAvg) calibrates here."""
    t = accounting._check_number("target_epsilon", target_epsilon, "pass e.g. 3.0.")
    if not t > 0 or math.isinf(t):
        raise CalibrationError(
            f"target_epsilon must be a finite number > 0, got {target_epsilon!r}; epsilon 0 is "
            "only reachable with infinite noise. Pass a positive target (e.g. 1.0 or 3.0).")
    if not 0 < min_noise < max_noise:
        raise ValueError(f"need 0 < min_noise < max_noise, got min_noise={min_noise!r}, "
                         f"max_noise={max_noise!r}.")
    base = base_event if base_event is not None else dp_accounting.NoOpDpEvent()
    accountants.check_supported(accountant, events.compose(base, make_event(1.0)), relation)

    def full(sigma: float) -> dp_accounting.DpEvent:
        return events.compose(base, make_event(sigma))

    def eps(sigma: float) -> float:  # the reported (fine) accounting
        return accountants.epsilon(full(sigma), delta, accountant, relation)

    def eps_search(sigma: float) -> float:
        # During the search PLD runs 10x coarser: still a valid (slightly larger) upper bound, so
        # the sigma found also meets the target under the fine accounting used for reporting.
        if accountant != "pld":
            return eps(sigma)
        return accountants.epsilon(full(sigma), delta, "pld", relation,
                                   value_discretization_interval=SEARCH_PLD_DISCRETIZATION)

    eps_max = eps(max_noise)
    if eps_max > t:
        raise CalibrationError(
            f"target epsilon {t:g} is unreachable: even noise_multiplier={max_noise:g} gives "
            f"epsilon {eps_max:.4g} at delta={delta:g}" + (f" ({what})" if what else "") + f". {fix}")
    lo, hi = float(min_noise), float(max_noise)
    if accountant == "pld" and accountants.get("rdp").supports(full(1.0), relation):
        # PLD is slow (~1 s per evaluation, more at small noise) and at least as tight as RDP:
        # calibrate with RDP first (milliseconds) and search PLD in [0.7 * sigma_rdp, sigma_rdp].
        try:
            sigma_rdp = calibrate(t, make_event, delta, "rdp", relation, base_event, min_noise, max_noise, tol,
                                  what, fix)
        except CalibrationError:
            sigma_rdp = max_noise
        if sigma_rdp <= min_noise:
            return float(min_noise)  # RDP already meets the target there, so PLD does too
        if eps_search(sigma_rdp) <= t:
            hi = sigma_rdp
            cand = max(min_noise, 0.7 * sigma_rdp)
            if cand > min_noise and eps_search(cand) > t:
                lo = cand
    if lo == min_noise and eps_search(min_noise) <= t:
        return float(min_noise)

    sigma = mechanism_calibration.calibrate_dp_mechanism(
        lambda: accountants.get(accountant).make(relation, value_discretization_interval=(
            SEARCH_PLD_DISCRETIZATION if accountant == "pld" else None)),
        full, target_epsilon=t, target_delta=float(delta),
        bracket_interval=mechanism_calibration.ExplicitBracketInterval(lo, hi),
        tol=tol)
    sigma = float(sigma)
    # calibrate_dp_mechanism guarantees the feasible side; double-check with our own accounting.
    while eps(sigma) > t:
        sigma += tol
    return sigma


__all__ = ["calibrate_noise_multiplier", "calibrate", "CalibrationError"]
