"""Names shared by Transform, the model and the client-side preprocessing export."""
from __future__ import annotations

import re

NUM_OOV_BUCKETS = 1


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def numeric_key(name: str) -> str:
    """Transformed (z-scored) numeric feature."""
    return f"{_safe(name)}_z"


def categorical_key(name: str) -> str:
    """Transformed categorical feature: vocabulary id, with unseen and missing values in the last bucket."""
    return f"{_safe(name)}_id"


def vocabulary_name(name: str) -> str:
    return f"vocab_{_safe(name)}"
