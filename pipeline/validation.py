"""The data gate's second half: ExampleValidator (TFDV) that stops the run on anomalies of PUBLIC splits, with a
message naming each feature, split and statistic.

Only splits whose rows are public by declaration (``privacy.public_splits``; every split of a
``public_benchmark``) can stop a run here. A private split's anomalies (a value outside the declared range, an
unknown category, a missing value, a type) never do: the Transform handles each row on its own (numerics clipped
to the public range, unknown categories mapped to the out-of-vocabulary id, unparsable numerics missing), so
adding or removing one private row can never flip whether a model is published. Those anomalies are written,
private, to ``private_checks.json`` (0600) beside the anomalies artifact in the workdir, never published. A drift
or skew comparator compares two splits: it stops the run only when both are public.

1. Every split's statistics against the data set's curated reference schema (types, presence, categorical
   domains, the declared numeric ``int_domain``/``float_domain`` ranges, the 0/1 label).
2. Drift and skew comparators declared in ``dataset.json`` (optional)::

     "validation": {
       "drift": {"sex": {"infinity_norm": 0.1}, "age": {"jensen_shannon_divergence": 0.1}},
       "skew":  {"race": {"infinity_norm": 0.2}}
     }

   ``drift`` compares the eval split with the train split (TFDV's ``previous_statistics``: the train split is
   the reference); ``skew`` compares the train split with the eval split standing for the data the model will
   be served (TFDV's ``serving_statistics``). ``infinity_norm`` (largest difference of a categorical value's
   share) and ``jensen_shannon_divergence`` (categorical or numeric histograms) are the statistics; each
   threshold is a number in (0, 1]. A violation stops the run like any anomaly when both splits are public
   (otherwise it is recorded privately, see above).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

from tfx.components import ExampleValidator
from tfx.components.example_validator import executor as tfx_validator_executor
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import standard_component_specs
from tfx.types.component_spec import ExecutionParameter
from tfx.utils import json_utils

from pipeline.data_gate import COMPARATORS, STATISTICS, load_comparators  # noqa: F401 (re-exported)

COMPARATORS_KEY = "comparators"
PUBLIC_SPLITS_KEY = "public_splits"
PRIVATE_FINDINGS_FILE = "private_checks.json"


def public_splits(spec) -> List[str]:
    """The splits whose rows are public by declaration (their anomalies may stop a run)."""
    from pipeline.data_gate import is_private_split

    return sorted(split for split in spec.splits if not is_private_split(spec, split))


class DataValidationError(RuntimeError):
    """The data does not match the reference schema or drifted; nothing was trained or pushed."""


def describe_anomalies(anomalies, split: str, only_comparators: bool = False,
                       comparator: Optional[str] = None) -> List[str]:
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    type_name = anomalies_pb2.AnomalyInfo.Type.Name
    lines = []
    for feature, info in sorted(anomalies.anomaly_info.items()):
        reasons = [r for r in info.reason
                   if not only_comparators or type_name(r.type).startswith("COMPARATOR_")]
        if only_comparators and not reasons:
            continue
        if comparator:
            text = "; ".join(f"{comparator} ({_statistic(type_name(r.type))}): {r.description}" for r in reasons)
        else:
            text = "; ".join(f"{r.short_description}: {r.description}" for r in reasons) or info.description
        lines.append(f"  [{split}] feature '{feature}': {text}")
    if not only_comparators and anomalies.HasField("dataset_anomaly_info"):
        info = anomalies.dataset_anomaly_info
        reasons = "; ".join(f"{r.short_description}: {r.description}" for r in info.reason) or info.description
        lines.append(f"  [{split}] data set: {reasons}")
    return lines


def _statistic(type_name: str) -> str:
    if "L_INFTY" in type_name:
        return "infinity_norm"
    if "JENSEN_SHANNON" in type_name:
        return "jensen_shannon_divergence"
    return type_name.lower()


def comparator_problems(schema, train_stats, eval_stats, comparators: Dict[str, Any]) -> List[str]:
    """TFDV's drift (eval vs train) and skew (train vs eval as serving) checks, one line per violation."""
    import tensorflow_data_validation as tfdv
    from tensorflow_metadata.proto.v0 import schema_pb2

    problems: List[str] = []
    for kind, by_feature in sorted(comparators.items()):
        s = schema_pb2.Schema()
        s.CopyFrom(schema)
        for feature, stats in by_feature.items():
            comparator = getattr(tfdv.get_feature(s, feature), f"{kind}_comparator")
            for stat, threshold in stats.items():
                getattr(comparator, stat).threshold = threshold
        if kind == "drift":
            anomalies = tfdv.validate_statistics(statistics=eval_stats, schema=s, previous_statistics=train_stats)
        else:
            anomalies = tfdv.validate_statistics(statistics=train_stats, schema=s, serving_statistics=eval_stats)
        problems.extend(describe_anomalies(anomalies, COMPARATORS[kind], only_comparators=True, comparator=kind))
    return problems


class StrictValidatorExecutor(tfx_validator_executor.Executor):
    def Do(self, input_dict, output_dict, exec_properties):
        from tfx.components.statistics_gen import stats_artifact_utils
        from tfx.types import artifact_utils
        from tfx.utils import io_utils

        self._problems: List[str] = []       # public splits: these stop the run
        self._private: List[str] = []        # private splits: row-local handling, recorded privately
        # splits not listed are private (the default: nothing private can stop a run)
        self._public = set(json_utils.loads(exec_properties.get(PUBLIC_SPLITS_KEY) or "null") or [])
        result = super().Do(input_dict, output_dict, exec_properties)
        comparators = json_utils.loads(exec_properties.get(COMPARATORS_KEY) or "null") or {}
        if comparators:
            stats = artifact_utils.get_single_instance(input_dict[standard_component_specs.STATISTICS_KEY])
            schema = io_utils.SchemaReader().read(io_utils.get_only_uri_in_dir(
                artifact_utils.get_single_uri(input_dict[standard_component_specs.SCHEMA_KEY])))
            train, evaluation = (stats_artifact_utils.load_statistics(stats, split).proto()
                                 for split in ("train", "eval"))
            problems = comparator_problems(schema, train, evaluation, comparators)
            # drift and skew compare train with eval: a decision on private rows unless both are public
            (self._problems if {"train", "eval"} <= self._public else self._private).extend(problems)
        anomalies_uri = artifact_utils.get_single_uri(output_dict[standard_component_specs.ANOMALIES_KEY])
        _write_private_findings(anomalies_uri, self._private)
        if self._problems:
            raise DataValidationError(
                "data validation failed; a PUBLIC split does not match the data set's reference schema or the "
                "drift/skew limits in dataset.json:\n"
                + "\n".join(self._problems)
                + "\nFix the data (or, if the change is intended, update the reference schema or the "
                  "\"validation\" limits named in dataset.json) and run again. Nothing was trained or pushed.")
        return result

    def _Validate(self, inputs, outputs):
        anomalies = super()._Validate(inputs, outputs)
        split = str(outputs.get("schema_diff_path", "")).rstrip("/").rsplit("Split-", 1)[-1] or "?"
        (self._problems if split in self._public else self._private).extend(describe_anomalies(anomalies, split))
        return anomalies


def _write_private_findings(directory: str, findings: List[str]) -> None:
    """The private splits' anomalies (never a reason to stop), 0600, beside the anomalies artifact."""
    import os

    from core.private_files import write_private_text

    os.makedirs(directory, exist_ok=True)
    write_private_text(os.path.join(directory, PRIVATE_FINDINGS_FILE), json.dumps({
        "what": "anomalies of PRIVATE splits against the reference schema and drift/skew limits: handled row by "
                "row (clipped to the public range, out-of-vocabulary, missing), never a reason to stop the run; "
                "private to the workdir, never published",
        "findings": findings}, indent=1))


class StrictExampleValidatorSpec(standard_component_specs.ExampleValidatorSpec):
    PARAMETERS = dict(standard_component_specs.ExampleValidatorSpec.PARAMETERS,
                      **{COMPARATORS_KEY: ExecutionParameter(type=str, optional=True),
                         PUBLIC_SPLITS_KEY: ExecutionParameter(type=str, optional=True)})


class StrictExampleValidator(ExampleValidator):
    SPEC_CLASS = StrictExampleValidatorSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(StrictValidatorExecutor)

    def __init__(self, statistics, schema, comparators: Optional[Dict[str, Any]] = None,
                 public_splits: Sequence[str] = ()):
        """``public_splits``: the splits whose rows are public by declaration, the only ones whose anomalies
        stop the run (:func:`public_splits`)."""
        from tfx import types
        from tfx.types import standard_artifacts

        spec = StrictExampleValidatorSpec(
            statistics=statistics, schema=schema, exclude_splits=json_utils.dumps([]),
            anomalies=types.Channel(type=standard_artifacts.ExampleAnomalies),
            **{PUBLIC_SPLITS_KEY: json.dumps(sorted(public_splits))},
            **({COMPARATORS_KEY: json.dumps(comparators, sort_keys=True)} if comparators else {}))
        base_component.BaseComponent.__init__(self, spec=spec)
