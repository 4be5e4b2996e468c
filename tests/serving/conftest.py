"""Fixtures for the serving tests: two exported SavedModel templates (bias 0 and bias 3), serving
directories built from them, and a server factory that always stops what it started."""
from __future__ import annotations

import os

import pytest

from .helpers import push_version

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BIAS = {"a": 0.0, "b": 3.0}


@pytest.fixture(scope="session")
def model_templates(tmp_path_factory):
    from serving.testing import export_demo_model

    root = tmp_path_factory.mktemp("templates")
    return {k: export_demo_model(str(root / k), bias=b) for k, b in BIAS.items()}


@pytest.fixture
def make_serving_dir(tmp_path, model_templates):
    def make(versions, name="adult"):
        d = tmp_path / "serving"
        d.mkdir(exist_ok=True)
        for v, t in versions.items():
            push_version(d, model_templates, name, v, t)
        return str(d)
    return make


@pytest.fixture
def start_server():
    """``start_server(serving_dir, **kw)`` -> started ModelServer on free ports; stopped at teardown."""
    from serving import ModelServer

    started = []

    def start(serving_dir, **kw):
        kw.setdefault("backend", "builtin")
        kw.setdefault("log", lambda m: None)
        s = ModelServer(serving_dir, kw.pop("rest_port", 0), kw.pop("grpc_port", 0), **kw)
        started.append(s)
        return s.start()

    try:
        yield start
    finally:
        for s in started:
            s.stop()
