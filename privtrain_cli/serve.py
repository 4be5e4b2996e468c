"""``privtrain serve``: TF Serving's REST and gRPC APIs over the pushed models (serving/), and the encrypted
service beside them (encrypted_serving/)."""
from __future__ import annotations

import os
import sys

from privtrain_cli.common import workdir_flag


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve pushed models over TF Serving's REST and gRPC APIs",
                       description="Serve the models pushed under <workdir>/serving with TF Serving's APIs "
                                   "(the built-in server; see docs/serving.md).")
    workdir_flag(p, "work directory whose serving/ directory holds the pushed models (default ./privtrain-work)")
    p.add_argument("--rest-port", type=int, default=8501, help="0 picks a free port")
    p.add_argument("--grpc-port", type=int, default=8500, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--backend", default="auto", choices=["auto", "builtin", "tfserving"])
    p.add_argument("--enable-batching", action="store_true", help="merge concurrent predict requests")
    from serving.server import add_serve_flags

    add_serve_flags(p)  # TLS, bearer-token auth, request limits (docs/serving.md)
    from encrypted_serving.cli import add_serve_flags as add_encrypted_flags

    add_encrypted_flags(p)  # --encrypted, --encrypted-output, --isolation (docs/encrypted_serving.md)


def run(args) -> int:
    from pipeline.config import RunConfig
    from serving.errors import ServingConfigError
    from serving.server import server_from_args

    workdir = os.path.abspath(args.workdir)
    serving_dir = RunConfig(workdir=workdir).serving_dir
    encrypted = None
    try:
        server = server_from_args(args, serving_dir)
        server.start()
    except ServingConfigError as e:  # bad flag, file, port or address: one line
        print(f"privtrain serve: {e}", file=sys.stderr)
        return 2
    try:
        if args.encrypted:
            from encrypted_serving.cli import start_for_serve

            encrypted = start_for_serve(args, workdir)
            if encrypted is None:
                return 2
        return server.serve_forever(  # READY once SIGTERM is handled (drain)
            on_ready=lambda: print(f"READY rest={server.rest_port} grpc={server.grpc_port}", flush=True))
    finally:
        server.stop()
        if encrypted is not None:
            encrypted.stop()
