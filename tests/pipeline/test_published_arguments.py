"""A private run's seed is never published (review F2): it fixes the Poisson batches, and the guarantee holds
only while it stays secret. report.json's lineage publishes the kind's public arguments only; an export of a
private run with a seed is refused in one line."""
from __future__ import annotations

import json

import pytest
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2 as pb

from pipeline.config import RunConfig


def _lineage_arguments(trainer_args):
    """report.json's lineage.trainer.arguments for a Trainer execution built as pipeline_def builds it."""
    from pipeline.audit_report import _lineage

    config = RunConfig(trainer_args=trainer_args)
    custom = {"dataset": {"name": "adult"}, "trainer": config.trainer, "trainer_args": dict(config.trainer_args),
              "privacy": config.privacy_args(), "hidden_units": [8], "code_version": "x"}
    c = pb.ConnectionConfig()
    c.fake_database.SetInParent()
    store = metadata_store.MetadataStore(c)
    et = store.put_execution_type(pb.ExecutionType(name="tfx.components.trainer.component.Trainer"))
    at = store.put_artifact_type(pb.ArtifactType(name="Model"))
    ex = pb.Execution(type_id=et, last_known_state=pb.Execution.COMPLETE)
    ex.custom_properties["custom_config"].string_value = json.dumps(custom)
    (ex_id,) = store.put_executions([ex])
    (model_id,) = store.put_artifacts([pb.Artifact(type_id=at, uri="/x")])
    ct = store.put_context_type(pb.ContextType(name="pipeline_run"))
    (ctx_id,) = store.put_contexts([pb.Context(type_id=ct, name="run1")])
    store.put_attributions_and_associations([], [pb.Association(context_id=ctx_id, execution_id=ex_id)])
    lineage = _lineage(store, store.get_artifacts_by_id([model_id])[0], store.get_executions_by_id([ex_id])[0])
    return lineage["trainer"]["arguments"]


def test_the_report_publishes_no_seed_but_the_public_arguments():
    args = _lineage_arguments({"seed": 1234, "epochs": 2, "not_a_setting": "x"})
    assert args == {"epochs": 2}


def test_exporting_a_private_run_with_a_seed_is_refused_in_one_line(adult_sample, tmp_path):
    from pipeline.export import ExportError, export

    config = RunConfig(data_dir=adult_sample, trainer_args={"seed": 1234})
    with pytest.raises(ExportError) as e:
        export("kubeflow", config, str(tmp_path / "p.yaml"), explicit_ledger=str(tmp_path / "ledger.sqlite"))
    assert "seed" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "p.yaml").exists()
