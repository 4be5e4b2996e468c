"""Reading back what a run recorded in ML Metadata: executions per run, models and their properties,
evaluations, blessings and pushes."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Dict, Iterator, List, Optional

from google.protobuf import json_format
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

STATE_NAMES = {v: k for k, v in metadata_store_pb2.Execution.State.items()}


@contextlib.contextmanager
def open_store(metadata_path: str, must_exist: bool = True) -> Iterator[metadata_store.MetadataStore]:
    if must_exist and not os.path.exists(metadata_path):
        raise FileNotFoundError(f"no ML Metadata store at {metadata_path}; run 'privtrain run --workdir DIR' "
                                f"first, or pass the --workdir of an earlier run")
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    store = metadata_store.MetadataStore(config)
    try:
        yield store
    finally:
        del store


def custom_properties(item) -> Dict[str, Any]:
    out = {}
    for key, value in item.custom_properties.items():
        kind = value.WhichOneof("value")
        if kind == "int_value":
            out[key] = value.int_value
        elif kind == "double_value":
            out[key] = value.double_value
        elif kind == "string_value":
            out[key] = value.string_value
        elif kind == "bool_value":
            out[key] = value.bool_value
        elif kind == "struct_value":  # TFX's JSON values: {"__value__": x} for a single value
            decoded = json_format.MessageToDict(value.struct_value)
            out[key] = decoded.get("__value__", decoded)
    return out


def run_context_ids(store) -> set:
    return {c.id for c in store.get_contexts_by_type("pipeline_run")}


@dataclasses.dataclass
class ComponentRecord:
    node_id: str
    state: str
    seconds: float
    outputs: Dict[str, List[Any]]  # output key -> MLMD artifacts


def components_of_run(store, run_context_id: int) -> List[ComponentRecord]:
    records = []
    executions = sorted(store.get_executions_by_context(run_context_id), key=lambda e: e.create_time_since_epoch)
    for execution in executions:
        node = next((c.name for c in store.get_contexts_by_execution(execution.id) if c.type == "node"), None)
        if node is None:
            node = next((c.name for c in store.get_contexts_by_execution(execution.id)
                         if store.get_context_types_by_id([c.type_id])[0].name == "node"), "?")
        outputs: Dict[str, List[Any]] = {}
        events = [e for e in store.get_events_by_execution_ids([execution.id])
                  if e.type in (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)]
        artifacts = {a.id: a for a in store.get_artifacts_by_id([e.artifact_id for e in events])}
        for event in events:
            key = event.path.steps[0].key if event.path.steps else "?"
            outputs.setdefault(key, []).append(artifacts[event.artifact_id])
        seconds = (execution.last_update_time_since_epoch - execution.create_time_since_epoch) / 1000.0
        records.append(ComponentRecord(node_id=node.split(".", 1)[-1], state=STATE_NAMES.get(
            execution.last_known_state, "UNKNOWN"), seconds=seconds, outputs=outputs))
    return records


def load_slice_metrics(evaluation_uri: str) -> Dict[str, Dict[str, float]]:
    """{slice name: {metric: value}} from an Evaluator output ("Overall", "sex=Female", ...)."""
    import tensorflow_model_analysis as tfma

    result = tfma.load_eval_result(evaluation_uri)
    out: Dict[str, Dict[str, float]] = {}
    for slice_key, metrics in result.slicing_metrics:
        name = "Overall" if not slice_key else ", ".join(f"{k}={v}" for k, v in slice_key)
        values = {}
        for output in metrics.values():
            for sub in output.values():
                for metric, value in sub.items():
                    if isinstance(value, dict) and "doubleValue" in value:
                        values[metric] = float(value["doubleValue"])
        out[name] = values
    return out


def artifact_types(store) -> Dict[int, str]:
    return {t.id: t.name for t in store.get_artifact_types()}


def find_artifact_by_uri(store, type_name: str, uri: str) -> Optional[Any]:
    for artifact in store.get_artifacts_by_type(type_name):
        if artifact.uri == uri:
            return artifact
    return None
