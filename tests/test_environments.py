"""Both environments are built from their locks, import what they are for, and stay separate."""
from __future__ import annotations

import importlib
import os
import subprocess

import pytest

from tests.conftest import PROJECT_ROOT

SETUP = os.path.join(PROJECT_ROOT, "scripts", "setup_env.sh")


def _env(name):
    result = subprocess.run([SETUP, name], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip(), result.stderr


@pytest.mark.parametrize("module", [
    "tensorflow", "tfx", "tensorflow_data_validation", "tensorflow_transform", "tensorflow_model_analysis",
    "ml_metadata", "apache_beam", "tensorflow_serving.apis.prediction_service_pb2_grpc", "tensorflow_privacy",
    "tensorflow_privacy.privacy.privacy_tests.membership_inference_attack.membership_inference_attack",
    "dp_accounting", "tensorflow_federated", "matplotlib"])
def test_platform_packages_import(module):
    importlib.import_module(module)


def test_platform_versions_are_the_pinned_ones():
    import tensorflow as tf
    import tfx

    assert tf.__version__ == "2.15.1" and tfx.__version__ == "1.15.1"


def test_second_setup_reuses_the_environment():
    path, _ = _env("platform")
    again, messages = _env("platform")
    assert again == path and "creating" not in messages  # cached: nothing rebuilt


def test_encrypted_environment_runs_tf_encrypted_without_platform_packages():
    path, _ = _env("encrypted")
    script = ("import tensorflow as tf, tf_encrypted as tfe, importlib.util as u; "
              "print(tf.__version__, tfe.__version__ if hasattr(tfe, '__version__') else '?', "
              "u.find_spec('tfx') is None, u.find_spec('tensorflow_federated') is None)")
    result = subprocess.run([os.path.join(path, "bin", "python"), "-c", script], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    tf_version, _, no_tfx, no_tff = result.stdout.split()[-4:]
    assert tf_version == "2.9.1" and no_tfx == "True" and no_tff == "True"
