"""
The client-facing IMAP side: a pre-auth ``IMAP4Server`` that greets, offers
STARTTLS, takes LOGIN or AUTHENTICATE PLAIN, hands the connection to the relay,
and the registry of live sessions.
"""

from .server import (
    PLAINTEXT_POLICIES,
    ProxyFactory,
    ProxyServer,
    ServerPolicy,
    SessionRegistry,
    isLoopback,
)

__all__ = [
    "PLAINTEXT_POLICIES",
    "ProxyFactory",
    "ProxyServer",
    "ServerPolicy",
    "SessionRegistry",
    "isLoopback",
]
