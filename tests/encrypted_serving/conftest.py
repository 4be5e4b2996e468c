"""Fixtures for encrypted_serving tests.

Env split: these tests run under the platform env's pytest (the encrypted parties and client are
launched in the encrypted env by subprocess); test_encrypted_export.py needs the platform env's TF 2.15
and skips elsewhere; test_program_local.py needs tf-encrypted and skips in the platform env.
"""
import os
import signal
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from encrypted_serving import model_format as mf  # noqa: E402
from encrypted_serving import preprocessing as pp  # noqa: E402

ADULT = os.path.join(REPO, "data", "adult")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long encrypted-serving test (run with -m slow)")


@pytest.fixture(scope="session")
def adult_desc():
    return pp.load_dataset_description(ADULT)


@pytest.fixture(scope="session")
def adult_spec(adult_desc):
    rows, _ = pp.read_raw_rows(os.path.join(ADULT, "adult.data"), adult_desc, limit=3000)
    return pp.fit_spec(rows, adult_desc, max_vocab=50)


def random_mlp(input_dim, hidden=(16, 16), seed=0):
    rng = np.random.default_rng(seed)
    layers = [{"units": h, "activation": "relu"} for h in hidden] + [{"units": 1, "activation": "linear"}]
    config = mf.make_config(input_dim, layers)
    weights, fan = {}, input_dim
    for i, layer in enumerate(layers):
        weights[mf.kernel_key(i)] = rng.normal(0, 1.5 / np.sqrt(fan), (fan, layer["units"])).astype(np.float32)
        weights[mf.bias_key(i)] = rng.normal(0, 0.2, (layer["units"],)).astype(np.float32)
        fan = layer["units"]
    return config, weights


@pytest.fixture(scope="session")
def adult_model_dir(tmp_path_factory, adult_spec):
    """A small encrypted_model dir (107-16-16-1 ReLU MLP, random weights) for the Adult data set."""
    config, weights = random_mlp(pp.input_dim(adult_spec))
    return mf.save_model(str(tmp_path_factory.mktemp("encrypted_model")), config, weights, adult_spec)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); treat it as gone
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
