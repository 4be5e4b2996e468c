"""ExampleValidator that stops the run on anomalies, with a message naming each feature and anomaly."""
from __future__ import annotations

from typing import List

from tfx.components import ExampleValidator
from tfx.components.example_validator import executor as tfx_validator_executor
from tfx.dsl.components.base import executor_spec


class DataValidationError(RuntimeError):
    """The data does not match the reference schema; nothing was trained or pushed."""


def describe_anomalies(anomalies, split: str) -> List[str]:
    lines = []
    for feature, info in sorted(anomalies.anomaly_info.items()):
        reasons = "; ".join(f"{r.short_description}: {r.description}" for r in info.reason) or info.description
        lines.append(f"  [{split}] feature '{feature}': {reasons}")
    if anomalies.HasField("dataset_anomaly_info"):
        info = anomalies.dataset_anomaly_info
        reasons = "; ".join(f"{r.short_description}: {r.description}" for r in info.reason) or info.description
        lines.append(f"  [{split}] data set: {reasons}")
    return lines


class StrictValidatorExecutor(tfx_validator_executor.Executor):
    def Do(self, input_dict, output_dict, exec_properties):
        self._problems: List[str] = []
        self._split = "?"
        result = super().Do(input_dict, output_dict, exec_properties)
        if self._problems:
            raise DataValidationError(
                "data validation failed; the data does not match the data set's reference schema:\n"
                + "\n".join(self._problems)
                + "\nFix the data (or, if the change is intended, update the reference schema named in "
                  "dataset.json) and run again. Nothing was trained or pushed.")
        return result

    def _Validate(self, inputs, outputs):
        anomalies = super()._Validate(inputs, outputs)
        split = str(outputs.get("schema_diff_path", "")).rstrip("/").rsplit("Split-", 1)[-1] or "?"
        self._problems.extend(describe_anomalies(anomalies, split))
        return anomalies


class StrictExampleValidator(ExampleValidator):
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(StrictValidatorExecutor)
