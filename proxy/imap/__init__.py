"""
The client-facing IMAP side: a pre-auth ``IMAP4Server`` that greets, offers
STARTTLS, takes LOGIN or AUTHENTICATE PLAIN (``server``, reading commands
with ``reader`` and ``syntax``), SASL PLAIN parsing (``sasl``), and the
registry of live sessions (``sessions``).
"""

from .sasl import PlainResponse, SASLError, parsePlain
from .server import (
    PLAINTEXT_POLICIES,
    ProxyFactory,
    ProxyServer,
    ServerPolicy,
    isLoopback,
)
from .sessions import SessionRegistry

__all__ = [
    "PLAINTEXT_POLICIES",
    "PlainResponse",
    "ProxyFactory",
    "ProxyServer",
    "SASLError",
    "ServerPolicy",
    "SessionRegistry",
    "isLoopback",
    "parsePlain",
]
