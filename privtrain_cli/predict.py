"""``privtrain predict``: raw rows through the newest pushed model, in plaintext or on secret shares."""
from __future__ import annotations

import json
import os
import sys

from privtrain_cli.common import workdir_flag


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict raw rows with the newest pushed model (plain or encrypted)")
    workdir_flag(p)
    p.add_argument("--input", required=True, help="file of raw rows in the data set's format (label optional)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--model-name", default=None, help="pushed model name (default: the only one)")
    from encrypted_serving.cli import add_predict_flags

    add_predict_flags(p)  # --encrypted, --client, --timeout
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from core.dataset import DatasetError
    from encrypted_serving.preprocessing import PreprocessingError
    from pipeline.config import RunConfig
    from pipeline.predict import (PredictError, check_input_file, format_predictions, latest_pushed_model,
                                  predict_plain)

    workdir = os.path.abspath(args.workdir)
    try:
        check_input_file(args.input, args.limit)
        version_dir = latest_pushed_model(RunConfig(workdir=workdir).serving_dir, args.model_name)
        if args.encrypted:
            from encrypted_serving import cli as encrypted_cli
            from encrypted_serving.service import EncryptedServiceError

            try:
                result = encrypted_cli.predict(args, workdir, version_dir)
            except EncryptedServiceError as e:
                raise PredictError(str(e)) from e
        else:
            result = predict_plain(version_dir, args.input, args.limit)
    except (PredictError, FileNotFoundError, DatasetError, PreprocessingError) as e:
        print(f"privtrain predict: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_predictions(result))
    return 0
