"""The data gate and the training-content digest are computed once per process for the same file content
(core.content_memo) — a study's runs parse the data once — and always anew when a byte changes, even if the
file keeps its size and modification time."""
from __future__ import annotations

import os

import pytest

from tests.conftest import make_adult_sample


@pytest.fixture(autouse=True)
def _empty_memo():
    from core import content_memo

    content_memo.clear()
    yield
    content_memo.clear()


def _rewrite_same_size_and_mtime(path, old: bytes, new: bytes):
    st = os.stat(path)
    data = open(path, "rb").read()
    assert old in data and len(old) == len(new)
    with open(path, "wb") as f:
        f.write(data.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_data_gate_parses_identical_content_once_and_changed_content_again(tmp_path, monkeypatch):
    from core.dataset import load_dataset
    from pipeline import data_gate

    data = make_adult_sample(str(tmp_path / "d"), 200, 100, source_id="content-memo-test")
    calls = []
    real = data_gate._check_raw_data
    monkeypatch.setattr(data_gate, "_check_raw_data", lambda spec: calls.append(1) or real(spec))
    first = data_gate.check_raw_data(load_dataset(data))
    first["train"]["rows"] = -1   # a caller changing its copy does not change the remembered tally
    second = data_gate.check_raw_data(load_dataset(data))
    assert len(calls) == 1 and second["train"]["rows"] == 200
    # one private training row damaged in place (same size, same mtime): the gate runs again and counts it
    _rewrite_same_size_and_mtime(os.path.join(data, "adult.data"), b"State-gov, 77516", b"State-gov, 7751x")
    third = data_gate.check_raw_data(load_dataset(data))
    assert len(calls) == 2 and third != second


def test_content_digest_is_remembered_by_content(tmp_path, monkeypatch):
    from core.dataset import load_dataset
    from dp_training import fingerprint

    data = make_adult_sample(str(tmp_path / "d"), 200, 100, source_id="content-memo-test")
    calls = []
    real = fingerprint._content_digest
    monkeypatch.setattr(fingerprint, "_content_digest", lambda spec, split: calls.append(split) or real(spec, split))
    a = fingerprint.content_digest(load_dataset(data))
    assert fingerprint.content_digest(load_dataset(data)) == a and calls == ["train"]
    _rewrite_same_size_and_mtime(os.path.join(data, "adult.data"), b"39, State-gov", b"38, State-gov")
    b = fingerprint.content_digest(load_dataset(data))
    assert calls == ["train", "train"] and b != a
    # the remembered value is the one computed from nothing
    assert b == real(load_dataset(data), "train")
