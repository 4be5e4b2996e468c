"""Model serving for privtrain: TF Serving's REST/gRPC APIs over the Pusher's serving directory.

Public API: :func:`serve`, :class:`ModelServer`, :class:`ServerOptions`, :class:`ServingError`,
:class:`ServingConfigError` (bad flags or files; :class:`PortInUseError`, :class:`InsecureBindError`).
See docs/serving.md.
"""
from .errors import InsecureBindError, PortInUseError, ServingConfigError, ServingError

__all__ = ["InsecureBindError", "ModelServer", "PortInUseError", "ServerOptions", "ServingConfigError",
           "ServingError", "serve"]


def __getattr__(name):
    # Lazy, so that ``python -m serving.server`` does not find its module imported already.
    if name in ("ModelServer", "serve"):
        from . import server

        return getattr(server, name)
    if name == "ServerOptions":
        from .options import ServerOptions

        return ServerOptions
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
