"""Encrypted (secure multi-party) prediction serving for privtrain: see docs/encrypted_serving.md.

Deliberately import-free: submodules run in two different Python environments.

* served design: clients / the model owner (``share_client``, numpy + grpcio, either env) talk mutual TLS to
  three share gateways (``gateway``); each gateway feeds its own compute worker (``worker``, encrypted env)
  through a Unix socket; the operator's ``driver`` (encrypted env) runs the fixed ABY3 ``program``;
  ``service`` (platform env, subprocess only) starts it all with the TF cluster in its own network namespace
  (``core.netns``).
  Pure modules: ``ring`` (TFE encoding, shares, frames), ``certs``, ``parties``, ``model_format``,
  ``preprocessing``; ``cli`` wires the commands into privtrain's CLI.
* ``fastops`` (fast TFE kernel, party side), ``export`` (pushed model -> encrypted_model, platform env),
  ``environment`` (the encrypted env's interpreter). Process groups and the TF cluster's namespace come from
  ``core.processes`` / ``core.netns`` (platform side only).

The two environments exchange files and network messages only.
"""
