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
    p.add_argument("--model-name", default=None,
                   help="with --encrypted: the pushed model whose newest version the encrypted service serves "
                        "(default: the only one)")


def run(args) -> int:
    from core import pushed
    from encrypted_serving import cli as encrypted_cli
    from pipeline.config import RunConfig
    from core.private_files import OpenDirectoryError, check_private_dir
    from serving.errors import ServingConfigError
    from serving.server import server_from_args

    workdir = os.path.abspath(args.workdir)
    serving_dir = RunConfig(workdir=workdir).serving_dir
    encrypted = server = None
    try:
        check_private_dir(workdir)   # it holds the pushed models' plaintext weights (0700 protects all below)
        # the encrypted service serves the newest version by the rule `privtrain predict` and the plaintext server use
        encrypted_version = pushed.select_version(serving_dir, args.model_name) if args.encrypted else None
    except (OpenDirectoryError, pushed.PushedVersionError) as e:
        print(f"privtrain serve: {e}", file=sys.stderr)
        return 2
    try:
        server = server_from_args(args, serving_dir)
        # with --encrypted the plaintext server starts only with --also-plaintext, and then only with a token or
        # mutual TLS; it has no query budget, which the output says
        if encrypted_cli.plaintext_wanted(args, server.options):
            if args.encrypted:
                print(encrypted_cli.PLAINTEXT_NOTE, flush=True)
            server.start()
        else:
            server = None
    except (ServingConfigError, ValueError) as e:  # bad flag, file, port or address: one line
        print(f"privtrain serve: {e}", file=sys.stderr)
        return 2
    try:
        if args.encrypted:
            encrypted = encrypted_cli.start_for_serve(args, workdir, encrypted_version.path)
            if encrypted is None:
                return 2
            if server is None:
                return encrypted_cli.serve_encrypted_only(encrypted)
        return server.serve_forever(  # READY once SIGTERM is handled (drain)
            on_ready=lambda: print(f"READY rest={server.rest_port} grpc={server.grpc_port}", flush=True))
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None:
            server.stop()
        if encrypted is not None:
            encrypted.stop()
