"""Keeps library chatter (TFX, Beam, TFMA, TF at WARNING) out of the user's terminal."""
from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """TFX, Beam, TFMA and TF log a lot at WARNING; the user sees our progress lines and real errors."""
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("tensorflow", "apache_beam", "tensorflow_model_analysis", "root"):
        logging.getLogger(name if name != "root" else None).setLevel(logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.ERROR)
