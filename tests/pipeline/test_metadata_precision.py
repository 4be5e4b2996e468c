"""Privacy numbers survive the round trip through ML Metadata's SQLite store exactly."""
from __future__ import annotations

import pytest
from ml_metadata.proto import metadata_store_pb2
from tfx.types import standard_artifacts

from pipeline.metadata import custom_properties, open_store
from pipeline.trainer_executor import _set_property


@pytest.mark.parametrize("value", [1e-9, 1 / 30000, 2.9996123456789])
def test_float_properties_round_trip_exactly(tmp_path, value):
    model = standard_artifacts.Model()
    _set_property(model, "privacy_delta", value)
    _set_property(model, "privacy_steps", 18)
    _set_property(model, "privacy_accountant", "pld")
    with open_store(str(tmp_path / "m.sqlite"), must_exist=False) as store:
        type_id = store.put_artifact_type(metadata_store_pb2.ArtifactType(name="Model"))
        proto = model.mlmd_artifact
        proto.type_id = type_id
        [artifact_id] = store.put_artifacts([proto])
        props = custom_properties(store.get_artifacts_by_id([artifact_id])[0])
    assert props["privacy_delta"] == value  # exactly: a double_value would come back rounded
    assert props["privacy_steps"] == 18 and props["privacy_accountant"] == "pld"
