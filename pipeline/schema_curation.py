"""Turns a schema inferred by SchemaGen into a data set's reference schema (``dataset.json``'s "schema").

Curation: categorical domains tolerate at most 1% unseen values (Transform's out-of-vocabulary bucket
absorbs a few; more is a "category explosion" anomaly), and the label must be 0 or 1.

  python -m pipeline.schema_curation INFERRED_SCHEMA.pbtxt data/DATASET/dataset.json OUT.pbtxt
"""
from __future__ import annotations

import sys

from tensorflow_metadata.proto.v0 import schema_pb2


MIN_DOMAIN_MASS = 0.99


def curate(schema: schema_pb2.Schema, label_feature: str) -> schema_pb2.Schema:
    curated = schema_pb2.Schema()
    curated.CopyFrom(schema)
    for feature in curated.feature:
        if feature.HasField("domain") or feature.HasField("string_domain"):
            feature.distribution_constraints.min_domain_mass = MIN_DOMAIN_MASS
        if feature.name == label_feature:
            feature.int_domain.min = 0
            feature.int_domain.max = 1
            feature.presence.min_fraction = 1.0
    return curated


def main(argv) -> int:
    from google.protobuf import text_format
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    inferred_path, dataset_json, out_path = argv
    import json
    with open(dataset_json) as f:
        label_feature = json.load(f)["label_feature"]
    with open(inferred_path) as f:
        schema = text_format.Parse(f.read(), schema_pb2.Schema())
    with open(out_path, "w") as f:
        f.write(text_format.MessageToString(curate(schema, label_feature)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
