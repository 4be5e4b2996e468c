"""``simulations/images_validation.py``'s learning-rate schedules, Nesterov momentum and the one-line errors for
bad values (issue 20: the Fashion-MNIST search on the validation split)."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from simulations import images_validation as iv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "simulations", "images_validation.py")


@pytest.mark.parametrize("name, warmup, expected", [
    # 100 steps, 10 steps per epoch; {step: fraction of the base learning rate}, computed by hand
    ("constant", 0, {0: 1.0, 50: 1.0, 99: 1.0}),
    ("cosine", 0, {0: 1.0, 25: (1 + math.cos(math.pi / 4)) / 2, 50: 0.5, 75: (1 - math.cos(math.pi / 4)) / 2,
                   99: (1 + math.cos(math.pi * 99 / 100)) / 2}),
    ("linear", 0, {0: 1.0, 25: 0.75, 50: 0.5, 99: 0.01}),
    ("step", 0, {0: 1.0, 49: 1.0, 50: 0.1, 74: 0.1, 75: 0.01, 99: 0.01}),
    # 2 epochs of warm-up = 20 steps at (t + 1) / 20, then the decay over the remaining 80 steps
    ("cosine", 2, {0: 0.05, 9: 0.5, 19: 1.0, 20: 1.0, 60: 0.5, 99: (1 + math.cos(math.pi * 79 / 80)) / 2}),
    ("linear", 2, {0: 0.05, 19: 1.0, 20: 1.0, 40: 0.75, 99: 1 / 80}),
    ("constant", 2, {0: 0.05, 19: 1.0, 20: 1.0, 99: 1.0}),
    ("step", 2, {0: 0.05, 19: 1.0, 49: 1.0, 50: 0.1, 75: 0.01}),   # 50 % / 75 % of all the steps
])
def test_schedule_values(name, warmup, expected):
    f = iv.schedule_factors(name, warmup, 100, 10.0)
    assert f.shape == (100,)
    for step, value in expected.items():
        assert f[step] == pytest.approx(value, abs=1e-12), (name, warmup, step)


def test_parse_schedules():
    assert iv.parse_schedules("constant,cosine+2,step+0.5") == [("constant", 0.0), ("cosine", 2.0), ("step", 0.5)]
    assert iv.parse_momenta("0.8,0.95") == [0.8, 0.95]
    for bad in ("cosin", "cosine+-1", "cosine+x", "cosine+nan", ""):
        with pytest.raises(iv.OptionError, match="--schedules"):
            iv.parse_schedules(bad)
    for bad in ("1", "-0.1", "1.5", "x"):
        with pytest.raises(iv.OptionError, match="--momentum"):
            iv.parse_momenta(bad)


def test_average_pool_by_hand():
    """2 x 2 blocks of a 3 x 3 map: the far row and column repeated, so [[a, b, c], [d, e, f], [g, h, i]] pools to
    [[(a+b+d+e)/4, (c+c+f+f)/4], [(g+h+g+h)/4, (i+i+i+i)/4]]; one map per example and channel, independently."""
    m = np.arange(1.0, 10.0).reshape(3, 3)
    x = np.stack([np.stack([m, 10 * m]), np.stack([-m, m + 1])])        # [2 examples, 2 channels, 3, 3]
    out = iv.average_pool(x, 2)
    assert out.shape == (2, 2, 2, 2)
    expected = np.array([[(1 + 2 + 4 + 5) / 4, (3 + 3 + 6 + 6) / 4], [(7 + 8 + 7 + 8) / 4, 9.0]])
    np.testing.assert_allclose(out[0, 0], expected)
    np.testing.assert_allclose(out[0, 1], 10 * expected)
    np.testing.assert_allclose(out[1, 0], -expected)
    np.testing.assert_allclose(out[1, 1], expected + 1)
    assert iv.average_pool(x, 1) is x
    assert iv.average_pool(np.zeros((1, 81, 7, 7)), 2).shape == (1, 81, 4, 4)
    assert iv.parse_pool("3") == 3
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(iv.OptionError, match="--pool"):
            iv.parse_pool(bad)


def test_blur_by_hand():
    """[a, 1, a] / (1 + 2a) along rows then columns, edges replicated: a single 1 in the middle of a 3 x 3 map
    spreads to the outer product of [a, 1, a] / (1 + 2a); a constant map stays constant; alpha 0 is the identity."""
    a = 0.25
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1.0
    k = np.array([a, 1.0, a]) / (1 + 2 * a)
    np.testing.assert_allclose(iv.blur(x, a)[0, 0], np.outer(k, k))
    np.testing.assert_allclose(iv.blur(np.full((2, 3, 7, 7), 4.0), a), 4.0)
    ramp = np.arange(3.0)[None, None, None, :].repeat(3, axis=2)      # columns 0, 1, 2 in every row
    np.testing.assert_allclose(iv.blur(ramp, a)[0, 0, 0], [(a * 0 + 0 + a * 1) / 1.5, 1.0, (a * 1 + 2 + a * 2) / 1.5])
    assert iv.blur(x, 0.0) is x
    assert iv.parse_blur("0.1") == 0.1
    for bad in ("-0.1", "2", "x", "nan"):
        with pytest.raises(iv.OptionError, match="--blur"):
            iv.parse_blur(bad)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_step_matches_keras_sgd(nesterov):
    """The replica's update equals tf.keras.optimizers.SGD(momentum, nesterov) on a tiny problem, with a learning
    rate that changes every step (as under a schedule)."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 2)).astype(np.float32)
    grads = rng.normal(size=(6, 3, 2)).astype(np.float32)
    rates = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    schedule = tf.keras.optimizers.schedules.PiecewiseConstantDecay(list(range(len(rates) - 1)), rates)
    opt = tf.keras.optimizers.SGD(learning_rate=schedule, momentum=0.9, nesterov=nesterov)  # rates[iteration]
    var = tf.Variable(w0)
    w, v = w0.copy(), np.zeros_like(w0)
    for t, g in enumerate(grads):
        opt.apply_gradients([(tf.constant(g), var)])
        w, v = iv.momentum_step(w, v, g, np.float32(rates[t]), np.float32(0.9), nesterov)
        np.testing.assert_allclose(w, var.numpy(), rtol=1e-6, atol=1e-6)
    # Nesterov really differs from plain momentum here
    w_plain, v_plain = w0.copy(), np.zeros_like(w0)
    for t, g in enumerate(grads):
        w_plain, v_plain = iv.momentum_step(w_plain, v_plain, g, rates[t], 0.9, not nesterov)
    assert np.abs(w_plain - w).max() > 1e-3


@pytest.mark.parametrize("args, flag", [
    (["--schedules", "cosine,bogus"], "--schedules"),
    (["--schedules", "cosine+-2"], "--schedules"),
    (["--momentum", "1.0"], "--momentum"),
    (["--pool", "0"], "--pool"),
    (["--pool", "2.5"], "--pool"),
    (["--blur", "1.5"], "--blur"),
])
def test_bad_value_exits_2_with_one_line(args, flag):
    """Checked before the data load: one line on stderr naming the option and the fix, exit 2, no traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert flag in lines[0] and ("use " in lines[0] or "give " in lines[0])
    assert "Traceback" not in r.stderr and r.stdout == ""
