"""DP-SGD training for privtrain: accountants, noise calibration, privacy budget ledger, trainer.

Import submodules directly (``from dp_training import accountants``); this package does not import
TensorFlow at import time so that ``dp_training.sgd_events`` stays cheap for other packages.
"""
