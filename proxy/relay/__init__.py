"""
The relay that both front doors share: after a login, bytes go both ways
untouched, with flow control. Its fast paths (``_fast``) are the only code
that uses private names of Twisted and pyOpenSSL; :func:`configure` probes
them once at start-up.
"""

from ._fast import (
    MODES,
    FastPaths,
    ProxyHeaderReader,
    configure,
    flushWrites,
    proxyHeaderProblem,
    sessionReused,
)
from .splice import Splice, tuneSocket
from .transports import transportChain

__all__ = [
    "MODES",
    "FastPaths",
    "ProxyHeaderReader",
    "Splice",
    "configure",
    "flushWrites",
    "proxyHeaderProblem",
    "sessionReused",
    "transportChain",
    "tuneSocket",
]
