"""Encrypted (secure multi-party) prediction serving for privtrain.

Deliberately import-free: submodules run in two different Python environments.

* encrypted env (tensorflow 2.9.1 + tf-encrypted 0.9.1): ``player``, ``engine``, ``client`` (TF/TFE),
  ``model_format``, ``preprocessing``, ``cluster`` (pure Python / numpy).
* platform env (tensorflow 2.15.1): ``export``, ``launcher`` (plus the pure modules).

The two sides exchange files only; see docs/encrypted_serving.md for the exchange format.
"""
