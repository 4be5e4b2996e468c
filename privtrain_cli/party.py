"""``privtrain encrypted-party``: one TF-Encrypted party of the encrypted service (encrypted_serving/cli.py)."""
from __future__ import annotations


def add_parser(sub) -> None:
    from encrypted_serving.cli import add_party_parser

    add_party_parser(sub)


def run(args) -> int:
    from encrypted_serving.cli import cmd_party

    return cmd_party(args)
