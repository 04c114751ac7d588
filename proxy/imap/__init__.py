"""
The client-facing IMAP side: a pre-auth ``IMAP4Server`` that greets, offers
STARTTLS, takes LOGIN or AUTHENTICATE PLAIN (``server``, reading commands
with ``reader`` and ``syntax``), SASL PLAIN parsing (``sasl``), and the
registry of live sessions (``sessions``); TLS and the plaintext-login policy,
shared with the SMTP front door (``secure``).
"""

from .sasl import PlainResponse, SASLError, parsePlain
from .secure import SecureMixin, isLoopback
from .server import (
    PLAINTEXT_POLICIES,
    ProxyFactory,
    ProxyServer,
    ServerPolicy,
)
from .sessions import SessionRegistry

__all__ = [
    "PLAINTEXT_POLICIES",
    "PlainResponse",
    "ProxyFactory",
    "ProxyServer",
    "SASLError",
    "SecureMixin",
    "ServerPolicy",
    "SessionRegistry",
    "isLoopback",
    "parsePlain",
]
