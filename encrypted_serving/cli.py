"""The encrypted-serving part of privtrain's CLI (platform env; no TF import): flags and commands that
privtrain_cli/serve.py and predict.py wire in, kept here so that the pipeline's CLI changes only by a few lines.

    privtrain serve --encrypted [--encrypted-output logit|label] [--isolation netns|none]
                    [--also-plaintext (needs --auth-token-file, or mutual TLS: --tls-cert/--tls-key/--tls-client-ca)]
    privtrain predict --encrypted --input FILE [--client client.json]
    privtrain encrypted-party --party server0|server1|server2|driver --config parties.json
"""
from __future__ import annotations

import os
import signal
import sys


def add_serve_flags(p) -> None:
    p.add_argument("--encrypted", action="store_true",
                   help="also start the encrypted service: 3 ABY3 compute parties + driver in a private network "
                        "namespace, share gateways with mutual TLS on 127.0.0.1 (needs root)")
    p.add_argument("--encrypted-output", default="logit", choices=["logit", "label"],
                   help="what clients get back: shares of the logit (default) or of the predicted label only")
    p.add_argument("--isolation", default="netns", choices=["netns", "none"],
                   help="netns (default): TF cluster unreachable from the host; none: UNSAFE, for non-root development")
    p.add_argument("--also-plaintext", action="store_true",
                   help="with --encrypted: also start the plaintext REST/gRPC server (it returns exact logits and "
                        "has NO query budget); refused without a token (--auth-token-file) or mutual TLS "
                        "(--tls-cert/--tls-key with --tls-client-ca)")

PLAINTEXT_NOTE = ("NOTE plaintext endpoint: exact logits to every caller holding the token or a client certificate "
                  "of --tls-client-ca; it has NO query budget (the encrypted service's rows/day budget does not "
                  "apply to it)")


def plaintext_wanted(args, options) -> bool:
    """Whether `privtrain serve` starts the plaintext REST/gRPC server (options: its ServingOptions). With
    --encrypted only when asked for (--also-plaintext), and then only when callers are authenticated: a bearer
    token, or mutual TLS (a server certificate alone encrypts but authenticates no one). Otherwise that endpoint
    would hand any local process the exact logits the encrypted service protects. It has no query budget.
    Raises ValueError (one line) for --also-plaintext without authentication, or without --encrypted."""
    also = getattr(args, "also_plaintext", False)
    if not getattr(args, "encrypted", False):
        if also:
            raise ValueError("--also-plaintext only makes sense with --encrypted (without it the plaintext server "
                             "is what `privtrain serve` starts)")
        return True
    if not also:
        return False
    if not (options.auth or (options.tls and options.tls_client_ca)):
        raise ValueError("--also-plaintext next to --encrypted needs a bearer token (--auth-token-file) or mutual "
                         "TLS (--tls-cert and --tls-key with --tls-client-ca): %s any local process gets the exact "
                         "logits" % ("TLS without --tls-client-ca authenticates no one, so" if options.tls
                                     else "without them"))
    return True


def add_predict_flags(p) -> None:
    p.add_argument("--encrypted", action="store_true",
                   help="secret-share the rows here and predict through the encrypted service's gateways "
                        "(the running one of --workdir, else a temporary one)")
    p.add_argument("--client", default=None, help="with --encrypted: client.json (gateways, CA, your certificate)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before an encrypted call gives up")


def start_for_serve(args, workdir: str, model=None):
    """Start the gateway service for `privtrain serve --encrypted` on ``model`` (the pushed version the caller
    chose by ``core.pushed``'s rule; default: the newest found under ``workdir``); returns it, or None after
    printing one line."""
    from encrypted_serving.service import EncryptedServiceError, GatewayService

    def _interrupt(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM during start-up or serving: stop every party cleanly
    try:
        svc = GatewayService(model or workdir, workdir=workdir, output=args.encrypted_output,
                             isolation=args.isolation).start()
    except EncryptedServiceError as e:
        print(f"privtrain serve: the encrypted service did not start: {e}", file=sys.stderr)
        return None
    print(f"ENCRYPTED READY client={svc.client_json()} owner={svc.owner_json} parties={svc.parties_json}", flush=True)
    svc.auto_restart_gateways = True
    return svc


def serve_encrypted_only(svc) -> int:
    """Block until SIGTERM / Ctrl-C (0) or until the service fails (1); stops it."""
    print("READY encrypted-only (no plaintext endpoint; --also-plaintext with a token or mutual TLS adds one)",
          flush=True)
    return svc.serve_forever()


def predict(args, workdir: str, version_dir: str) -> dict:
    """`privtrain predict --encrypted`: raises encrypted_serving.service.EncryptedServiceError with one line."""
    from core.pushed import PushedVersion
    from encrypted_serving.service import run_predict
    dataset = PushedVersion(version_dir).dataset_path   # the published description (data/*/dataset.json's schema)
    if not os.path.isfile(dataset):
        dataset = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "adult")
    result = run_predict(args.input, workdir=workdir, client_json=args.client, model=version_dir, dataset=dataset,
                         limit=args.limit, timeout_s=args.timeout)
    result.setdefault("model", version_dir + " (encrypted)")
    if result.get("output") == "label":     # the service reveals labels only: show them as 0/1 "probabilities"
        result["probabilities"] = [float(v) for v in result["predicted_labels"]]
    return result


def add_party_parser(sub) -> None:
    p = sub.add_parser("encrypted-party", help="run one party (gateway + compute worker) or the driver of a "
                                               "multi-host encrypted service (docs/encrypted_serving.md)")
    p.add_argument("--party", required=True, choices=["server0", "server1", "server2", "driver"])
    p.add_argument("--config", required=True, help="parties.json shared by the operators")


def cmd_party(args) -> int:
    from encrypted_serving import certs, parties
    from encrypted_serving.service import EncryptedServiceError, run_party
    try:
        return run_party(os.path.abspath(args.config), args.party)
    except (EncryptedServiceError, parties.ConfigError, certs.CertError) as e:
        print(f"privtrain encrypted-party: {e}", file=sys.stderr)
        return 2
