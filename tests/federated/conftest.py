import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~1 minute; run with -m slow or PRIVTRAIN_RUN_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PRIVTRAIN_RUN_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or PRIVTRAIN_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def adult():
    """Adult through the platform's one reader and public transform (federated.data.load_tabular)."""
    from federated.data import load_tabular
    from federated.simulate import DEFAULT_DATA

    return load_tabular(DEFAULT_DATA)


@pytest.fixture
def ledger_path(tmp_path, monkeypatch):
    """A budget ledger of this test's own (PRIVTRAIN_LEDGER)."""
    path = str(tmp_path / "ledger.sqlite")
    monkeypatch.setenv("PRIVTRAIN_LEDGER", path)
    return path


@pytest.fixture
def no_workers_after():
    """Asserts that the test leaves no TFF worker_binary child behind."""
    yield
    from federated.runtime import worker_processes

    left = worker_processes()
    assert not left, f"worker_binary left running: {[p.pid for p in left]}"
