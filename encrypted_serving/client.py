"""Prediction client (encrypted env): ``python -m encrypted_serving.client --cluster CLUSTER_JSON --input FILE``.

LEGACY (the old client-driven design, issue 9): kept only as the baseline of simulations/bench_encrypted.py
and the control of the attack tests. A client of this design drives the parties' TF graph and can read the
weights; the served design is encrypted_serving.service / gateway / worker / driver / share_client.


Reads raw rows (the data set's own format), preprocesses them in numpy with the model's
``preprocessing.json``, secret-shares them on this process's TF device, drives the encrypted
forward pass and reconstructs the logits here only; writes JSON (``--output``, default stdout):

    {"n": N, "protocol": "aby3", "probabilities": [...], "logits": [...], "labels": [1, 0, null, ...],
     "seconds": {"connect_and_share_model": s, "predict": s}}

Exit status: 0 ok; 2 bad input / model / cluster description; 3 a party is down or did not answer
(PartyUnavailableError, the message names the party); 1 anything else. The platform side calls this
through ``encrypted_serving.launcher.run_predict``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

DEFAULT_DATASET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "adult")


def predict(cluster_json: str, input_file: str, limit: Optional[int] = None, dataset: str = DEFAULT_DATASET,
            timeout_s: float = 30.0, batch_size: int = 1000) -> dict:
    """Encrypted predictions for the raw rows of input_file. Raises engine.EncryptedServingError subclasses."""
    from encrypted_serving import preprocessing as pp
    desc = pp.load_dataset_description(dataset)
    rows, labels = pp.read_raw_rows(input_file, desc, limit=limit)
    if not rows:
        raise pp.PreprocessingError("%s holds no rows" % input_file)
    from encrypted_serving.engine import EncryptedPredictor
    _phase("connecting to the encrypted service and secret-sharing the model")
    t0 = time.perf_counter()
    predictor = EncryptedPredictor(cluster_json, timeout_s=timeout_s)
    t1 = time.perf_counter()
    _phase("predicting %d rows" % len(rows))
    x = pp.transform(rows, predictor.preprocessing)
    logits = []
    for i in range(0, len(x), batch_size):
        logits.append(predictor.predict_logits(x[i:i + batch_size]))
    import numpy as np
    from encrypted_serving import model_format as mf
    logits = np.concatenate(logits)
    t2 = time.perf_counter()
    return {"n": len(rows), "protocol": predictor.protocol_name,
            "probabilities": [float(p) for p in mf.sigmoid(logits)],
            "logits": [float(z) for z in logits], "labels": labels,
            "seconds": {"connect_and_share_model": round(t1 - t0, 4), "predict": round(t2 - t1, 4)}}


def _phase(text: str) -> None:
    sys.stderr.write("phase: %s\n" % text)
    sys.stderr.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="privtrain encrypted prediction client (encrypted env)")
    ap.add_argument("--cluster", required=True, help="cluster.json of a running encrypted service")
    ap.add_argument("--input", required=True, help="raw rows in the data set's format")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--dataset", default=DEFAULT_DATASET, help="data-set directory or dataset.json")
    ap.add_argument("--output", default="-", help="JSON result file ('-' = stdout)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a silent party is an error")
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args(argv)
    # Last resort against a hang inside TF code that holds the GIL (where the engine's watchdog thread
    # cannot run): a C-level timer dumps the stacks and exits; run_predict reports the last phase.
    import faulthandler
    faulthandler.dump_traceback_later(90 + 3 * args.timeout, exit=True)
    code = 0
    try:
        from encrypted_serving import cluster as cl, model_format as mf, preprocessing as pp
        try:
            result = predict(args.cluster, args.input, args.limit, args.dataset, args.timeout, args.batch_size)
        except (pp.PreprocessingError, mf.ModelFormatError, cl.ClusterError) as e:
            sys.stderr.write("error: %s\n" % e)
            code = 2
        else:
            text = json.dumps(result)
            if args.output == "-":
                sys.stdout.write(text + "\n")
            else:
                tmp = args.output + ".tmp"
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, args.output)
    except Exception as e:  # noqa: BLE001
        from encrypted_serving.engine import PartyUnavailableError
        sys.stderr.write("error: %s\n" % e)
        code = 3 if isinstance(e, PartyUnavailableError) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    # TF's remote-eager teardown can block on an unreachable party: leave without it.
    os._exit(code)


if __name__ == "__main__":
    main()
