"""Model serving for privtrain: TF Serving's REST/gRPC APIs over the Pusher's serving directory.

Public API: :func:`serve`, :class:`ModelServer`, :class:`PortInUseError`, :class:`ServingError`.
See docs/serving.md.
"""
from .errors import PortInUseError, ServingError
from .server import ModelServer, serve

__all__ = ["ModelServer", "PortInUseError", "ServingError", "serve"]
