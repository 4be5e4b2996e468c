"""Model serving for privtrain: TF Serving's REST/gRPC APIs over the Pusher's serving directory.

Public API: :func:`serve`, :class:`ModelServer`, :class:`ServerOptions`, :class:`ServingError`,
:class:`ServingConfigError` (bad flags or files; :class:`PortInUseError`, :class:`InsecureBindError`).
See docs/serving.md.
"""
from .errors import PortInUseError, ServingError
from .server import ModelServer, serve

__all__ = ["ModelServer", "PortInUseError", "ServingError", "serve"]
