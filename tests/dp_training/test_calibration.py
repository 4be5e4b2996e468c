"""Noise calibration for a target epsilon."""
import pytest

from dp_training.sgd_events import compute_epsilon
from dp_training.calibration import CalibrationError, calibrate_noise_multiplier


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0, 8.0])
def test_rdp_calibration_meets_target_and_is_close(target):
    q, steps, delta = 256 / 32561, 1270, 1e-5
    sigma = calibrate_noise_multiplier(target, q, steps, delta, accountant="rdp")
    eps = compute_epsilon(sigma, q, steps, delta, accountant="rdp")
    assert eps <= target
    assert eps >= 0.98 * target
    # smallest: a bit less noise breaks the target
    assert compute_epsilon(sigma * 0.99, q, steps, delta, accountant="rdp") > target


@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_pld_calibration_meets_target(sampling):
    q, steps, delta, target = 0.01, 300, 1e-5, 1.0
    sigma = calibrate_noise_multiplier(target, q, steps, delta, accountant="pld",
                                       sampling=sampling)
    eps = compute_epsilon(sigma, q, steps, delta, accountant="pld", sampling=sampling)
    assert 0.98 * target <= eps <= target
    # PLD is tighter than RDP, so it needs no more noise.
    assert sigma <= calibrate_noise_multiplier(target, q, steps, delta, accountant="rdp",
                                               sampling=sampling) + 1e-3


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(CalibrationError, match="unreachable") as err:
        calibrate_noise_multiplier(1e-4, 0.5, 10000, 1e-5, accountant="rdp", max_noise=5.0)
    msg = str(err.value)
    assert "noise_multiplier=5" in msg and "fewer" in msg


@pytest.mark.parametrize("target", [0.0, -1.0, float("inf")])
def test_non_positive_target_is_rejected(target):
    with pytest.raises(CalibrationError, match="target_epsilon"):
        calibrate_noise_multiplier(target, 0.01, 100, 1e-5)


def test_invalid_parameters_are_named():
    with pytest.raises(ValueError, match="delta"):
        calibrate_noise_multiplier(1.0, 0.01, 100, 2.0)
    with pytest.raises(ValueError, match="sampling_rate"):
        calibrate_noise_multiplier(1.0, 0.0, 100, 1e-5)


def test_large_target_returns_minimum_noise():
    assert calibrate_noise_multiplier(1e6, 0.01, 10, 1e-5, accountant="rdp") == pytest.approx(0.3)
